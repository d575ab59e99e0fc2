"""Fused nearest-code search in Triton: distance matmul + running argmax, never writing N×K.

One program owns ``BLOCK_N`` rows of ``x`` (loaded once, kept in registers) and a contiguous
range of codes. It walks that range in tiles of ``BLOCK_K`` codes: ``tl.dot`` gives the
BLOCK_N×BLOCK_K tile of ``x·c``, the score is ``2 x·c - ||c||²``, and a per-row running maximum
and its index are kept on chip. Ties go to the lowest index: ``tl.max(..., return_indices=True)``
breaks ties to the left inside a tile, and a later tile replaces the running best only when it is
strictly greater.

When the row blocks alone would leave the GPU's multiprocessors idle (e.g. 8,192 rows in blocks
of 64 on a 132-SM H200), the code range is split across a second grid axis; each split writes
its (best score, index) pair and a tiny torch reduction picks, per row, the first split holding
the maximum — which keeps the lowest-index rule because splits are ordered by code.

Precision (``tl.dot``'s ``input_precision``): ``"fp32"`` → ``"ieee"``, ``"tf32"`` → ``"tf32"``,
``"tf32x3"`` → ``"tf32x3"``; ``"bf16"`` casts both operands to bfloat16 and accumulates in fp32.

This module imports without Triton; calling ``nearest_code_triton`` then raises. With
``TRITON_INTERPRET=1`` set before the first call, the kernel runs in Triton's interpreter on CPU
tensors (slow; for tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from torch import Tensor

from evotok.kernels import triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

MAX_DIM = 256
_DOT_PRECISION = {"fp32": "ieee", "tf32": "tf32", "tf32x3": "tf32x3", "bf16": "ieee"}


def _nearest_kernel(
    x_ptr,
    c_ptr,
    cn_ptr,
    best_ptr,
    idx_ptr,
    n_rows,
    n_codes,
    codes_per_split,
    stride_x,
    stride_c,
    DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CAST_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < DIM

    x = tl.load(x_ptr + rows[:, None] * stride_x + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if CAST_BF16:
        x = x.to(tl.bfloat16)

    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    k_begin = pid_s * codes_per_split
    k_end = tl.minimum(k_begin + codes_per_split, n_codes)
    for k0 in range(k_begin, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < k_end
        c = tl.load(
            c_ptr + codes[None, :] * stride_c + dims[:, None], mask=dim_ok[:, None] & code_ok[None, :], other=0.0
        )
        norms = tl.load(cn_ptr + codes, mask=code_ok, other=float("inf"))
        if CAST_BF16:
            dots = tl.dot(x, c.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            dots = tl.dot(x, c, input_precision=DOT_PRECISION)
        scores = 2.0 * dots - norms[None, :]
        tile_best, tile_idx = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx.to(tl.int64) + k0, best_idx)

    out = pid_s * n_rows + rows
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(idx_ptr + out, best_idx, mask=row_ok)


_compiled: dict[bool, Any] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel() -> Any:
    """The jitted kernel, built on first use so that ``TRITON_INTERPRET`` set by then applies."""
    mode = _interpreting()
    if mode not in _compiled:
        _compiled[mode] = triton.jit(_nearest_kernel)
    return _compiled[mode]


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_sizes(dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D, num_warps) by code width; register budget ~ BLOCK_N×BLOCK_K."""
    block_d = max(16, 1 << (dim - 1).bit_length())
    if block_d <= 64:
        return 64, 128, block_d, 4
    if block_d <= 128:
        return 64, 64, block_d, 4
    return 32, 64, block_d, 4


def nearest_code_triton(
    x: Tensor,
    codebook: Tensor,
    codebook_sq_norms: Tensor,
    *,
    precision: str = "fp32",
    block_n: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """Fused search; ``x`` N×d, ``codebook`` K×d, ``codebook_sq_norms`` K (all fp32, same device).

    Use ``evotok.nearest.nearest_code``, which validates inputs and picks the backend; the block
    sizes and split count are exposed here for tests and tuning.
    """
    if not triton_available():
        raise RuntimeError("the Triton nearest-code kernel needs the `triton` package (pip install triton)")
    if precision not in _DOT_PRECISION:
        raise ValueError(f"precision must be one of {tuple(_DOT_PRECISION)}, got {precision!r}")
    if not x.is_cuda and not _interpreting():
        raise RuntimeError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)")
    n, dim = x.shape
    k = codebook.shape[0]
    if dim > MAX_DIM:
        raise ValueError(f"the Triton kernel supports d <= {MAX_DIM}, got d={dim}; use backend='torch'")
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)

    x = x.float().contiguous()
    codebook = codebook.float().contiguous()
    norms = codebook_sq_norms.float().contiguous()
    bn, bk, bd, warps = _block_sizes(dim)
    bn, bk = block_n or bn, block_k or bk
    row_blocks = triton.cdiv(n, bn)
    code_tiles = triton.cdiv(k, bk)
    if num_splits is None:
        sms = _multiprocessors(x.device.index or 0) if x.is_cuda else 1
        num_splits = triton.cdiv(4 * sms, row_blocks)
    num_splits = max(1, min(num_splits, code_tiles))
    codes_per_split = triton.cdiv(code_tiles, num_splits) * bk
    num_splits = triton.cdiv(k, codes_per_split)

    best = torch.empty(num_splits, n, dtype=torch.float32, device=x.device)
    idx = torch.empty(num_splits, n, dtype=torch.int64, device=x.device)
    launch: dict[str, Any] = {} if _interpreting() else {"num_warps": warps, "num_stages": 3}
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _kernel()[(row_blocks, num_splits)](
            x,
            codebook,
            norms,
            best,
            idx,
            n,
            k,
            codes_per_split,
            x.stride(0),
            codebook.stride(0),
            DIM=dim,
            BLOCK_N=bn,
            BLOCK_K=bk,
            BLOCK_D=bd,
            DOT_PRECISION=_DOT_PRECISION[precision],
            CAST_BF16=precision == "bf16",
            **launch,
        )
    if num_splits == 1:
        return idx[0]
    first_best_split = best.argmax(dim=0, keepdim=True)  # first maximum = lowest code range
    return idx.gather(0, first_best_split)[0]
