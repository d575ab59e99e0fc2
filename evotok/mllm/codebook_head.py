"""An output head for the depth transformer that scores codes by their vectors in the tokenizer.

The free head gives every code of every stage its own output vector, learned only from the
drawings that use that code in training. This head instead scores code ``k`` of stage ``j`` as

    logits_j[k] = q_j(x) · e_j(C_j[k]) + b_j[k]

where ``C_j`` is the frozen image tokenizer's codebook of stage ``j`` (its code vectors, not
learned here), ``e_j`` a small MLP shared by all codes of the stage, ``q_j`` a linear query and
``b_j`` a per-code bias. Codes whose vectors lie close score alike, so what the model learned
about one code carries over to its neighbours in the tokenizer's latent space. That is meant for
drawings of colour-shape pairs never seen together in training: the codes such a drawing needs
exist in training, each in other company.
"""
from __future__ import annotations

import torch
from torch import nn


class CodebookHead(nn.Module):
    """Per-stage logits ``N L K`` from depth-transformer outputs ``N L W``, scored against the
    tokenizer's code vectors, which :meth:`set_codebooks` supplies (not saved with the model:
    they are the tokenizer's own weights, pinned by its digest)."""

    def __init__(self, width: int, depth: int, codebook_size: int, code_dim: int, head_width: int = 128):
        super().__init__()
        self.depth, self.codebook_size, self.code_dim = depth, codebook_size, code_dim
        self.query = nn.Parameter(torch.empty(depth, width, head_width))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.code_mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(code_dim, head_width), nn.GELU(), nn.Linear(head_width, head_width))
            for _ in range(depth))
        self.bias = nn.Parameter(torch.zeros(depth, codebook_size))
        self.register_buffer("codebooks", torch.zeros(depth, codebook_size, code_dim), persistent=False)
        self.codebooks_set = False
        self._frozen_vectors: dict[int, tuple[tuple, torch.Tensor]] = {}

    @torch.no_grad()
    def set_codebooks(self, codebooks: torch.Tensor) -> None:
        """The tokenizer's codebooks of the first ``depth`` stages, ``≥depth K d``. Each stage is
        scaled to unit root-mean-square norm: residual stages' vectors are far shorter than the
        first stage's, and the MLP should see them on one scale."""
        if codebooks.dim() != 3 or codebooks.shape[0] < self.depth or codebooks.shape[1:] != (
                self.codebook_size, self.code_dim):
            raise ValueError(f"expected codebooks of shape (>={self.depth}, {self.codebook_size}, {self.code_dim}), "
                             f"got {tuple(codebooks.shape)}")
        books = codebooks[: self.depth].float()
        rms = books.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-8)
        self.codebooks.copy_((books / rms[:, None, None]).to(self.codebooks.device, self.codebooks.dtype))
        self.codebooks_set = True

    def code_vectors(self, stage: int) -> torch.Tensor:
        """``K head_width``: every code of ``stage`` as the head sees it.

        Outside training (eval mode, no grad) they are computed once and kept until a weight they
        depend on changes (its storage or version): sampling asks for them at every stage of every
        cell, and recomputing them each time made one image about 30% slower on two CPU cores.
        """
        if not self.codebooks_set:
            raise RuntimeError("the codebook head has no codebooks yet; attach the image tokenizer first")
        if self.training or torch.is_grad_enabled():
            return self._code_vectors(stage)
        tensors = (self.codebooks, *self.code_mlp[stage].parameters())
        key = (*((t.data_ptr(), t._version, t.dtype) for t in tensors), self.query.dtype,
               torch.is_autocast_enabled(self.query.device.type))
        kept = self._frozen_vectors.get(stage)
        if kept is None or kept[0] != key:
            kept = (key, self._code_vectors(stage))
            self._frozen_vectors[stage] = kept
        return kept[1]

    def _code_vectors(self, stage: int) -> torch.Tensor:
        return self.code_mlp[stage](self.codebooks[stage].to(self.query.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N L W`` outputs of all ``L`` stages -> ``N L K`` logits."""
        return torch.stack([self.stage_logits(x[:, j], j) for j in range(x.shape[1])], dim=1)

    def stage_logits(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """``N W`` outputs at ``stage`` -> ``N K`` logits."""
        return (x @ self.query[stage]) @ self.code_vectors(stage).T + self.bias[stage]
