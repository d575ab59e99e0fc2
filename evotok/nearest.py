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
* ``precision="fp32"`` is full fp32 arithmetic. ``"tf32"`` and ``"tf32x3"`` let the Triton
  kernel use tensor cores with TF32 inputs (one or three passes); on CPU they are plain fp32,
  and the torch CUDA fallback follows torch's global TF32 setting. ``"bf16"`` is the exact
  search of ``x`` and the codes rounded to bfloat16 (norms of the rounded codes, products
  accumulated in fp32) on every device, so chosen codes can differ from the fp32 search wherever
  distances are close; measure the effect with ``training/bench_quantizer.py``.
* Empty input (``N = 0``) returns an empty ``LongTensor``.

Backends: the fused Triton kernel on CUDA when ``triton`` imports (``evotok.kernels``, d ≤ 256),
else a chunked torch path: row chunks on CUDA; on CPU, transposed code×row tiles sized for one
core's cache, spread over single-threaded worker threads (``SearchScratch``,
``cpu_map_row_chunks``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")

# CPU tiling, tuned on two AMD EPYC (Zen 4, AVX-512) cores, one single-threaded worker per core
# (training/bench_quantizer.py --tune): each worker's transposed K×R score tile holds about
# 2**19 floats (2 MiB, about one core's L2), with blocks of 32 codes for the two-level argmax.
# Measured, 8 stages of N = 8192, K = 4096, d = 32: R = 64..256 -> 130-157 ms, R = 32 -> 177 ms,
# R = 1024 -> 241-306 ms, R = 2048 -> ~400 ms, the whole N×K addmm + argmax -> 558 ms; one stage of
# N = 2048, K = 32768: R = 32..64 -> 31-43 ms against 176 ms; K = 1024: R = 128..512 -> 5.3-5.8 ms.
_CPU_TILE_ELEMENTS = 1 << 19
_CPU_MIN_ROWS = 32
_CPU_MAX_ROWS = 4096
_CPU_CODE_BLOCK = 32

_TRITON_MAX_DIM = 256  # the fused kernel keeps a row block of x in registers

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

    fused = x.is_cuda and x.shape[1] <= _TRITON_MAX_DIM and _triton_ready()
    if backend == "triton" or (backend == "auto" and fused):
        from evotok.kernels.triton_nearest import nearest_code_triton

        return nearest_code_triton(x, codebook, norms, precision=precision)
    if x.is_cuda:
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


def _cuda_search(x: Tensor, codebook: Tensor, norms: Tensor, chunk_size: int | None) -> Tensor:
    """Row-chunked ``addmm`` + ``argmax`` (first maximum) for CUDA without Triton.

    The matmuls follow torch's global fp32 matmul setting (IEEE fp32 unless the program enabled
    TF32): toggling it here could break a program that set it through the other of torch's two
    TF32 APIs, which torch refuses to mix."""
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
    x: Tensor,
    codebook: Tensor,
    norms: Tensor,
    chunk_size: int | None,
    code_block: int = _CPU_CODE_BLOCK,
    threads: int | None = None,
) -> Tensor:
    """Chunked CPU search: row chunks of ``x`` on worker threads (``cpu_map_row_chunks``), each
    searched with ``SearchScratch.search``."""
    n, k = x.shape[0], codebook.shape[0]
    out = torch.empty(n, dtype=torch.long)
    norms_col = norms.view(k, 1)

    def work(start: int, stop: int, scratch: SearchScratch) -> None:
        scratch.search(x[start:stop], codebook, norms_col, out[start:stop])

    cpu_map_row_chunks(n, min(n, chunk_size or cpu_rows_per_chunk(k)), work, threads=threads, code_block=code_block)
    return out


class SearchScratch:
    """One worker's reusable score buffers for the CPU search, and the search of one chunk.

    The scores of a chunk of ``m`` rows are written transposed, as a K×m tile (``addmm`` into
    the reused buffer), so that every reduction runs over the *outer* dimension and vectorises
    along rows. ``torch.max(dim)`` with indices is several times slower than ``amax`` on CPU, so
    the argmax is found in two steps: ``amax`` over blocks of ``B`` codes gives per-block maxima
    (G×m), ``argmax`` over those picks the first block holding the maximum, and an ``argmax``
    over that block's B scores picks the first code within it. The first maximal block and the
    first maximal code inside it is the lowest maximal index overall, as ``torch.argmax``.
    Padding codes (when B does not divide K) hold ``-inf`` and never win.
    """

    def __init__(self, code_block: int = _CPU_CODE_BLOCK) -> None:
        self.code_block = code_block
        self._buffers: dict[tuple[int, int], tuple[Tensor, Tensor, int, int]] = {}

    def search(self, x: Tensor, codebook: Tensor, norms_col: Tensor, out: Tensor) -> None:
        """Write the nearest code of each row of ``x`` (m×d) into ``out`` (m, long)."""
        k, m = codebook.shape[0], x.shape[0]
        if (k, m) not in self._buffers:
            block = min(self.code_block, 1 << (k - 1).bit_length())
            groups = -(-k // block)
            scores = torch.empty(groups * block, m)
            scores[k:].fill_(float("-inf"))
            self._buffers[(k, m)] = (scores, torch.empty(groups, m), block, groups)
        scores, block_max, block, groups = self._buffers[(k, m)]
        torch.addmm(norms_col, codebook, x.t(), beta=-1, alpha=2, out=scores[:k])
        blocks = scores.view(groups, block, m)
        torch.amax(blocks, dim=1, out=block_max)
        best_block = block_max.argmax(dim=0)
        within = torch.gather(blocks, 0, best_block.view(1, 1, m).expand(1, block, m))
        torch.add(within[0].argmax(dim=0), best_block, alpha=block, out=out)


def cpu_map_row_chunks(
    n: int,
    rows: int,
    work: Callable[[int, int, SearchScratch], None],
    *,
    threads: int | None = None,
    code_block: int = _CPU_CODE_BLOCK,
) -> None:
    """Run ``work(start, stop, scratch)`` over the chunks ``[start, stop)`` of ``n`` rows.

    Rather than letting every small op fork and join torch's intra-op thread team (hundreds of
    barriers per search, which stall badly whenever another process takes a core, e.g. data
    loader workers), ``threads`` Python workers take whole chunks (at most ``rows`` rows, smaller
    when that gives every worker a share) from a shared queue and run them single-threaded:
    torch's thread count is 1 while they run and is restored afterwards. ``threads`` defaults to
    the count saved by an enclosing ``cpu_worker_threads()`` block, else
    ``torch.get_num_threads()``. ``work`` must only touch its own rows; it runs without autograd
    (and in inference mode when the caller is).
    """
    if threads is None:
        threads = getattr(_worker_state, "threads", None) or torch.get_num_threads()
    rows = max(1, min(rows, max(_CPU_MIN_ROWS, -(-n // max(1, threads)))))
    starts = range(0, n, rows)
    workers = min(threads, len(starts))
    inference = torch.is_inference_mode_enabled()  # thread-local: carried into the workers

    def run(chunks: Iterator[int]) -> None:
        scratch = SearchScratch(code_block)
        with torch.inference_mode(inference), torch.no_grad():
            for start in chunks:
                work(start, min(start + rows, n), scratch)

    if workers <= 1:
        run(iter(starts))
        return
    queue = _LockedIterator(starts)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_thread_pool(workers).submit(run, queue) for _ in range(workers)]
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(previous)


_worker_state = threading.local()


@contextlib.contextmanager
def cpu_worker_threads() -> Iterator[int]:
    """Run torch single-threaded inside the block while the chunked CPU search keeps the
    caller's thread count as worker threads (yielded).

    For code around the search made of small memory-bound ops (the quantizer's residual chain,
    EMA and restart): single-threaded they cost about the same on an idle machine and never
    wait at a thread barrier for a core another process took. Nested blocks are no-ops.
    """
    threads = torch.get_num_threads()
    if getattr(_worker_state, "threads", None) is not None or threads <= 1:
        yield getattr(_worker_state, "threads", None) or threads
        return
    _worker_state.threads = threads
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)
        _worker_state.threads = None


class _LockedIterator:
    """A thread-safe iterator over chunk starts (workers take the next chunk when free)."""

    def __init__(self, items: range) -> None:
        self._items = iter(items)
        self._lock = threading.Lock()

    def __iter__(self) -> _LockedIterator:
        return self

    def __next__(self) -> int:
        with self._lock:
            return next(self._items)


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``workers`` threads, rebuilt after a fork."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] < workers:
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evotok-nearest"))
    return _POOL[2]
