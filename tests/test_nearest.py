"""Nearest-code search: the chunked/fused paths agree with the plain fp32 argmin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evotok.kernels import triton_available
from evotok.nearest import _cpu_search, cpu_rows_per_chunk, nearest_code, nearest_code_reference, squared_norms


def assert_same_up_to_ties(x: torch.Tensor, codebook: torch.Tensor, got: torch.Tensor, rtol: float = 1e-5) -> None:
    """``got`` is the exact nearest code, except where the winner is within rounding of it."""
    ref = nearest_code_reference(x, codebook)
    assert got.dtype == torch.long and got.shape == ref.shape
    differ = (got != ref).nonzero().flatten()
    if differ.numel() == 0:
        return
    x64, c64 = x[differ].double(), codebook.double()
    d_got = ((x64 - c64[got[differ]]) ** 2).sum(-1)
    d_ref = ((x64 - c64[ref[differ]]) ** 2).sum(-1)
    scale = (x64**2).sum(-1) + (c64[got[differ]] ** 2).sum(-1)
    assert torch.all((d_got - d_ref).abs() <= rtol * scale), "a non-tied code was chosen"
    assert differ.numel() <= max(1, x.shape[0] // 100), f"{differ.numel()} near-ties out of {x.shape[0]}"


@pytest.mark.parametrize(
    ("n", "k", "d", "chunk"),
    [(1000, 4096, 32, None), (257, 300, 20, 64), (33, 7, 3, 16), (500, 33, 32, 100), (64, 1, 8, None)],
)
def test_matches_plain_argmin_on_random_inputs(n: int, k: int, d: int, chunk: int | None) -> None:
    gen = torch.Generator().manual_seed(n + k + d)
    x = torch.randn(n, d, generator=gen)
    codebook = torch.randn(k, d, generator=gen)
    got = nearest_code(x, codebook, chunk_size=chunk)
    assert_same_up_to_ties(x, codebook, got)


def test_precomputed_norms_chunk_sizes_and_workers_give_identical_codes() -> None:
    gen = torch.Generator().manual_seed(1)
    x, codebook = torch.randn(700, 32, generator=gen), torch.randn(1000, 32, generator=gen)
    base = nearest_code(x, codebook)
    assert torch.equal(nearest_code(x, codebook, squared_norms(codebook)), base)
    for chunk in (1, 17, 256, 700, 5000):
        assert_same_up_to_ties(x, codebook, nearest_code(x, codebook, chunk_size=chunk))
    threads = torch.get_num_threads()
    norms = squared_norms(codebook)
    one_worker = _cpu_search(x, codebook, norms, 64, threads=1)
    for workers in (2, 3):
        assert torch.equal(_cpu_search(x, codebook, norms, 64, threads=workers), one_worker)
    assert torch.get_num_threads() == threads  # restored after the workers ran


def test_duplicate_codes_resolve_to_lowest_index() -> None:
    gen = torch.Generator().manual_seed(2)
    codebook = torch.randn(100, 16, generator=gen)
    # Duplicates inside one block of 32 codes, across blocks, and far apart.
    for first, second in ((3, 9), (5, 37), (40, 99), (64, 65)):
        codebook[second] = codebook[first]
    x = torch.cat([codebook[[3, 9, 5, 37, 40, 99, 64, 65]], codebook[[9, 37, 99, 65]] + 1e-3])
    expected = torch.tensor([3, 3, 5, 5, 40, 40, 64, 64, 3, 5, 40, 64])
    for chunk in (None, 1, 5):
        assert torch.equal(nearest_code(x, codebook, chunk_size=chunk), expected)


def test_exact_ties_resolve_to_lowest_index() -> None:
    # x = 0 against unit codes: every score is exactly -1.
    axes = torch.eye(8)
    codebook = torch.cat([axes, -axes, axes.flip(0)])
    assert torch.equal(nearest_code(torch.zeros(5, 8), codebook), torch.zeros(5, dtype=torch.long))
    # The midpoint of two codes with integer coordinates is exactly equidistant.
    codebook = torch.tensor([[5.0, 5.0], [0.0, 2.0], [2.0, 0.0], [-3.0, 0.0]])
    assert torch.equal(nearest_code(torch.tensor([[1.0, 1.0]]), codebook), torch.tensor([1]))
    # All codes identical: always the first.
    same = torch.ones(70, 4)
    assert torch.equal(nearest_code(torch.randn(40, 4), same, chunk_size=7), torch.zeros(40, dtype=torch.long))


def test_huge_norms() -> None:
    gen = torch.Generator().manual_seed(3)
    codebook = 1e4 * torch.randn(512, 32, generator=gen)
    target = torch.randint(512, (300,), generator=gen)
    x = codebook[target] + 10.0 * torch.randn(300, 32, generator=gen)
    assert torch.equal(nearest_code(x, codebook), target)
    assert torch.equal(nearest_code_reference(x, codebook), target)
    x_far = 1e4 * torch.randn(300, 32, generator=gen)
    assert_same_up_to_ties(x_far, codebook, nearest_code(x_far, codebook))


def test_degenerate_sizes() -> None:
    codebook = torch.randn(10, 4)
    empty = nearest_code(torch.empty(0, 4), codebook)
    assert empty.dtype == torch.long and empty.shape == (0,)
    one = nearest_code(codebook[7:8] + 1e-3, codebook)
    assert one.tolist() == [7]
    single_code = nearest_code(torch.randn(9, 4), torch.randn(1, 4))
    assert single_code.tolist() == [0] * 9


def test_accepts_other_float_dtypes() -> None:
    gen = torch.Generator().manual_seed(4)
    x, codebook = torch.randn(50, 8, generator=gen), torch.randn(20, 8, generator=gen)
    got = nearest_code(x.double(), codebook.half())
    assert_same_up_to_ties(x, codebook.half().float(), got)


def test_precision_options_on_cpu() -> None:
    gen = torch.Generator().manual_seed(5)
    x, codebook = torch.randn(400, 32, generator=gen), torch.randn(256, 32, generator=gen)
    fp32 = nearest_code(x, codebook)
    assert torch.equal(nearest_code(x, codebook, precision="tf32"), fp32)  # no TF32 on CPU
    bf16 = nearest_code(x, codebook, precision="bf16")
    # bf16 rounds the inputs: the chosen code is optimal for the rounded inputs ...
    assert_same_up_to_ties(x.bfloat16().float(), codebook.bfloat16().float(), bf16)
    # ... and close to optimal for the originals.
    d = torch.cdist(x.double(), codebook.double()) ** 2
    best = d.gather(1, fp32[:, None]).squeeze(1)
    chosen = d.gather(1, bf16[:, None]).squeeze(1)
    assert torch.all(chosen - best <= 0.05 * (best + 1.0))


def test_bad_input_gives_clear_errors() -> None:
    with pytest.raises(ValueError, match="dimension mismatch"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="N×d"):
        nearest_code(torch.randn(3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty"):
        nearest_code(torch.randn(3, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match="precision"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4), precision="fp8")
    with pytest.raises(ValueError, match="codebook_sq_norms"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4), torch.ones(4))
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4), chunk_size=0)
    with pytest.raises(TypeError, match="floating"):
        nearest_code(torch.ones(3, 4, dtype=torch.long), torch.randn(5, 4))


def test_default_chunk_is_bounded() -> None:
    for k in (1, 31, 4096, 32768, 10**6):
        rows = cpu_rows_per_chunk(k)
        assert 1 <= rows <= 4096


# ----------------------------------------------------------------------------- Triton kernel
REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: TRITON_INTERPRET must be set before triton itself is imported.
# The stub package skips evotok/__init__.py (the whole model stack) to keep start-up short.
_INTERPRETER_CHECK = """
import sys, types, torch
pkg = types.ModuleType("evotok"); pkg.__path__ = [sys.argv[1] + "/evotok"]; sys.modules["evotok"] = pkg
from evotok.kernels.triton_nearest import nearest_code_triton
from evotok.nearest import nearest_code, nearest_code_reference, squared_norms
gen = torch.Generator().manual_seed(6)
x, codebook = torch.randn(70, 20, generator=gen), torch.randn(300, 20, generator=gen)
codebook[250] = codebook[10]  # a duplicate in another split
x[:3] = codebook[[10, 250, 299]]
norms = squared_norms(codebook)
for precision in ("fp32", "tf32", "tf32x3"):
    for splits in (1, 3):
        got = nearest_code_triton(x, codebook, norms, precision=precision, block_n=16, block_k=32, num_splits=splits)
        assert got.dtype == torch.long and got[:3].tolist() == [10, 10, 299], got[:3]
        ref = nearest_code_reference(x, codebook)
        print(precision, splits, int((got != ref).sum()))
got = nearest_code(x, codebook, backend="triton")
print("dispatch", 0, int((got != nearest_code_reference(x, codebook)).sum()))
assert nearest_code_triton(x[:0], codebook, norms).shape == (0,)
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_in_interpreter() -> None:
    """The fused kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1).

    The interpreter evaluates every ``input_precision`` in fp32, so the codes must match the
    plain search (ties aside). bf16 is left to the GPU test: the interpreter (Triton 3.9)
    truncates fp32->bf16 instead of rounding and mis-evaluates bf16 ``tl.dot``."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK, str(REPO)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.strip().splitlines()]
    assert len(lines) == 7
    for _, _, mismatches in lines:  # 70 random rows: no near-ties expected
        assert int(mismatches) == 0


_WITHOUT_TRITON = """
import sys, types, torch
sys.modules["triton"] = None  # makes `import triton` fail, as on a machine without it
pkg = types.ModuleType("evotok"); pkg.__path__ = [sys.argv[1] + "/evotok"]; sys.modules["evotok"] = pkg
from evotok.kernels import triton_available
from evotok.kernels.triton_nearest import nearest_code_triton
from evotok.nearest import nearest_code
assert not triton_available()
assert nearest_code(torch.eye(3), torch.eye(3)).tolist() == [0, 1, 2]
try:
    nearest_code_triton(torch.eye(3), torch.eye(3), torch.ones(3))
except RuntimeError as error:
    assert "triton" in str(error)
else:
    raise AssertionError("expected a RuntimeError")
"""


def test_imports_and_searches_without_triton() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON, str(REPO)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_refuses_cpu_tensors_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from evotok.kernels.triton_nearest import nearest_code_triton

    with pytest.raises(RuntimeError, match="CUDA"):
        nearest_code_triton(torch.randn(4, 8), torch.randn(5, 8), torch.ones(5))


def requires_cuda(test):  # noqa: ANN001, ANN201 - a pytest decorator
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_search_matches_reference(backend: str) -> None:
    gen = torch.Generator().manual_seed(7)
    x, codebook = torch.randn(8192, 32, generator=gen), torch.randn(4096, 32, generator=gen)
    codebook[4000] = codebook[17]
    x[0] = codebook[17]
    got = nearest_code(x.cuda(), codebook.cuda(), backend=backend).cpu()
    assert got[0] == 17
    assert_same_up_to_ties(x, codebook, got)
    assert nearest_code(x[:0].cuda(), codebook.cuda(), backend=backend).shape == (0,)


@requires_cuda
@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "bf16"])
def test_cuda_reduced_precision_is_near_optimal(precision: str) -> None:
    gen = torch.Generator().manual_seed(8)
    x, codebook = torch.randn(4096, 32, generator=gen), torch.randn(2048, 32, generator=gen)
    got = nearest_code(x.cuda(), codebook.cuda(), precision=precision).cpu()
    d = torch.cdist(x.double(), codebook.double()) ** 2
    best = d.min(1).values
    chosen = d.gather(1, got[:, None]).squeeze(1)
    assert torch.all(chosen - best <= 0.05 * (best + 1.0))
    assert (chosen > best + 1e-6 * (best + 1.0)).float().mean() < 0.1
