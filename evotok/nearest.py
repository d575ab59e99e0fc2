"""Nearest-code search for vector quantisation that never materialises the N×K distance matrix.

``nearest_code(x, codebook)`` returns ``argmin_k ||x_n - c_k||²`` for every row of ``x``. It ranks
codes by the equivalent score ``2 x·c_k - ||c_k||²`` (the ``||x||²`` term is the same for every
code), so the work is one small matrix product per tile plus a running maximum.

Semantics shared by every backend:

* **Ties go to the lowest code index**, as ``torch.argmax`` does: duplicate codes, or codes at
  exactly the same score, resolve to the first one.
* **Equal to the plain fp32 argmin up to near-ties.** The score and the exact distance are the
  same function in exact arithmetic, but in fp32 they round differently; two codes whose
  distances agree to within a few ulps of ``||x||² + ||c||²`` may be ranked either way. The
  expansion also loses precision when ``x`` and the codes share a large common offset compared
  with the distances between them (centre such data first).
* ``precision="fp32"`` is full fp32 arithmetic. ``"tf32"`` and ``"tf32x3"`` let CUDA use tensor
  cores with TF32 inputs (one or three passes); on CPU they are plain fp32. ``"bf16"`` is the
  exact search of ``x`` and the codes rounded to bfloat16 (the norms are those of the rounded
  codes, products accumulate in fp32) on every device, so chosen codes can differ from the fp32
  search wherever distances are close; measure the effect with ``training/bench_quantizer.py``.
* Empty input (``N = 0``) returns an empty ``LongTensor``.

Backends: the fused Triton kernel on CUDA when ``triton`` imports (``evotok.kernels``), else a
chunked torch path (row chunks on CUDA; on CPU, transposed code×row tiles sized for the caches of
two cores, see ``_cpu_search``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")

# CPU tiling, tuned on two AMD EPYC (Zen 4) cores with K = 4096, d = 32, N = 8192 (see
# training/bench_quantizer.py --tune): a transposed K×R score tile of about 2**20 floats
# (4 MiB) per chunk of R rows, and blocks of 32 codes for the two-level argmax.
_CPU_TILE_ELEMENTS = 1 << 20
_CPU_MIN_ROWS = 32
_CPU_MAX_ROWS = 4096
_CPU_CODE_BLOCK = 32

# CUDA fallback (no Triton): row chunks whose N×K score block stays under 64 Mi floats.
_CUDA_TILE_ELEMENTS = 1 << 26


def _check_inputs(x: Tensor, codebook: Tensor, codebook_sq_norms: Tensor | None, precision: str) -> None:
    if x.dim() != 2 or codebook.dim() != 2:
        raise ValueError(
            f"nearest_code expects x of shape N×d and codebook of shape K×d, got {tuple(x.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"dimension mismatch: x has d={x.shape[1]}, codebook has d={codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0)")
    if x.device != codebook.device:
        raise ValueError(f"x is on {x.device} but codebook is on {codebook.device}")
    if codebook_sq_norms is not None and codebook_sq_norms.shape != (codebook.shape[0],):
        raise ValueError(
            f"codebook_sq_norms must have shape ({codebook.shape[0]},), got {tuple(codebook_sq_norms.shape)}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not (x.is_floating_point() and codebook.is_floating_point()):
        raise TypeError("x and codebook must be floating point tensors")


def squared_norms(codebook: Tensor) -> Tensor:
    """``||c_k||²`` for every row of a K×d (or ...×K×d) codebook, in fp32."""
    c = codebook.float()
    return (c * c).sum(-1)


def nearest_code(
    x: Tensor,
    codebook: Tensor,
    codebook_sq_norms: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    precision: str = "fp32",
    backend: str = "auto",
) -> Tensor:
    """Index of the nearest code for every row of ``x``.

    Args:
        x: ``N×d`` queries (any float dtype; searched in fp32).
        codebook: ``K×d`` codes.
        codebook_sq_norms: optional precomputed ``||c_k||²`` (shape ``K``, fp32); pass it when the
            same codebook is searched repeatedly.
        chunk_size: rows of ``x`` per tile (torch paths); ``None`` picks one from ``K``.
        precision: ``"fp32"`` (default), ``"tf32"``, ``"tf32x3"`` or ``"bf16"`` (module docstring).
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"triton"`` or
            ``"torch"`` (the chunked torch path on any device).

    Returns:
        ``LongTensor`` of shape ``N`` on ``x``'s device; ties resolve to the lowest index.
    """
    _check_inputs(x, codebook, codebook_sq_norms, precision)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    n = x.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    x = x.detach().float()
    codebook = codebook.detach().float()
    if precision == "bf16":  # search the rounded inputs exactly; norms of the rounded codes
        x, codebook = _round_bf16(x), _round_bf16(codebook)
        norms = squared_norms(codebook)
    elif codebook_sq_norms is None:
        norms = squared_norms(codebook)
    else:
        norms = codebook_sq_norms.detach().float()

    if backend == "triton" or (backend == "auto" and x.is_cuda and _triton_ready()):
        from evotok.kernels.triton_nearest import nearest_code_triton

        return nearest_code_triton(x, codebook, norms, precision=precision)
    if x.is_cuda:
        with _cuda_matmul_precision(precision):
            return _cuda_search(x, codebook, norms, chunk_size)
    return _cpu_search(x, codebook, norms, chunk_size)


def nearest_code_reference(x: Tensor, codebook: Tensor) -> Tensor:
    """Plain fp32 search: exact pairwise distances (``torch.cdist`` without the matmul expansion)
    and ``argmin``. Materialises N×K; for tests and benchmarks only."""
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    dist = torch.cdist(x.float(), codebook.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.argmin(dim=1)


def _triton_ready() -> bool:
    from evotok.kernels import triton_available

    return triton_available()


def _round_bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).float()


@contextlib.contextmanager
def _cuda_matmul_precision(precision: str) -> Iterator[None]:
    """Temporarily allow or forbid TF32 for CUDA matmuls (restores the caller's setting)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = precision in ("tf32", "tf32x3")
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def _cuda_search(x: Tensor, codebook: Tensor, norms: Tensor, chunk_size: int | None) -> Tensor:
    """Row-chunked ``addmm`` + ``argmax`` (first maximum) for CUDA without Triton."""
    n, k = x.shape[0], codebook.shape[0]
    rows = chunk_size or max(1, _CUDA_TILE_ELEMENTS // k)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    codebook_t = codebook.t()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        scores = torch.addmm(norms, x[start:stop], codebook_t, beta=-1, alpha=2)
        torch.argmax(scores, dim=1, out=out[start:stop])
    return out


def cpu_rows_per_chunk(num_codes: int) -> int:
    """Default rows per CPU tile: a K×R score tile of about ``_CPU_TILE_ELEMENTS`` floats."""
    padded = -(-num_codes // _CPU_CODE_BLOCK) * _CPU_CODE_BLOCK
    rows = _CPU_TILE_ELEMENTS // padded
    rows = min(_CPU_MAX_ROWS, max(_CPU_MIN_ROWS, rows))
    return rows - rows % 16 if rows >= 32 else rows


def _cpu_search(
    x: Tensor, codebook: Tensor, norms: Tensor, chunk_size: int | None, code_block: int = _CPU_CODE_BLOCK
) -> Tensor:
    """Chunked CPU search with a two-level argmax.

    For a chunk of R rows the scores are written transposed, as a K×R tile (``addmm`` into a
    reused buffer), so that every reduction runs over the *outer* dimension and vectorises along
    rows. ``torch.max(dim)`` with indices is several times slower than ``amax`` on CPU, so the
    argmax is found in two steps: ``amax`` over blocks of ``B`` codes gives per-block maxima
    (G×R), ``argmax`` over those picks the first block holding the maximum, and an ``argmax``
    over that block's B scores picks the first code within it. The first maximal block and the
    first maximal code inside it is the lowest maximal index overall, as ``torch.argmax``.
    Padding codes (when B does not divide K) hold ``-inf`` and never win.
    """
    n, k = x.shape[0], codebook.shape[0]
    block = min(code_block, 1 << (k - 1).bit_length())
    groups = -(-k // block)
    padded = groups * block
    rows = min(n, chunk_size or cpu_rows_per_chunk(k))

    out = torch.empty(n, dtype=torch.long)
    norms_col = norms.view(k, 1)
    x_t = x.t()
    buffers: dict[int, tuple[Tensor, Tensor]] = {}
    for start in range(0, n, rows):
        m = min(rows, n - start)
        if m not in buffers:
            scores = torch.empty(padded, m)
            if padded > k:
                scores[k:].fill_(float("-inf"))
            buffers[m] = (scores, torch.empty(groups, m))
        scores, block_max = buffers[m]
        torch.addmm(norms_col, codebook, x_t[:, start : start + m], beta=-1, alpha=2, out=scores[:k])
        blocks = scores.view(groups, block, m)
        torch.amax(blocks, dim=1, out=block_max)
        best_block = block_max.argmax(dim=0)
        within = torch.gather(blocks, 0, best_block.view(1, 1, m).expand(1, block, m))
        best_in_block = within[0].argmax(dim=0)
        torch.add(best_in_block, best_block, alpha=block, out=out[start : start + m])
    return out
