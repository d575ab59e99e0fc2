"""The depth transformer: from the LM's hidden state at one grid position, the ``L`` codes of
that position one stage after another (RQ-Transformer style).

Input at stage ``j``: ``c + stage_pos[j] + code_emb[j-1](k_{j-1})`` (no code term at ``j = 0``),
where ``c = proj(hidden) + cell_pos[target cell]``. A few causal layers over the ``L`` stages, then
one output head per stage (each stage has its own codebook): ``head="free"`` learns an output
vector per code, ``head="codebook"`` scores codes by their vectors in the tokenizer
(``evotok.mllm.codebook_head``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codebook_head import CodebookHead
from .config import DEPTH_HEADS


class DepthTransformer(nn.Module):
    def __init__(self, lm_hidden: int, depth: int, codebook_size: int, num_cells: int,
                 width: int = 256, layers: int = 2, heads: int = 4, head: str = "free",
                 code_dim: int | None = None, head_width: int = 128):
        super().__init__()
        if head not in DEPTH_HEADS:
            raise ValueError(f"head must be one of {DEPTH_HEADS}, got {head!r}")
        self.depth, self.codebook_size, self.width = depth, codebook_size, width
        self.cond = nn.Sequential(nn.LayerNorm(lm_hidden), nn.Linear(lm_hidden, width))
        self.cell_pos = nn.Embedding(num_cells, width)
        self.stage_pos = nn.Parameter(torch.zeros(depth, width))
        self.code_emb = nn.ModuleList(nn.Embedding(codebook_size, width) for _ in range(depth - 1))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        nn.init.trunc_normal_(self.stage_pos, std=0.02)
        self.code_head: CodebookHead | None = None
        if head == "free":
            self.head_weight = nn.Parameter(torch.zeros(depth, width, codebook_size))
            self.head_bias = nn.Parameter(torch.zeros(depth, codebook_size))
            nn.init.trunc_normal_(self.head_weight, std=0.02)
        else:
            self.use_codebook_head(code_dim, head_width)
        for emb in [self.cell_pos, *self.code_emb]:
            nn.init.trunc_normal_(emb.weight, std=0.02)
        mask = torch.triu(torch.full((depth, depth), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def use_codebook_head(self, code_dim: int | None, head_width: int = 128) -> None:
        """Score codes by their tokenizer vectors from now on (a new head; the free one, if any, is
        dropped). Its codebooks come from :meth:`CodebookHead.set_codebooks`."""
        if code_dim is None:
            raise ValueError("the codebook head needs the tokenizer's code_dim")
        self.register_parameter("head_weight", None)
        self.register_parameter("head_bias", None)
        like = self.stage_pos
        self.code_head = CodebookHead(self.width, self.depth, self.codebook_size, code_dim, head_width).to(
            like.device, like.dtype)

    def _logits(self, out: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        """Outputs ``N L W`` -> ``N L K`` (all stages), or ``N W`` -> ``N K`` at ``stage``."""
        if self.code_head is not None:
            return self.code_head(out) if stage is None else self.code_head.stage_logits(out, stage)
        if stage is None:
            return torch.einsum("nlw,lwk->nlk", out, self.head_weight) + self.head_bias
        return out @ self.head_weight[stage] + self.head_bias[stage]

    def _inputs(self, hidden: torch.Tensor, cells: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``N H``, ``N``, ``N j`` (j < depth codes known) -> ``N (j+1) width`` stage inputs."""
        c = self.cond(hidden) + self.cell_pos(cells)
        steps = [c + self.stage_pos[0]]
        for j in range(codes.shape[1]):
            steps.append(c + self.stage_pos[j + 1] + self.code_emb[j](codes[:, j]))
        return torch.stack(steps, dim=1)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        return self.norm(self.blocks(x, mask=self.causal_mask[:n, :n], is_causal=True))

    def forward(self, hidden: torch.Tensor, cells: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every stage: ``N H``, ``N``, ``N L`` -> ``N L K``."""
        if codes.shape[1] != self.depth:
            raise ValueError(f"expected {self.depth} codes per position, got {codes.shape[1]}")
        return self._logits(self._run(self._inputs(hidden, cells, codes[:, :-1])))

    def start(self, hidden: torch.Tensor, cells: torch.Tensor) -> "DepthCache":
        """Begin sampling one position's stages with cached keys and values (:class:`DepthCache`):
        the same logits as :meth:`next_logits`, but each stage runs only its own input through the
        layers instead of every stage before it again."""
        return DepthCache(self, self.cond(hidden) + self.cell_pos(cells))

    def next_logits(self, hidden: torch.Tensor, cells: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Logits of stage ``j = prefix.shape[1]`` given the codes of stages ``< j``: ``N K``."""
        j = prefix.shape[1]
        if j >= self.depth:
            raise ValueError(f"all {self.depth} stages are already known")
        return self._logits(self._run(self._inputs(hidden, cells, prefix))[:, -1], j)


class DepthCache:
    """One position's stages sampled one at a time, each layer's keys and values kept.

    ``logits()`` gives the current stage's logits (``N K``) and ``feed(codes)`` adds that stage's
    drawn codes (``N``). A step computes what the layers compute for its stage alone, by their own
    weights (pre-norm self-attention and feed-forward of ``nn.TransformerEncoderLayer``): the stage
    attends to the cached stages before it, which is what the causal mask lets it see in
    :meth:`DepthTransformer.next_logits`.
    """

    def __init__(self, depth: DepthTransformer, conditioning: torch.Tensor):
        self.depth, self.c = depth, conditioning
        self.stage = 0
        self.keys: list[torch.Tensor | None] = [None] * len(depth.blocks.layers)
        self.values: list[torch.Tensor | None] = [None] * len(depth.blocks.layers)
        self._out = self._run(conditioning + depth.stage_pos[0])

    def logits(self) -> torch.Tensor:
        return self.depth._logits(self._out, self.stage)

    def feed(self, codes: torch.Tensor) -> None:
        d = self.depth
        if self.stage + 1 >= d.depth:
            raise ValueError(f"all {d.depth} stages are already known")
        x = self.c + d.stage_pos[self.stage + 1] + d.code_emb[self.stage](codes)
        self.stage += 1
        self._out = self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """One stage's input ``N W`` through every layer and the final norm."""
        x = x[:, None]
        for i, layer in enumerate(self.depth.blocks.layers):
            attn = layer.self_attn
            heads = attn.num_heads
            q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # N heads 1 d
            if self.keys[i] is not None:
                k, v = torch.cat([self.keys[i], k], 2), torch.cat([self.values[i], v], 2)
            self.keys[i], self.values[i] = k, v
            mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + attn.out_proj(mixed)
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        return self.depth.norm(x[:, 0])
