"""Time the app's text-to-image path on the CPU, with the depth transformer's cache on and off.

    python training/bench_app_speed.py                          # assets/mllm, 2 threads, 1/8/16 candidates
    python training/bench_app_speed.py --candidates 1 8 --repeats 2 --json speed.json

For each number of candidates, one held-out GenEval-style prompt per category (prompt seed 5) is
drawn at the app's settings (guidance 3, ``DEFAULT_TEMPERATURE``, ``DEFAULT_JUDGE``), read back and
judged when there are several candidates, and decoded stage by stage as the app shows it
(``MultimodalService.generate`` without the PIL conversion). The same seeds run with the depth
transformer's cache (``evotok.mllm.depth_transformer.DepthCache``, the default) and without it
(each stage re-runs every stage before it), back to back on each prompt in alternating order, so
that a machine whose speed drifts slows both alike. A last row times one answer to a question
about a held-out scene. Prints one table: median and maximum seconds per image, side by side, and
the speed-up of the median. Each figure depends on the machine: compare rows of one run only.
"""
from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import SceneWorld  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.mllm import EvoTokMLLM  # noqa: E402
from evotok.mllm.rerank import DEFAULT_JUDGE, generate_best_of  # noqa: E402
from evotok.mllm.serving import DEFAULT_TEMPERATURE  # noqa: E402
from evotok.oracle import geneval_prompts  # noqa: E402


@torch.no_grad()
def image_seconds(model: EvoTokMLLM, prompts: list[str], candidates: int, repeats: int) -> dict[str, list[float]]:
    """Seconds for each prompt (``repeats`` times, seeds 0, 1, ...) from text to the decoded stages,
    with the depth cache on and off: ``{"on": [...], "off": [...]}``. The two run back to back on
    each prompt, in alternating order, so that a machine whose speed drifts slows both alike."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    for repeat in range(repeats):
        for k, prompt in enumerate(prompts):
            for mode in ("on", "off") if (k + repeat) % 2 == 0 else ("off", "on"):
                start = time.perf_counter()
                codes, _ = generate_best_of(model, [prompt], candidates, seed=repeat, guidance_scale=3.0,
                                            temperature=DEFAULT_TEMPERATURE, judge=DEFAULT_JUDGE,
                                            depth_cache=mode == "on")
                model.decode_stages(codes)
                times[mode].append(time.perf_counter() - start)
    return times


def answer_seconds(model: EvoTokMLLM, repeats: int) -> list[float]:
    world = SceneWorld(model.tokenizer.config.image_size, seed=7, split="heldout")
    times = []
    for k in range(repeats):
        sample = world[k]
        image = pil_to_tensor(sample.image, model.tokenizer.config.image_size)
        start = time.perf_counter()
        "".join(model.answer(image, sample.qa[0][0]))
        times.append(time.perf_counter() - start)
    return times


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    out = ["| path | depth cache on: median (max) s | off: median (max) s | median speed-up |", "|---|---|---|---|"]
    for name, runs in rows.items():
        cells = [f"{statistics.median(t):.2f} ({max(t):.2f})" if t else "" for t in (runs.get("on"), runs.get("off"))]
        ratio = (f"{statistics.median(runs['off']) / statistics.median(runs['on']):.2f}×"
                 if runs.get("on") and runs.get("off") else "")
        out.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/mllm", help="saved EvoTokMLLM folder or hub id")
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 8, 16], help="candidates per image")
    parser.add_argument("--repeats", type=int, default=1, help="seeds per prompt")
    parser.add_argument("--answers", type=int, default=6, help="answers timed (0 = skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write every time here")
    args = parser.parse_args(argv)
    if min(args.candidates) < 1 or args.repeats < 1:
        parser.error("--candidates and --repeats must be at least 1")
    torch.set_num_threads(args.threads)

    model = EvoTokMLLM.from_pretrained(args.model).eval()
    prompts = [s.prompt for s in geneval_prompts(1, seed=5)]  # one held-out prompt per category
    model.decode_codes(model.generate_image("a red circle", seed=0))  # warm-up (lazy inits)
    rows: dict[str, dict[str, list[float]]] = {}
    for n in args.candidates:
        name = "one image" if n == 1 else f"pick of {n}"
        rows[name] = image_seconds(model, prompts, n, args.repeats)
        print(f"  {name}: done", flush=True)
    if args.answers:
        rows["one answer"] = {"on": answer_seconds(model, args.answers)}
    print(f"\nText to image as the app draws it ({len(prompts)} held-out prompts × {args.repeats} seeds; "
          f"{args.threads} CPU threads, judge {DEFAULT_JUDGE}, temperature {DEFAULT_TEMPERATURE})\n")
    print(table(rows))
    results = {"model": args.model, "threads": args.threads, "prompts": prompts, "seconds": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
