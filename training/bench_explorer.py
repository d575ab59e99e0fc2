"""Time the demo: cold start, one full explorer call for a 256×256 input, the codebook tab.

    python training/bench_explorer.py                       # the bundled tokenizer, 2 threads
    python training/bench_explorer.py --checkpoint FOLDER --repeats 20

Prints one table. "in process" times ``evotok.explore`` plus the callback that builds every figure
(what the server computes); "via HTTP" adds Gradio's queue, file handling and the client round
trip (what a user waits for). Cold start is process start to the first HTTP 200 of the page.
"""
from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1",
                     "GRADIO_ANALYTICS_ENABLED": "False"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(args: argparse.Namespace, cache_dir: str) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--cache-dir", cache_dir, "--no-warmup",
           "--threads", str(args.threads), "--checkpoint", args.checkpoint,
           "--umap-per-source", str(args.umap_per_source)]
    if args.teacher:
        cmd += ["--teacher", args.teacher]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.1)
        if time.perf_counter() - started > 300:
            proc.kill()
            raise SystemExit("app.py not ready after 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def timed(fn, repeats: int, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds per call; with ``cpu`` also collects this process's CPU seconds per call."""
    out = []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        fn()
        out.append(time.perf_counter() - started)
        if cpu is not None:
            cpu.append(time.process_time() - started_cpu)
    return out


def test_image(path: Path) -> Path:
    from skimage import data as skdata
    from PIL import Image

    Image.fromarray(skdata.chelsea()).resize((256, 256), Image.Resampling.BICUBIC).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "tokenizer"))
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cold-starts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--umap-per-source", type=int, default=100)
    parser.add_argument("--skip-umap", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from gradio_client import Client, handle_file

    from app import Callbacks
    from evotok.explore import Explorer

    rows: list[tuple[str, list[float], str]] = []
    cpu_model: list[float] = []
    cpu_callback: list[float] = []
    with tempfile.TemporaryDirectory(prefix="evotok-bench-") as tmp:
        image = test_image(Path(tmp) / "chelsea_256.png")

        explorer = Explorer.load(args.checkpoint, args.teacher, search_dirs=[ROOT])
        callbacks = Callbacks(explorer, cache_dir=str(Path(tmp) / "cache"))
        explorer.explore(str(image))  # loads the text encoder once, as the app's warm-up does
        rows.append(("explore_image (model side) 256×256",
                     timed(lambda: explorer.explore(str(image)), args.repeats, cpu_model),
                     "encode, all-depth decode, metrics, probe"))
        rows.append(("explorer callback, in process", timed(lambda: callbacks.explore(str(image), ""), args.repeats,
                                                             cpu_callback),
                     "+ every figure, gallery, codes file"))

        cold = []
        for i in range(args.cold_starts):
            proc, url, seconds = start_app(args, str(Path(tmp) / "cache"))
            cold.append(seconds)
            if i < args.cold_starts - 1:
                stop(proc)
        rows.append(("app cold start (process start → HTTP 200)", cold, f"{args.cold_starts} starts"))
        try:
            client = Client(url, verbose=False)
            client.predict(handle_file(str(image)), "", api_name="/explore")  # first call loads the text encoder
            rows.append(("explorer call via HTTP (gradio_client)",
                         timed(lambda: client.predict(handle_file(str(image)), "", api_name="/explore"), args.repeats),
                         "what a user waits for"))
            rows.append(("codebook tab via HTTP", timed(lambda: client.predict(api_name="/codebook"), args.repeats),
                         "stats + figure"))
            if not args.skip_umap:
                rows.append(("UMAP, first (features + numba JIT + fit)",
                             timed(lambda: client.predict(explorer.config.semantic_depth, "semantic decoder output",
                                                          "label", api_name="/umap"), 1),
                             f"{args.umap_per_source} images per source"))
                rows.append(("UMAP, another depth (features cached)",
                             timed(lambda: client.predict(1, "semantic decoder output", "label", api_name="/umap"), 1), ""))
                rows.append(("UMAP, cached depth",
                             timed(lambda: client.predict(1, "semantic decoder output", "label", api_name="/umap"), 3), ""))
        finally:
            stop(proc)

    rows.insert(2, ("  CPU seconds of explore_image", cpu_model, "÷ threads ≈ wall time on idle cores"))
    rows.insert(3, ("  CPU seconds of the callback", cpu_callback, ""))
    c = explorer.config
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nEvoTok demo timings — {args.checkpoint} ({c.image_size} px, {c.num_stages} stages × {c.codebook_size} codes), "
          f"{args.threads} CPU threads, torch {torch.__version__}, load average {load:.1f} on {os.cpu_count()} CPUs\n")
    print(f"| {'what':<44} | {'median s':>8} | {'min s':>6} | {'max s':>6} | {'n':>3} | note")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 5}|------")
    for name, values, note in rows:
        print(f"| {name:<44} | {statistics.median(values):8.3f} | {min(values):6.3f} | {max(values):6.3f} | "
              f"{len(values):3d} | {note}")


if __name__ == "__main__":
    main()
