"""Residual vector quantizer with EMA codebooks (DESIGN.md §1 items 2 and 6).

A chain of ``D`` stages, each with its own ``K×d`` codebook, quantizes what the previous stages
left: ``r_0 = x``, ``k_i = argmin_k ||r_{i-1} - C_i[k]||²``, ``r_i = r_{i-1} - C_i[k_i]``; the
latent after ``d`` stages is the prefix sum ``q_d = Σ_{i≤d} C_i[k_i]``.

Codebooks are buffers learned by exponential moving averages of the residuals assigned to them,
never by gradients. One training step (``update=True``):

1. **Initialisation** (first step only): each stage's codebook is drawn from random residuals of
   that stage in the first batch (then refined by a few k-means iterations when
   ``kmeans_init`` and the batch has at least ``K`` rows), stage by stage down the chain. Every
   code starts with one pseudo-observation (``cluster_size = 1``, ``embed_sum = embed``).
2. **EMA** with decay ``γ_t``: ``cluster_size ← γ_t·cs + (1-γ_t)·counts``,
   ``embed_sum ← γ_t·es + (1-γ_t)·Σ residuals``, ``embed = embed_sum / cs̃`` with the
   Laplace-smoothed counts ``cs̃ = (cs + ε) / (n + Kε) · n``, ``n = Σ cs``. Counts and sums come
   from ``bincount``/``index_add_`` (never one-hot matrices).
   **Decay warm-up:** ``γ_t = decay · min(1, (t+1)/(warmup_steps+1))`` for the ``t``-th update,
   so early updates move the codebooks almost all the way to the batch means (the first one is
   nearly a k-means step) and the decay reaches ``decay`` after ``warmup_steps`` updates;
   ``warmup_steps=0`` uses ``decay`` throughout.
3. **Dead-code restart** (every ``restart_every`` updates, when ``restart``): a code whose EMA
   count is below ``dead_threshold`` gets a random current residual of its stage (distinct rows
   of the batch while ``K ≤ N``), and its statistics restart as ``dead_threshold``
   pseudo-observations at that vector.

Search, EMA and restart run in fp32 (outside autocast) and never synchronise with the host once
the codebooks are initialised. Outputs are computed with the codebooks as they were at the start
of the step; the update follows. On CPU the chain runs row-chunk-major on worker threads (one per
torch thread, see ``evotok.nearest.cpu_map_row_chunks``) and the rest of the forward runs
single-threaded (``cpu_worker_threads``), which avoids thread-barrier stalls when other
processes (data loaders, say) share the cores.

**Data parallel:** when ``torch.distributed`` is initialised with more than one rank, the counts
and sums are all-reduced (SUM, one collective) before the EMA, and the initial codebooks and the
restart candidates are chosen on rank 0 and broadcast, so all ranks hold identical buffers.
Every rank must run the same number of updating forwards (an empty batch is fine). Wrap the
model with ``broadcast_buffers=False``: the buffers are already kept identical.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from evotok.nearest import (
    PRECISIONS,
    SearchScratch,
    cpu_map_row_chunks,
    cpu_worker_threads,
    cpu_rows_per_chunk,
    nearest_code,
    squared_norms,
)


@dataclass
class QuantizerOutput:
    """Result of ``ResidualQuantizer.forward`` (``...`` = the input's leading shape)."""

    codes: Tensor  # ... D, LongTensor
    prefix_sums: Tensor  # D ... d, fp32, no gradient: q_1 .. q_D
    commitment_loss: Tensor  # scalar: mean over depths of F.mse_loss(x, sg(q_d))
    residual_norms: Tensor  # D, mean ||r_i|| after each stage, no gradient


def _distributed() -> tuple[bool, int]:
    """(active, rank) for a process group of more than one rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank()
    return False, 0


class ResidualQuantizer(nn.Module):
    """``D`` stages of ``K`` EMA-learned codes of width ``d``.

    Args:
        num_stages: ``D``, the number of residual stages.
        codebook_size: ``K``, codes per stage.
        dim: ``d``, the code width (the input's last dimension).
        decay: EMA decay of the codebook statistics.
        eps: Laplace smoothing of the EMA counts.
        dead_threshold: a code whose EMA count falls below this is dead (restarted, and counted
            by ``codebook_stats``).
        warmup_steps: updates over which the EMA decay ramps up to ``decay`` (module docstring).
        restart: restart dead codes from current residuals.
        restart_every: restart every this many updates.
        kmeans_init: refine the data initialisation with k-means on the first batch.
        kmeans_iters: k-means iterations per stage for ``kmeans_init``.
        search_precision: precision of the nearest-code search (``evotok.nearest``): ``"fp32"``
            (exact) or ``"tf32"``, ``"tf32x3"``, ``"bf16"`` (faster on CUDA, may pick other codes
            at near-ties).
        chunk_size: rows per tile of the torch search paths (``None``: automatic).
    """

    def __init__(
        self,
        num_stages: int,
        codebook_size: int,
        dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_threshold: float = 1.0,
        warmup_steps: int = 100,
        restart: bool = True,
        restart_every: int = 1,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        search_precision: str = "fp32",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_stages", num_stages), ("codebook_size", codebook_size), ("dim", dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps < 0 or dead_threshold < 0:
            raise ValueError("eps and dead_threshold must be non-negative")
        if warmup_steps < 0 or restart_every < 1 or kmeans_iters < 0:
            raise ValueError("warmup_steps and kmeans_iters must be >= 0, restart_every >= 1")
        if search_precision not in PRECISIONS:
            raise ValueError(f"search_precision must be one of {PRECISIONS}, got {search_precision!r}")
        self.num_stages = num_stages
        self.codebook_size = codebook_size
        self.dim = dim
        self.decay = decay
        self.eps = eps
        self.dead_threshold = dead_threshold
        self.warmup_steps = warmup_steps
        self.restart = restart
        self.restart_every = restart_every
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.search_precision = search_precision
        self.chunk_size = chunk_size

        embed = torch.randn(num_stages, codebook_size, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(num_stages, codebook_size))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        # Diagnostics of the last forward / update (not saved).
        self.register_buffer("batch_usage", torch.zeros(num_stages), persistent=False)
        self.register_buffer("restarted", torch.zeros(num_stages, dtype=torch.long), persistent=False)
        self._initted_seen = False  # host-side cache of `initted`, so a step need not sync
        self.register_load_state_dict_post_hook(_forget_initted_cache)

    def extra_repr(self) -> str:
        return (
            f"num_stages={self.num_stages}, codebook_size={self.codebook_size}, dim={self.dim}, "
            f"decay={self.decay}, dead_threshold={self.dead_threshold}, warmup_steps={self.warmup_steps}"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, update: bool | None = None) -> QuantizerOutput:
        """Quantize ``x`` (``... d``); updates the codebooks when ``update`` (default: training)."""
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"expected input of shape (..., {self.dim}), got {tuple(x.shape)}")
        if x.device != self.embed.device:
            raise ValueError(f"input is on {x.device} but the codebooks are on {self.embed.device}")
        update = self.training if update is None else update
        lead = x.shape[:-1]
        threads = cpu_worker_threads() if x.device.type == "cpu" else contextlib.nullcontext()
        with torch.autocast(device_type=x.device.type, enabled=False), threads:
            x32 = x.float()
            flat = x32.detach().reshape(-1, self.dim)
            if update and not self._is_initted():
                self._initialise(flat)
            residuals, prefix, codes = self._encode(flat)
            counts = self._code_counts(codes)
            self.batch_usage.copy_((counts > 0).float().mean(-1))
            if update:
                self._update(residuals[:-1], codes, counts)
            if flat.shape[0] == 0:
                commitment = x32.sum() * 0.0
                residual_norms = torch.zeros(self.num_stages, device=x.device)
            else:
                prefix_view = prefix.view(self.num_stages, *lead, self.dim)
                commitment = F.mse_loss(x32.unsqueeze(0).expand_as(prefix_view), prefix_view)
                residual_norms = torch.linalg.vector_norm(residuals[1:], dim=-1).mean(-1)
        return QuantizerOutput(
            codes=codes.t().reshape(*lead, self.num_stages),
            prefix_sums=prefix.view(self.num_stages, *lead, self.dim),
            commitment_loss=commitment,
            residual_norms=residual_norms,
        )

    def _search(self, r: Tensor, codebook: Tensor, norms: Tensor) -> Tensor:
        return nearest_code(r, codebook, norms, chunk_size=self.chunk_size, precision=self.search_precision)

    @torch.no_grad()
    def _encode(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The chain. Returns residuals ``(D+1)×N×d`` (``r_0 .. r_D``), prefix sums ``D×N×d``
        and codes ``D×N``."""
        n = flat.shape[0]
        stages, dim = self.num_stages, self.dim
        residuals = torch.empty(stages + 1, n, dim, device=flat.device)
        prefix = torch.empty(stages, n, dim, device=flat.device)
        codes = torch.empty(stages, n, dtype=torch.long, device=flat.device)
        residuals[0].copy_(flat)
        norms = squared_norms(self.embed)
        if flat.device.type == "cpu" and self.search_precision != "bf16":
            self._encode_cpu(residuals, prefix, codes, norms)
            return residuals, prefix, codes
        for i in range(stages):
            codes[i] = self._search(residuals[i], self.embed[i], norms[i])
            chosen = self.embed[i].index_select(0, codes[i])
            torch.sub(residuals[i], chosen, out=residuals[i + 1])
            if i == 0:
                prefix[0].copy_(chosen)
            else:
                torch.add(prefix[i - 1], chosen, out=prefix[i])
        return residuals, prefix, codes

    def _encode_cpu(self, residuals: Tensor, prefix: Tensor, codes: Tensor, norms: Tensor) -> None:
        """The chain on CPU, row-chunk-major: each worker thread takes a chunk of rows through
        all ``D`` stages (search, residual, prefix) while the chunk stays in cache, with no
        thread barrier between stages (``evotok.nearest.cpu_map_row_chunks``). Same results as
        searching stage by stage with ``nearest_code``."""
        n = residuals.shape[1]
        norms_col = norms.unsqueeze(-1)

        def work(start: int, stop: int, scratch: SearchScratch) -> None:
            for i in range(self.num_stages):
                r, k = residuals[i, start:stop], codes[i, start:stop]
                scratch.search(r, self.embed[i], norms_col[i], k)
                chosen = self.embed[i].index_select(0, k)
                torch.sub(r, chosen, out=residuals[i + 1, start:stop])
                if i == 0:
                    prefix[0, start:stop].copy_(chosen)
                else:
                    torch.add(prefix[i - 1, start:stop], chosen, out=prefix[i, start:stop])

        rows = self.chunk_size or cpu_rows_per_chunk(self.codebook_size)
        cpu_map_row_chunks(n, min(max(n, 1), rows), work)

    def _flat_code_index(self, codes: Tensor) -> Tensor:
        """Codes ``D×N`` -> indices into the stacked ``(D·K)`` codes of all stages."""
        offsets = torch.arange(self.num_stages, device=codes.device) * self.codebook_size
        return (codes + offsets[:, None]).reshape(-1)

    def _code_counts(self, codes: Tensor) -> Tensor:
        """Assignments per code ``D×K`` (float) for codes ``D×N``."""
        flat_index = self._flat_code_index(codes)
        total = self.num_stages * self.codebook_size
        if flat_index.is_cuda:  # bincount sizes its output from the data: a host sync on CUDA
            counts = torch.zeros(total, device=codes.device).index_add_(
                0, flat_index, torch.ones(flat_index.shape[0], device=codes.device)
            )
        else:
            counts = torch.bincount(flat_index, minlength=total).float()
        return counts.view(self.num_stages, self.codebook_size)

    # --------------------------------------------------------------- EMA update
    @torch.no_grad()
    def _update(self, stage_inputs: Tensor, codes: Tensor, counts: Tensor) -> None:
        """EMA step and dead-code restart; ``stage_inputs`` D×N×d holds ``r_0 .. r_{D-1}``."""
        stages, size, dim = self.num_stages, self.codebook_size, self.dim
        sums = torch.zeros(stages * size, dim, device=codes.device)
        sums.index_add_(0, self._flat_code_index(codes), stage_inputs.reshape(-1, dim))
        active, _ = _distributed()
        if active:
            packed = torch.cat([counts.reshape(-1, 1), sums], dim=1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            counts, sums = packed[:, 0].view(stages, size), packed[:, 1:]
        self._ema_step(counts, sums.view(stages, size, dim))
        if self.restart:
            self.restart_dead_codes(stage_inputs, due=self.step % self.restart_every == 0)

    def current_decay(self) -> Tensor:
        """EMA decay for the next update (a 0-dim tensor, see the decay warm-up)."""
        ramp = (self.step.float() + 1.0) / (self.warmup_steps + 1.0)
        return self.decay * ramp.clamp(max=1.0)

    def _ema_step(self, counts: Tensor, sums: Tensor) -> None:
        decay = self.current_decay()
        self.cluster_size.lerp_(counts, 1.0 - decay)  # decay·cs + (1 - decay)·counts
        self.embed_sum.lerp_(sums, 1.0 - decay)
        total = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        smoothed = smoothed.unsqueeze(-1)
        # A stage whose counts are all zero (possible only with decay 0) keeps its codes.
        self.embed.copy_(torch.where(smoothed > 0, self.embed_sum / smoothed.clamp_min(1e-30), self.embed))
        self.step.add_(1)

    @torch.no_grad()
    def restart_dead_codes(self, stage_inputs: Tensor, due: Tensor | bool = True) -> Tensor:
        """Replace codes with EMA count < ``dead_threshold`` by random rows of ``stage_inputs``.

        ``stage_inputs`` (``D×N×d``) holds each stage's input residuals ``r_0 .. r_{D-1}``; a
        dead code of stage ``i`` gets a row of ``stage_inputs[i]`` and restarts its statistics
        as ``dead_threshold`` observations at that vector. ``due`` (a bool or 0-dim bool tensor)
        gates the whole restart without a host sync: a candidate is drawn for every code (on
        rank 0, then broadcast) and applied only where the code is dead and ``due`` holds.
        Returns the dead mask ``D×K`` that was applied. Called by the training forward every
        ``restart_every`` updates.
        """
        if stage_inputs.dim() != 3 or stage_inputs.shape[0] != self.num_stages or stage_inputs.shape[2] != self.dim:
            raise ValueError(
                f"stage_inputs must have shape ({self.num_stages}, N, {self.dim}), got {tuple(stage_inputs.shape)}"
            )
        candidates, valid = self._restart_candidates(stage_inputs.float())
        dead = (self.cluster_size < self.dead_threshold) & valid & due
        self.restarted.copy_(dead.sum(-1))
        dead_vec = dead.unsqueeze(-1)
        self.embed.copy_(torch.where(dead_vec, candidates, self.embed))
        self.embed_sum.copy_(torch.where(dead_vec, candidates * self.dead_threshold, self.embed_sum))
        self.cluster_size.masked_fill_(dead, self.dead_threshold)
        return dead

    def _restart_candidates(self, stage_inputs: Tensor) -> tuple[Tensor, Tensor]:
        """One residual per code ``D×K×d`` and a validity flag, identical on all ranks.

        Code ``j`` of stage ``i`` is offered row ``perm[(j + shift_i) mod N]`` of that stage's
        residuals, so codes restarted together get distinct rows while ``K ≤ N``."""
        stages, size, dim = self.num_stages, self.codebook_size, self.dim
        device = stage_inputs.device
        n = stage_inputs.shape[1]
        active, rank = _distributed()
        packed = torch.zeros(stages * size * dim + 1, device=device)
        if rank == 0 and n > 0:
            perm = torch.randperm(n, device=device)
            shift = torch.randint(n, (stages, 1), device=device)
            rows = perm[(torch.arange(size, device=device) + shift) % n]
            chosen = torch.gather(stage_inputs, 1, rows.unsqueeze(-1).expand(stages, size, dim))
            packed[:-1].copy_(chosen.reshape(-1))
            packed[-1] = 1.0
        if active:
            dist.broadcast(packed, src=0)
        return packed[:-1].view(stages, size, dim), packed[-1] > 0

    # ------------------------------------------------------------ initialisation
    def _is_initted(self) -> bool:
        if not self._initted_seen:
            self._initted_seen = bool(self.initted)
        return self._initted_seen

    @torch.no_grad()
    def _initialise(self, flat: Tensor) -> None:
        """Data-dependent codebooks from the first batch (rank 0's, broadcast to all ranks)."""
        active, rank = _distributed()
        if rank == 0:
            if flat.shape[0] == 0:
                raise ValueError("the first training batch (which initialises the codebooks) is empty")
            residual = flat.clone()
            for i in range(self.num_stages):
                codebook = self._initial_codebook(residual)
                self.embed[i].copy_(codebook)
                residual -= codebook.index_select(0, self._search(residual, codebook, squared_norms(codebook)))
        if active:
            dist.broadcast(self.embed, src=0)
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(self.embed)
        self.step.zero_()
        self.initted.fill_(True)
        self._initted_seen = True

    def _initial_codebook(self, data: Tensor) -> Tensor:
        """``K`` random rows of ``data`` (distinct when ``N ≥ K``), then k-means if asked."""
        n, size = data.shape[0], self.codebook_size
        if n >= size:
            centres = data[torch.randperm(n, device=data.device)[:size]].clone()
        else:  # fewer rows than codes: duplicates, which later restarts spread out
            return data[torch.randint(n, (size,), device=data.device)].clone()
        if not self.kmeans_init:
            return centres
        for _ in range(self.kmeans_iters):
            assign = self._search(data, centres, squared_norms(centres))
            counts = torch.zeros(size, device=data.device).index_add_(0, assign, torch.ones(n, device=data.device))
            sums = torch.zeros_like(centres).index_add_(0, assign, data)
            filled = counts > 0
            centres = torch.where(filled[:, None], sums / counts.clamp_min(1.0)[:, None], centres)
        return centres

    # ------------------------------------------------------------------ helpers
    def straight_through(self, x: Tensor, prefix_sums: Tensor, depth: int | Tensor) -> Tensor:
        """``x + sg(q_depth - x)``: the value of the ``depth``-stage prefix, the gradient of ``x``.

        ``depth`` is an int in ``1..D`` or a LongTensor with one depth per sample
        (``x.shape[0]`` of them; quantizer dropout).
        """
        if prefix_sums.shape[0] != self.num_stages or prefix_sums.shape[1:] != x.shape:
            raise ValueError(
                f"prefix_sums must have shape ({self.num_stages}, *{tuple(x.shape)}), got {tuple(prefix_sums.shape)}"
            )
        if isinstance(depth, Tensor):
            integer = not (depth.is_floating_point() or depth.dtype == torch.bool)
            if depth.dim() != 1 or depth.shape[0] != x.shape[0] or not integer:
                raise ValueError(
                    f"per-sample depth must be an integer tensor of shape ({x.shape[0]},), "
                    f"got {depth.dtype} {tuple(depth.shape)}"
                )
            depth = depth.to(x.device, torch.long)
            in_range = ((depth >= 1) & (depth <= self.num_stages)).all()
            torch._assert_async(in_range, f"depth must be in 1..{self.num_stages}")  # no host sync on CUDA
            index = (depth - 1).view(1, -1, *([1] * (x.dim() - 1))).expand(1, *x.shape)
            quantized = torch.gather(prefix_sums, 0, index)[0]
        else:
            quantized = prefix_sums[self._check_depth(depth) - 1]
        return x + (quantized.to(x.dtype) - x).detach()

    def codes_to_latent(self, codes: Tensor, depth: int | Tensor | None = None) -> Tensor:
        """Prefix sum of the first ``depth`` stages for codes ``... D'`` (``D' ≥ depth``) -> ``... d``.

        ``depth`` is an int (default: ``D'``) or a per-sample LongTensor over ``codes.shape[0]``.
        Summed in the same order as the forward pass, so it equals ``prefix_sums`` exactly.
        """
        if codes.dtype not in (torch.int32, torch.int64) or codes.dim() < 1:
            raise ValueError(
                f"codes must be an integer tensor of shape (..., stages), got {codes.dtype} {tuple(codes.shape)}"
            )
        if codes.shape[-1] > self.num_stages:
            raise ValueError(f"codes have {codes.shape[-1]} stages, the quantizer has {self.num_stages}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        codes = codes.to(self.embed.device, torch.long)
        per_sample: Tensor | None = None
        if isinstance(depth, Tensor):
            if depth.dim() != 1 or depth.shape[0] != codes.shape[0]:
                raise ValueError(f"per-sample depth must have shape ({codes.shape[0]},), got {tuple(depth.shape)}")
            per_sample = depth.to(codes.device, torch.long)
            if int(per_sample.min()) < 1 or int(per_sample.max()) > codes.shape[-1]:
                raise ValueError(f"depth must be in 1..{codes.shape[-1]}")
            stages = int(per_sample.max())
        else:
            stages = codes.shape[-1] if depth is None else self._check_depth(depth)
            if stages > codes.shape[-1]:
                raise ValueError(f"depth {stages} needs at least {stages} codes per position, got {codes.shape[-1]}")
        latent = torch.zeros(*codes.shape[:-1], self.dim, device=codes.device)
        for i in range(stages):
            chosen = F.embedding(codes[..., i], self.embed[i])
            if per_sample is not None:
                keep = (per_sample > i).view(-1, *([1] * (codes.dim() - 1)))
                chosen = torch.where(keep, chosen, torch.zeros_like(chosen))
            latent = latent + chosen
        return latent

    def _check_depth(self, depth: int) -> int:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= self.num_stages:
            raise ValueError(f"depth must be an int in 1..{self.num_stages}, got {depth!r}")
        return depth

    @torch.no_grad()
    def codebook_stats(self) -> dict[str, Tensor]:
        """Per-stage codebook health (tensors of shape ``D``, on the codebooks' device).

        ``usage``: fraction of codes with EMA count ≥ ``dead_threshold``; ``perplexity``: exp of
        the entropy of the EMA usage distribution (``K`` when uniform); ``dead_codes``: codes with
        EMA count < ``dead_threshold``; ``batch_usage``: fraction of codes chosen at least once in
        the last forward (this rank's batch); ``restarted``: codes restarted at the last update.
        """
        alive = self.cluster_size >= self.dead_threshold
        probs = self.cluster_size / self.cluster_size.sum(-1, keepdim=True).clamp_min(1e-30)
        entropy = -torch.special.xlogy(probs, probs).sum(-1)
        return {
            "usage": alive.float().mean(-1),
            "perplexity": entropy.exp(),
            "dead_codes": (~alive).sum(-1),
            "batch_usage": self.batch_usage.clone(),
            "restarted": self.restarted.clone(),
        }


def _forget_initted_cache(module: nn.Module, incompatible_keys: object) -> None:
    if isinstance(module, ResidualQuantizer):
        module._initted_seen = False
