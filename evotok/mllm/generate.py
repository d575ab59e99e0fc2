"""Sampling for the multimodal model: image codes position by position (classifier-free guidance
at every depth, temperature, top-k, top-p, a seeded generator, the LM's KV cache) and text answers
token by token (streamed)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from .chat import encode_chat, encode_generation, plan_prefix
from .layout_plan import anchor_row, closed_entry_cell, parse_plan, plan_text
from .plan_canvas import canvas_ids, stack_canvases
from .plan_guidance import PlaceMix, RegionMix, moved_plan, object_prompt, region_weights
from .prompt_parts import attribute_parts

if TYPE_CHECKING:
    from .model import EvoTokMLLM


SINGLE_THREAD_MAX_HIDDEN = 1024


@contextmanager
def thread_scope(model: "EvoTokMLLM", cpu_threads: int | None):
    """Intra-op threads for step-by-step decoding on CPU.

    Decoding runs thousands of tiny ops (one position, batch 1-2); for a small LM, waking extra
    threads costs more than they give, and stalls badly when other processes share the cores
    (measured here: one bundled-size image 12.6 s of CPU with 2 threads under load, 0.6 s with 1).
    ``None`` = automatic: one thread for LMs up to ``SINGLE_THREAD_MAX_HIDDEN`` wide, else unchanged.
    The previous setting is restored afterwards.
    """
    if cpu_threads is None and model.config.hidden_size <= SINGLE_THREAD_MAX_HIDDEN:
        cpu_threads = 1
    previous = torch.get_num_threads()
    if model.device.type != "cpu" or cpu_threads is None or cpu_threads == previous:
        yield
        return
    if cpu_threads < 1:
        raise ValueError(f"cpu_threads must be ≥ 1, got {cpu_threads}")
    torch.set_num_threads(int(cpu_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   guidance_scale: float | None = None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0 or None = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if guidance_scale is not None and guidance_scale < 0:
        raise ValueError(f"guidance_scale must be ≥ 0, got {guidance_scale}")


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``N K`` logits: greedy at temperature 0, else from the top-k/top-p
    filtered softmax (the most likely index always survives the filters)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(top_k), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def left_pad(seqs: Sequence[Sequence], pad, device: torch.device, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad lists to one tensor; the attention mask is 0 on padding."""
    length = max(len(s) for s in seqs)
    values = torch.tensor([[pad] * (length - len(s)) + list(s) for s in seqs], dtype=dtype, device=device)
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return values, mask


def right_pad(seqs: Sequence[Sequence], pad, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids to one tensor; the attention mask is 0 on padding."""
    length = max(len(s) for s in seqs)
    values = torch.tensor([list(s) + [pad] * (length - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs], dtype=torch.long, device=device)
    return values, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


class _Stepper:
    """Runs the LM one position at a time, with its KV cache or (for checking) without it.

    ``cell_index`` (``B L``, -1 on text) marks the grid cells of the start; :meth:`step` takes the
    cell index of the appended position (``None``: text)."""

    def __init__(self, model: "EvoTokMLLM", embeds: torch.Tensor, mask: torch.Tensor, use_cache: bool,
                 cell_index: torch.Tensor | None = None):
        self.model, self.use_cache = model, use_cache
        self.mask, self.positions, self.embeds = mask, positions_of(mask), embeds
        self.cells = cell_index if cell_index is not None else torch.full_like(mask, -1)
        hidden, self.cache = model.backbone(embeds, mask, self.positions, use_cache=use_cache, cell_index=self.cells)
        self.last = hidden[:, -1]

    def step(self, embed: torch.Tensor, cell: int | None = None) -> torch.Tensor:
        """Append one input embedding per row (``B H``); returns the new last hidden state."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        new_pos = self.positions[:, -1:] + 1
        new_cell = torch.full_like(new_pos, -1 if cell is None else cell)
        self.positions = torch.cat([self.positions, new_pos], 1)
        self.cells = torch.cat([self.cells, new_cell], 1)
        if self.use_cache:
            hidden, self.cache = self.model.backbone(embed[:, None], self.mask, new_pos, cache=self.cache,
                                                     use_cache=True, cell_index=new_cell)
        else:
            self.embeds = torch.cat([self.embeds, embed[:, None]], 1)
            hidden, _ = self.model.backbone(self.embeds, self.mask, self.positions, cell_index=self.cells)
        self.last = hidden[:, -1]
        return self.last


# ---------------------------------------------------------------------------- images
@torch.no_grad()
def generate_image_codes(model: "EvoTokMLLM", prompts: Sequence[str], guidance_scale: float | None = 3.0,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         seed: int | None = None, callback: Callable[[int, torch.Tensor], None] | None = None,
                         use_cache: bool = True, logits_trace: list | None = None,
                         cpu_threads: int | None = None, attribute_guidance: float | None = None,
                         plan_trace: list | None = None, region_guidance: float | None = None,
                         place_guidance: float | None = None, branch_trace: list | None = None,
                         depth_cache: bool = True) -> torch.Tensor:
    """Codes ``b h w L`` for ``prompts``; see :meth:`EvoTokMLLM.generate_image`.

    With guidance the batch holds ``b`` conditional rows then ``b`` unconditional (empty prompt)
    rows; every branch receives the same sampled codes. ``attribute_guidance`` (needs
    ``guidance_scale``) adds two branches between them, each prompt's shapes alone and colours
    alone (:func:`evotok.mllm.prompt_parts.attribute_parts`; the empty prompt where it names no
    coloured shape), and mixes ``u + g (c - u) + a ((s - u) + (k - u))``: a product of experts in
    which each attribute word pulls on its own. ``logits_trace`` (a list) collects the mixed
    logits of every sampling step (for tests). ``use_cache``: the LM's KV cache and, unless
    ``depth_cache`` is False, the depth transformer's (:class:`evotok.mllm.depth_transformer.DepthCache`);
    without the latter each stage re-runs every stage before it (for benchmarks). ``branch_trace``
    (a list) receives one tensor ``branches · b × cells × L``, rows in the batch's order: each
    branch's own log-probability (temperature 1, unmixed) of every code drawn.

    A model with ``config.layout_plan`` first writes each prompt's plan (greedily,
    :func:`write_plans`), and the conditional branch draws after it; the unconditional branch has
    neither prompt nor plan, as in training. ``plan_trace`` (a list) receives the plans' texts.
    ``place_guidance`` and ``region_guidance`` (such a model, with ``guidance_scale``; one or the
    other) lean on where the plan puts each object (:mod:`evotok.mllm.plan_guidance`).
    """
    check_sampling(temperature, top_k, top_p, guidance_scale)
    for name, value in (("place_guidance", place_guidance), ("region_guidance", region_guidance)):
        if value is not None:
            if not model.config.layout_plan:
                raise ValueError(f"{name} leans on the layout plan: it needs a model that writes layout plans")
            if guidance_scale is None:
                raise ValueError(f"{name} mixes guidance branches: give a guidance_scale too")
            if value < 0:
                raise ValueError(f"{name} must be ≥ 0, got {value}")
    if place_guidance is not None and region_guidance is not None:
        raise ValueError("give place_guidance or region_guidance, not both")
    if attribute_guidance is not None:
        if model.config.layout_plan:
            raise ValueError("attribute_guidance is not available for a model that writes layout plans")
        if guidance_scale is None:
            raise ValueError("attribute_guidance mixes guidance branches: give a guidance_scale too")
        if attribute_guidance < 0:
            raise ValueError(f"attribute_guidance must be ≥ 0, got {attribute_guidance}")
    if not prompts:
        raise ValueError("give at least one prompt (an empty string means unconditional generation)")
    cfg, tok, n = model.config, model.text, model.config.num_cells
    b = len(prompts)
    branches = [list(prompts)]
    if attribute_guidance is not None:
        parts = [attribute_parts(p) or ("", "") for p in prompts]
        branches += [[s for s, _ in parts], [k for _, k in parts]]
    if guidance_scale is not None:
        branches.append([""] * b)
    seqs = [encode_generation(tok, p, n, cfg.max_prompt_tokens, include_grid=False).input_ids
            for branch in branches for p in branch]
    mix = LogitMix(b, guidance_scale, attribute_guidance)
    anchors = canvas = None
    with thread_scope(model, cpu_threads):
        if cfg.layout_plan:
            plans = write_plans(model, prompts, use_cache)
            prefixes = [plan_prefix(tok, p, cfg.max_prompt_tokens).input_ids for p in prompts]
            seqs[:b] = [prefix + plan + [tok.ids["boi"]] if p.strip() else seqs[k]
                        for k, (p, prefix, plan) in enumerate(zip(prompts, prefixes, plans))]
            anchor_rows = [anchor_row([tok.decode([i]) for i in plan], len(prefix), len(seqs[k]), cfg.grid_size)
                           for k, (prefix, plan) in enumerate(zip(prefixes, plans))]
            anchor_rows += [[-1] * len(seq) for seq in seqs[b:]]
            planned = [parse_plan(tok.decode(plan), cfg.grid_size) or [] for plan in plans]
            row_plans = planned + [[]] * (len(seqs) - b)  # the unconditional rows draw without a plan
            if place_guidance is not None or region_guidance is not None:
                extra, mix = plan_guidance_branches(model, prompts, planned, seqs, anchor_rows, guidance_scale,
                                                    place_guidance, region_guidance)
                seqs[b:b] = [seq for seq, _, _ in extra]  # between the prompts' rows and the unconditional ones
                anchor_rows[b:b] = [row for _, row, _ in extra]
                row_plans[b:b] = [entries for _, _, entries in extra]
            if cfg.plan_anchors:
                anchors = left_pad(anchor_rows, -1, model.device)[0]
            if cfg.plan_canvas:
                canvas = model.canvas_vectors(stack_canvases([canvas_ids(p, cfg.grid_size) for p in row_plans], n))
            if plan_trace is not None:
                plan_trace.extend(tok.decode(plan).strip() for plan in plans)
        ids, mask = left_pad(seqs, tok.ids["pad"], model.device)
        return _sample_grid(model, ids, mask, mix, temperature, top_k, top_p, seed, callback, use_cache,
                            logits_trace, anchors, canvas, branch_trace, depth_cache)


def plan_guidance_branches(model: "EvoTokMLLM", prompts: Sequence[str], planned: Sequence[Sequence],
                           seqs: Sequence[list[int]], anchor_rows: Sequence[list[int]], guidance_scale: float,
                           place_guidance: float | None, region_guidance: float | None):
    """The rows place or region guidance adds (sequence, anchor row and plan entries each) and the
    mix that reads them (:mod:`evotok.mllm.plan_guidance`). ``seqs`` and ``anchor_rows``: the
    prompts' rows with their written plans, then the unconditional ones; ``planned``: the parsed plans."""
    b, grid = len(prompts), model.config.grid_size
    if place_guidance is not None:  # a prompt without a plan to move contrasts with itself
        moved = [(*planned_sequence(model, p, plan_text(moved_plan(entries, grid))), moved_plan(entries, grid))
                 if entries else (seqs[k], anchor_rows[k], entries)
                 for k, (p, entries) in enumerate(zip(prompts, planned))]
        return moved, PlaceMix(b, guidance_scale, place_guidance)
    weights = region_weights(planned, grid).to(model.device)  # read at every sampling step
    return object_branches(model, planned, weights.shape[-1], seqs[-1]), RegionMix(b, guidance_scale,
                                                                                    region_guidance, weights)


def planned_sequence(model: "EvoTokMLLM", prompt: str, plan: str) -> tuple[list[int], list[int]]:
    """A drawing's sequence up to ``<boi>`` with ``plan`` written after ``prompt``, and its
    ``anchor_cells`` row."""
    cfg, tok = model.config, model.text
    encoded = encode_generation(tok, prompt, cfg.num_cells, cfg.max_prompt_tokens, include_grid=False, plan=plan)
    return encoded.input_ids, encoded_anchor_row(model, encoded, plan)


def encoded_anchor_row(model: "EvoTokMLLM", encoded, plan: str) -> list[int]:
    """The ``anchor_cells`` row of a sequence from :func:`evotok.mllm.chat.encode_generation` with
    ``plan`` (its entries' closing tokens anchored to their cells)."""
    pieces = [model.text.decode([t]) for t in model.text.encode(plan)]
    return anchor_row(pieces, encoded.answer_starts[0], len(encoded), model.config.grid_size)


def object_branches(model: "EvoTokMLLM", planned: Sequence[Sequence], m: int,
                    unconditional: list[int]) -> list[tuple[list[int], list[int], list]]:
    """Region guidance's ``m`` object branches, ``len(planned)`` rows each (sequence, anchor row
    and plan entries): entry ``i`` of each plan after its object's prompt, or the ``unconditional``
    sequence where a plan has fewer entries."""
    return [(*planned_sequence(model, object_prompt(plan[i]), plan[i].text()), [plan[i]]) if i < len(plan)
            else (unconditional, [-1] * len(unconditional), []) for i in range(m) for plan in planned]


@torch.no_grad()
def write_plans(model: "EvoTokMLLM", prompts: Sequence[str], use_cache: bool = True) -> list[list[int]]:
    """The layout plan (``evotok.mllm.layout_plan``) each prompt's drawing starts with, written
    greedily up to ``<boi>`` or ``config.max_plan_tokens``: token ids, ``[]`` for an empty prompt.
    With ``config.plan_anchors`` each token that closes an entry is fed back with its cell's
    position vector, as in training."""
    cfg, tok, device = model.config, model.text, model.device
    seqs = [plan_prefix(tok, p, cfg.max_prompt_tokens).input_ids for p in prompts]
    ids, mask = left_pad(seqs, tok.ids["pad"], device)
    stepper = _Stepper(model, model.embed_inputs(ids), mask, use_cache)
    banned = [v for k, v in tok.ids.items() if k != "boi"]
    done = torch.tensor([not p.strip() for p in prompts], device=device)
    plans: list[list[int]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    for _ in range(cfg.max_plan_tokens):
        if bool(done.all()):
            break
        logits = model.text_logits(stepper.last)
        logits[:, banned] = float("-inf")
        token = logits.argmax(-1)
        done |= token == tok.ids["boi"]
        anchors = torch.full_like(token, -1)
        for i in torch.nonzero(~done).flatten().tolist():
            plans[i].append(int(token[i]))
            texts[i] += tok.decode([int(token[i])])
            if cfg.plan_anchors:
                anchors[i] = closed_entry_cell(texts[i], cfg.grid_size)
        stepper.step(model.embed_inputs(token[:, None], anchor_cells=anchors[:, None])[:, 0])
    return plans


class LogitMix:
    """How the branches' logits (``branches · b`` rows, in the order above) become one row per image."""

    def __init__(self, b: int, guidance_scale: float | None, attribute_guidance: float | None = None):
        self.b, self.guidance_scale, self.attribute_guidance = b, guidance_scale, attribute_guidance
        self.branches = 1 + (guidance_scale is not None) + 2 * (attribute_guidance is not None)

    def __call__(self, logits: torch.Tensor, cell: int | None = None) -> torch.Tensor:
        """The same mix at every cell (``cell`` is for mixes that vary over the grid)."""
        if self.guidance_scale is None:
            return logits
        rows = logits.float().split(self.b)
        cond, uncond = rows[0], rows[-1]
        mixed = uncond + self.guidance_scale * (cond - uncond)
        if self.attribute_guidance is not None:
            mixed = mixed + self.attribute_guidance * ((rows[1] - uncond) + (rows[2] - uncond))
        return mixed


def _sample_grid(model: "EvoTokMLLM", ids: torch.Tensor, mask: torch.Tensor, mix: LogitMix,
                 temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                 callback: Callable[[int, torch.Tensor], None] | None, use_cache: bool,
                 logits_trace: list | None, anchor_cells: torch.Tensor | None = None,
                 canvas: torch.Tensor | None = None, branch_trace: list | None = None,
                 depth_cache: bool = True) -> torch.Tensor:
    """``canvas`` (``rows × cells × hidden``, :meth:`EvoTokMLLM.canvas_vectors`): added to the input
    that draws each cell, ``<boi>`` (the last position of the left-padded rows) for the first.
    ``branch_trace``, ``depth_cache``: see :func:`generate_image_codes`."""
    cfg, device = model.config, model.device
    n, depth, grid = cfg.num_cells, cfg.pixel_depth, cfg.grid_size
    b, branches = mix.b, mix.branches
    embeds = model.embed_inputs(ids, anchor_cells=anchor_cells)
    if canvas is not None:
        embeds = torch.cat([embeds[:, :-1], embeds[:, -1:] + canvas[:, :1].to(embeds.dtype)], 1)
    stepper = _Stepper(model, embeds, mask, use_cache)
    generator = make_generator(seed, device)
    codes = torch.zeros(b, n, depth, dtype=torch.long, device=device)
    positions = model.cell_positions()
    branch_log_probs = torch.zeros(b * branches, n, depth) if branch_trace is not None else None
    for cell in range(n):
        hidden = stepper.last
        cells = torch.full((hidden.shape[0],), cell, dtype=torch.long, device=device)
        prefix = torch.zeros(b, 0, dtype=torch.long, device=device)
        stages = model.depth.start(hidden, cells) if use_cache and depth_cache else None
        for stage in range(depth):
            raw = model.depth.next_logits(hidden, cells, prefix.repeat(branches, 1)) if stages is None \
                else stages.logits()
            logits = mix(raw, cell)
            if logits_trace is not None:
                logits_trace.append(logits.float().cpu())
            drawn = sample_logits(logits, temperature, top_k, top_p, generator)
            every_row = drawn.repeat(branches)  # each branch continues from the same codes
            if branch_log_probs is not None:
                branch_log_probs[:, cell, stage] = raw.float().log_softmax(-1).gather(-1, every_row[:, None])[:, 0].cpu()
            prefix = torch.cat([prefix, drawn[:, None]], 1)
            if stages is not None and stage + 1 < depth:
                stages.feed(every_row)
        codes[:, cell] = prefix
        if cell + 1 < n:
            latent = model.code_latents(prefix)
            embed = (model.latent_in(latent.to(stepper.last.dtype)) + positions[cell]).repeat(branches, 1)
            if canvas is not None:
                embed = embed + canvas[:, cell + 1].to(embed.dtype)
            stepper.step(embed, cell=cell)
        if callback is not None and (cell + 1) % grid == 0:
            callback((cell + 1) // grid, codes.view(b, grid, grid, depth).clone())
    if branch_trace is not None:
        branch_trace.append(branch_log_probs)
    return codes.view(b, grid, grid, depth)


# ---------------------------------------------------------------------------- text
def _banned_ids(model: "EvoTokMLLM") -> list[int]:
    ids = model.text.ids
    return [v for k, v in ids.items() if k not in ("end", "eos")]


def _image_batch(model: "EvoTokMLLM", image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a tensor 3×H×W in [-1, 1] (see evotok.images.pil_to_tensor), "
                        f"got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"answer takes one image, 3×H×W or 1×3×H×W; got {tuple(image.shape)}")
    return image


@torch.no_grad()
def stream_answer(model: "EvoTokMLLM", image: torch.Tensor | None, question: str,
                  history: Sequence[tuple[str, str]] = (), max_new_tokens: int = 32, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  use_cache: bool = True, cpu_threads: int | None = None) -> Iterator[str]:
    """Text pieces of the answer as they are produced; see :meth:`EvoTokMLLM.answer`.

    All checks (empty or too-long question, bad image) run before the first piece is asked for.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    cfg, tok, device = model.config, model.text, model.device
    turns = [(str(q), str(a)) for q, a in history] + [(question, None)]
    n_image = cfg.num_cells if image is not None else 0
    encoded = encode_chat(tok, turns, n_image, cfg.max_prompt_tokens)
    image = _image_batch(model, image) if image is not None else None
    ids = torch.tensor([encoded.input_ids], device=device)
    image_mask = torch.tensor([encoded.image_mask], device=device)
    with thread_scope(model, cpu_threads):
        features = model.image_features(model.encode_images(image)) if image is not None else None
        embeds = model.embed_inputs(ids, image_mask, features)
    return _stream(model, embeds, model.cell_index(image_mask), max_new_tokens, temperature, top_k, top_p, seed,
                   use_cache, cpu_threads)


@torch.no_grad()
def _stream(model: "EvoTokMLLM", embeds: torch.Tensor, cell_index: torch.Tensor | None, max_new_tokens: int,
            temperature: float, top_k: int | None, top_p: float | None, seed: int | None, use_cache: bool,
            cpu_threads: int | None) -> Iterator[str]:
    tok, device = model.text, model.device
    stop = {tok.ids["end"], tok.ids["eos"]}
    banned = _banned_ids(model)
    generator = make_generator(seed, device)
    with thread_scope(model, cpu_threads):
        stepper = _Stepper(model, embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=device), use_cache,
                           cell_index)
    out: list[int] = []
    shown = ""
    for i in range(max_new_tokens):
        with thread_scope(model, cpu_threads):
            logits = model.text_logits(stepper.last)
            logits[:, banned] = float("-inf")
            token = int(sample_logits(logits, temperature, top_k, top_p, generator)[0])
        if token in stop:
            break
        out.append(token)
        text = tok.decode(out)
        if not text.endswith("\ufffd") and text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]  # pieces leave the thread scope: the caller runs with its own setting
            shown = text
        if i + 1 < max_new_tokens:
            with thread_scope(model, cpu_threads):
                stepper.step(model.lm.get_input_embeddings()(torch.tensor([token], device=device)))
    text = tok.decode(out)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]


@torch.no_grad()
def batch_answers(model: "EvoTokMLLM", images: torch.Tensor | None, questions: Sequence[str],
                  max_new_tokens: int = 32, image_codes: torch.Tensor | None = None,
                  cpu_threads: int | None = None) -> list[str]:
    """Greedy single-turn answers for a batch (left-padded, KV-cached)."""
    with thread_scope(model, cpu_threads):
        return _batch_answers(model, images, questions, max_new_tokens, image_codes)


def answer_inputs(model: "EvoTokMLLM", questions: Sequence[str],
                  image_codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-padded single-turn chat inputs ``(embeds, mask, cell_index)`` for a batch of questions,
    each with its image's codes (``b h w D``) when given; the first answer token is read at the last
    position. ``cell_index`` marks the image's grid cells (see :meth:`EvoTokMLLM.backbone`)."""
    cfg, tok, device = model.config, model.text, model.device
    has_image = image_codes is not None
    if has_image and image_codes.shape[0] != len(questions):
        raise ValueError(f"{image_codes.shape[0]} images for {len(questions)} questions")
    encoded = [encode_chat(tok, [(q, None)], cfg.num_cells if has_image else 0, cfg.max_prompt_tokens)
               for q in questions]
    ids, mask = left_pad([e.input_ids for e in encoded], tok.ids["pad"], device)
    image_mask, _ = left_pad([e.image_mask for e in encoded], False, device, torch.bool)
    features = model.image_features(image_codes.to(device)) if has_image else None
    return model.embed_inputs(ids, image_mask, features), mask, model.cell_index(image_mask)


def _batch_answers(model: "EvoTokMLLM", images: torch.Tensor | None, questions: Sequence[str],
                   max_new_tokens: int, image_codes: torch.Tensor | None) -> list[str]:
    tok, device = model.text, model.device
    if image_codes is None and images is not None:
        image_codes = model.encode_images(images)
    embeds, mask, cell_index = answer_inputs(model, questions, image_codes)
    stepper = _Stepper(model, embeds, mask, True, cell_index)
    stop = torch.tensor(sorted({tok.ids["end"], tok.ids["eos"]}), device=device)
    banned = _banned_ids(model)
    done = torch.zeros(len(questions), dtype=torch.bool, device=device)
    answers: list[list[int]] = [[] for _ in questions]
    for _ in range(max_new_tokens):
        logits = model.text_logits(stepper.last)
        logits[:, banned] = float("-inf")
        token = logits.argmax(-1)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        for i in torch.nonzero(~done).flatten().tolist():
            answers[i].append(int(token[i]))
        stepper.step(model.lm.get_input_embeddings()(token))
    return [tok.decode(a).strip() for a in answers]
