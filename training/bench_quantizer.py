"""Side-by-side benchmark of residual quantizers (issue #6, DESIGN.md §5).

One run prints a markdown table: this project's ``ResidualQuantizer``, vector-quantize-pytorch's
``ResidualVQ`` (optional: a row says "not installed" when it is missing) and a plain PyTorch
reference (whole N×K ``addmm`` + ``argmax``, EMA by ``bincount``/``index_add_``), in eval mode and
in train mode (EMA update + dead-code restart), forward only, with the input requiring grad in
train mode as in training.

    python training/bench_quantizer.py                      # picks cuda when available, else cpu
    python training/bench_quantizer.py --device cpu         # K=4096, d=32, D=8, 8192 tokens, 2 threads
    python training/bench_quantizer.py --device cuda        # K=32768, d=32, D=16, 8192 and 65536 tokens
    python training/bench_quantizer.py --device cpu --tune  # also sweep the CPU search tiling

Times are medians over ``--repeats`` runs after ``--warmup`` runs (``cuda.synchronize`` around
each on GPU). Peak extra memory: on GPU ``torch.cuda.max_memory_allocated`` above what was
allocated before the call; on CPU the peak of live torch allocations during one call, replayed
from the torch profiler's memory timeline (``profile_memory=True``; "n/a" if that private API
is unavailable). The profiler sees only the calling thread, so CPU memory is measured with one
thread: each further search worker of this project's quantizer adds one score tile
(about 2 MiB, ``evotok.nearest``). On GPU a second table says what the tf32/tf32x3/bf16 searches
cost against fp32: picks truly farther than fp32's for one stage, and the last residual's norm
along the whole chain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.nearest import PRECISIONS, _cpu_search, nearest_code, squared_norms  # noqa: E402
from evotok.quantizer import ResidualQuantizer  # noqa: E402

SETTINGS = {
    "cpu": {"codebook_size": 4096, "dim": 32, "stages": 8, "tokens": [8192], "repeats": 5, "warmup": 2},
    "cuda": {"codebook_size": 32768, "dim": 32, "stages": 16, "tokens": [8192, 65536], "repeats": 20, "warmup": 5},
}


class PlainResidualVQ(nn.Module):
    """The straightforward implementation: whole N×K score matrix per stage, argmax,
    EMA by ``bincount``/``index_add_``, dead codes replaced by random residuals."""

    def __init__(self, stages: int, size: int, dim: int, decay: float = 0.99, eps: float = 1e-5) -> None:
        super().__init__()
        self.decay, self.eps, self.size = decay, eps, size
        self.register_buffer("embed", torch.randn(stages, size, dim))
        self.register_buffer("cluster_size", torch.ones(stages, size))
        self.register_buffer("embed_sum", self.embed.clone())

    @torch.no_grad()
    def _stage(self, i: int, r: Tensor, update: bool) -> Tensor:
        embed = self.embed[i]
        scores = torch.addmm((embed * embed).sum(1), r, embed.t(), beta=-1, alpha=2)
        codes = scores.argmax(1)
        chosen = embed[codes]
        if update:
            counts = torch.bincount(codes, minlength=self.size).float()
            sums = torch.zeros_like(embed).index_add_(0, codes, r)
            self.cluster_size[i].mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum[i].mul_(self.decay).add_(sums, alpha=1 - self.decay)
            cs = self.cluster_size[i]
            n = cs.sum()
            smoothed = (cs + self.eps) / (n + self.size * self.eps) * n
            self.embed[i] = self.embed_sum[i] / smoothed[:, None]
            dead = cs < 1.0
            fresh = r[torch.randint(r.shape[0], (self.size,), device=r.device)]
            self.embed[i] = torch.where(dead[:, None], fresh, self.embed[i])
            self.embed_sum[i] = torch.where(dead[:, None], fresh, self.embed_sum[i])
            cs.masked_fill_(dead, 1.0)
        return chosen

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r = x.detach().clone()
        quantized = torch.zeros_like(r)
        loss = x.new_zeros(())
        for i in range(self.embed.shape[0]):
            chosen = self._stage(i, r, self.training)
            r = r - chosen
            quantized = quantized + chosen
            loss = loss + ((x - quantized) ** 2).mean()
        return quantized, loss / self.embed.shape[0]


@dataclass
class Row:
    name: str
    eval_ms: str
    train_ms: str
    eval_mem: str
    train_mem: str


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak of live torch CPU allocations during one call (torch profiler memory timeline)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof:
            fn()
        live = peak = 0
        for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
            if action.name == "CREATE":
                live += size
            elif action.name == "DESTROY":
                live -= size
            peak = max(peak, live)
        return peak
    except Exception:  # private API: report n/a rather than fail the benchmark
        return None


def peak_extra(fn: Callable[[], object], device: str) -> str:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return f"{(torch.cuda.max_memory_allocated() - before) / 2**20:.0f}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the profiler only sees the calling thread: keep all work on it
    try:
        peak = cpu_peak_bytes(fn)
    finally:
        torch.set_num_threads(threads)
    return "n/a" if peak is None else f"{peak / 2**20:.0f}"


def measure(
    model: nn.Module, call: Callable[[nn.Module, Tensor], object], x: Tensor, args: argparse.Namespace
) -> tuple[str, str, str, str]:
    """(eval ms, train ms, eval MiB, train MiB) for one implementation."""
    device = x.device.type
    model.train()
    call(model, x)  # data initialisation, compilation, allocator warm-up
    model.eval()
    with torch.no_grad():
        eval_ms = time_ms(lambda: call(model, x), device, args.repeats, args.warmup)
        eval_mem = peak_extra(lambda: call(model, x), device)
    model.train()
    x_grad = x.clone().requires_grad_()
    train_ms = time_ms(lambda: call(model, x_grad), device, args.repeats, args.warmup)
    train_mem = peak_extra(lambda: call(model, x_grad), device)
    return f"{eval_ms:.1f}", f"{train_ms:.1f}", eval_mem, train_mem


def evotok_rows(x: Tensor, args: argparse.Namespace, precisions: list[str]) -> list[Row]:
    rows = []
    for precision in precisions:
        torch.manual_seed(0)
        rq = ResidualQuantizer(args.stages, args.codebook_size, args.dim, search_precision=precision).to(x.device)
        result = measure(rq, lambda m, v: m(v), x, args)
        rows.append(Row(f"evotok ResidualQuantizer ({precision})", *result))
    return rows


def vqp_row(x: Tensor, args: argparse.Namespace) -> Row:
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        return Row("vector-quantize-pytorch ResidualVQ", "not installed", "not installed", "-", "-")
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=args.dim, num_quantizers=args.stages, codebook_size=args.codebook_size, decay=0.99,
        kmeans_init=False, threshold_ema_dead_code=1,
    ).to(x.device)  # fmt: skip
    result = measure(rvq, lambda m, v: m(v.unsqueeze(0)), x, args)
    return Row("vector-quantize-pytorch ResidualVQ", *result)


def plain_row(x: Tensor, args: argparse.Namespace) -> Row:
    torch.manual_seed(0)
    plain = PlainResidualVQ(args.stages, args.codebook_size, args.dim).to(x.device)
    result = measure(plain, lambda m, v: m(v), x, args)
    return Row("plain PyTorch (N×K addmm + argmax + bincount/index_add)", *result)


def print_table(tokens: int, rows: list[Row], args: argparse.Namespace) -> None:
    print(
        f"\n### {args.device}: K={args.codebook_size}, d={args.dim}, D={args.stages}, {tokens} tokens"
        + (f", {torch.get_num_threads()} threads" if args.device == "cpu" else "")
    )
    print("\n| implementation | eval ms | train ms (EMA + restart) | peak extra MiB eval | peak extra MiB train |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.name} | {row.eval_ms} | {row.train_ms} | {row.eval_mem} | {row.train_mem} |")
    if args.device == "cpu":
        print("\nCPU memory: peak live torch allocations, measured single-threaded (see the docstring).")


def compare_picks(x: Tensor, codebook: Tensor, picks: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """(farther, tie): masks of the rows where ``picks`` chose a code truly farther from ``x`` than
    ``reference``'s (fp64 distances), and where it chose another code at the same distance."""
    x64, codebook64 = x.double(), codebook.double()
    mine = (x64 - codebook64[picks]).pow(2).sum(-1)
    best = (x64 - codebook64[reference]).pow(2).sum(-1)
    other = picks != reference
    farther = other & (mine > best * (1 + 1e-9) + 1e-12)
    return farther, other & ~farther


def precision_effect(x: Tensor, args: argparse.Namespace) -> None:
    """What a faster search precision costs against the fp32 search.

    The codebooks are initialised from another draw of tokens: initialised from ``x`` itself,
    with more codes than tokens, every token would be in the codebook (an exact match, often
    several times over), and the table would count broken ties. Stage 1 (same inputs): picks
    farther from the input than the fp32 pick by fp64 distances, and picks of another code at
    the same distance. Whole chain: the mean norm of the last residual, ||r_D||, against fp32's."""
    torch.manual_seed(0)
    rq = ResidualQuantizer(args.stages, args.codebook_size, args.dim).to(x.device).train()
    rq(torch.randn_like(x))  # data initialisation from other tokens
    rq.eval()
    with torch.no_grad():
        codebook, norms = rq.embed[0], squared_norms(rq.embed[0])
        first = nearest_code(x, codebook, norms)
        chain_error = rq(x).residual_norms[-1].item()
        print(f"\n### search precision against fp32 ({x.shape[0]} tokens, codebooks initialised from other tokens)")
        print(f"\nWhole chain, fp32: mean ||r_D|| = {chain_error:.5f}")
        print("\n| precision | stage 1: farther picks | stage 1: tie broken otherwise | whole chain: mean ||r_D|| (change) |")
        print("|---|---|---|---|")
        for precision in PRECISIONS[1:]:
            farther, tie = compare_picks(x, codebook, nearest_code(x, codebook, norms, precision=precision), first)
            rq.search_precision = precision
            error = rq(x).residual_norms[-1].item()
            rq.search_precision = "fp32"
            print(f"| {precision} | {farther.sum().item()} / {x.shape[0]} | {tie.sum().item()} | "
                  f"{error:.5f} ({(error - chain_error) / chain_error:+.2%}) |")


def tune_cpu(x: Tensor, args: argparse.Namespace) -> None:
    """Sweep the CPU search tiling: rows per chunk × codes per argmax block."""
    codebook = torch.randn(args.codebook_size, args.dim)
    norms = squared_norms(codebook)
    print(f"\n### CPU search tiling, one stage ×{args.stages} (ms for N={x.shape[0]}, K={args.codebook_size})")
    blocks = [8, 16, 32, 64]
    print("\n| rows per chunk | " + " | ".join(f"block {b}" for b in blocks) + " |")
    print("|---|" + "---|" * len(blocks))
    for rows in (32, 64, 128, 256, 512, 1024, 2048):
        cells = []
        for block in blocks:
            ms = time_ms(lambda: _cpu_search(x, codebook, norms, rows, block), "cpu", args.repeats, 1)
            cells.append(f"{ms * args.stages:.0f}")
        print(f"| {rows} | " + " | ".join(cells) + " |")
    full = time_ms(lambda: torch.addmm(norms, x, codebook.t(), beta=-1, alpha=2).argmax(1), "cpu", args.repeats, 1)
    print(f"\nwhole N×K addmm + argmax: {full * args.stages:.0f} ms for {args.stages} stages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: the device's setting)")
    parser.add_argument("--codebook-size", type=int)
    parser.add_argument("--dim", type=int)
    parser.add_argument("--stages", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS,
        help="search precisions timed for this project (default: fp32 on CPU, all on CUDA)",
    )  # fmt: skip
    parser.add_argument("--skip-others", action="store_true", help="time only this project's quantizer")
    parser.add_argument("--tune", action="store_true", help="CPU: also sweep the search tiling")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    for key, value in SETTINGS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    precisions = args.precisions or (["fp32"] if args.device == "cpu" else list(PRECISIONS))

    for tokens in args.tokens:
        x = torch.randn(tokens, args.dim, device=args.device, generator=None)
        rows = evotok_rows(x, args, precisions)
        if not args.skip_others:
            rows += [vqp_row(x, args), plain_row(x, args)]
        print_table(tokens, rows, args)
        if args.device == "cuda":
            precision_effect(x, args)
        if args.tune and args.device == "cpu":
            tune_cpu(x, args)


if __name__ == "__main__":
    main()
