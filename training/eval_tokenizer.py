"""Measure a tokenizer on held-out images of each offline source, at every quantizer depth.

    python training/eval_tokenizer.py --checkpoint assets/tokenizer --teacher assets/teacher \
        --per-source 128 --json assets/tokenizer/eval.json

Prints markdown tables: PSNR/SSIM per depth (pixel branch), semantic cosine to the teacher and
zero-shot probe accuracy per depth (semantic branch, probed through the teacher's text side),
FID (bundled Inception) of reconstructions at the pixel depth, and per-stage codebook usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.analysis import evaluate_depths  # noqa: E402
from evotok.data.mixture import build_sources  # noqa: E402
from evotok.metrics import fid_bundled  # noqa: E402
from evotok.model import EvoTok  # noqa: E402
from evotok.probe import scene_questions, zero_shot  # noqa: E402
from evotok.teacher import load_teacher  # noqa: E402

SOURCES = ("scenes", "clipart", "fashion_mnist", "photos")


def held_out_samples(name: str, resolution: int, count: int, seed: int = 1):
    source = build_sources([name], resolution=resolution, seed=seed, split="heldout")[name]
    step = max(1, len(source) // count) if len(source) < 10**7 else 1
    return [source[i * step] for i in range(count)]


def probe_tasks(name: str, samples, source) -> list[tuple[str, list[int], list[list[str]], list[int]]]:
    """(task, sample indices, candidate captions per sample, true index per sample) for one source."""
    tasks: dict[str, tuple[list[int], list[list[str]], list[int]]] = {}
    if name == "scenes":
        for i, sample in enumerate(samples):
            for q in scene_questions(sample.attributes):
                if q.category in ("shape", "colour", "count", "position"):
                    idx, cands, answers = tasks.setdefault(f"scene {q.category}", ([], [], []))
                    idx.append(i), cands.append(q.candidates), answers.append(q.answer)
    elif name in ("clipart", "fashion_mnist"):
        labels = sorted({s.label for s in samples if s.label})
        captions = [f"a photo of {'an' if l[0] in 'aeiou' else 'a'} {l}" for l in labels]
        idx = [i for i, s in enumerate(samples) if s.label]
        tasks[f"{name} label"] = (idx, [captions] * len(idx), [labels.index(samples[i].label) for i in idx])
    return [(task, *value) for task, value in tasks.items()]


@torch.no_grad()
def probe_accuracy(teacher, features: torch.Tensor, candidates: list[list[str]], answers: list[int]) -> float:
    correct = 0
    groups: dict[tuple[str, ...], list[int]] = {}
    for row, cands in enumerate(candidates):
        groups.setdefault(tuple(cands), []).append(row)
    for cands, rows in groups.items():
        result = zero_shot(teacher, features[rows], list(cands), template=None)
        best = result.ranking[:, 0].tolist()
        correct += sum(int(b == answers[r]) for b, r in zip(best, rows))
    return correct / max(len(answers), 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="assets/tokenizer")
    parser.add_argument("--teacher", default=None, help="default: the teacher named in the tokenizer config")
    parser.add_argument("--per-source", type=int, default=128)
    parser.add_argument("--sources", nargs="*", default=list(SOURCES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-fid", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.time()

    tok = EvoTok.from_pretrained(args.checkpoint).eval()
    teacher = load_teacher(args.teacher or tok.config.teacher).eval()
    res, depths = tok.config.image_size, list(range(1, tok.config.num_stages + 1))
    report: dict = {"checkpoint": str(args.checkpoint), "depths": depths, "sources": {}}
    all_images, all_recons = [], []
    for name in args.sources:
        samples = held_out_samples(name, res, args.per_source)
        from evotok.images import pil_to_tensor

        images = torch.stack([pil_to_tensor(s.image, res) for s in samples])
        depth_report = evaluate_depths(tok, images, teacher)
        codes = tok.encode(images)
        entry = {"num_images": len(samples), **depth_report.as_dict(), "probe": {}}
        for task, idx, cands, answers in probe_tasks(name, samples, None):
            if not idx:
                continue
            sub_codes = codes[idx]
            per_depth = [probe_accuracy(teacher, tok.semantic_features(sub_codes, d), cands, answers) for d in depths]
            ceiling = probe_accuracy(teacher, teacher.image_features(images[idx]), cands, answers)
            entry["probe"][task] = {"n": len(idx), "by_depth": per_depth, "teacher_on_pixels": ceiling,
                                    "chance": sum(1 / len(c) for c in cands) / len(cands)}
        used = [(codes[..., s].unique().numel() / tok.config.codebook_size) for s in range(tok.config.num_stages)]
        entry["codes_used_fraction"] = used
        report["sources"][name] = entry
        all_images.append(images)
        all_recons.append(tok.decode(codes, tok.config.pixel_depth))
    stats = tok.quantizer.codebook_stats()
    report["codebook"] = {k: v.tolist() for k, v in stats.items() if k in ("usage", "perplexity", "dead_codes")}
    if not args.no_fid:
        real, fake = torch.cat(all_images), torch.cat(all_recons)
        report["fid_bundled_pixel_depth"] = {"value": fid_bundled(real, fake), "num_images": real.shape[0]}
    report["seconds"] = time.time() - started
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    depths = report["depths"]
    head = "| source | metric | " + " | ".join(f"d{d}" for d in depths) + " |"
    rule = "|---|---|" + "---|" * len(depths)
    lines = ["### Per-depth figures (held-out images)", "", head, rule]
    for name, entry in report["sources"].items():
        for metric, fmt in (("psnr", "{:.2f}"), ("ssim", "{:.3f}"), ("semantic_cosine", "{:.3f}")):
            if entry.get(metric):
                lines.append(f"| {name} | {metric} | " + " | ".join(fmt.format(v) for v in entry[metric]) + " |")
        for task, probe in entry["probe"].items():
            lines.append(f"| {name} | probe: {task} (n={probe['n']}, teacher on pixels {probe['teacher_on_pixels']:.2f},"
                         f" chance {probe['chance']:.2f}) | " + " | ".join(f"{v:.2f}" for v in probe["by_depth"]) + " |")
        lines.append(f"| {name} | codes used (this set) | " + " | ".join(f"{v:.2f}" for v in entry["codes_used_fraction"]) + " |")
    cb = report["codebook"]
    lines += ["", "### Codebooks (EMA statistics)", "", "| stage | " + " | ".join(str(d) for d in depths) + " |", rule[4:]]
    lines.append("| usage | " + " | ".join(f"{v:.2f}" for v in cb["usage"]) + " |")
    lines.append("| perplexity | " + " | ".join(f"{v:.0f}" for v in cb["perplexity"]) + " |")
    lines.append("| dead codes | " + " | ".join(str(int(v)) for v in cb["dead_codes"]) + " |")
    if "fid_bundled_pixel_depth" in report:
        fid = report["fid_bundled_pixel_depth"]
        lines += ["", f"FID (bundled Inception), reconstructions at the pixel depth vs originals, "
                      f"{fid['num_images']} held-out images: {fid['value']:.2f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
