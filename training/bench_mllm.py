"""Measure the multimodal model: what it understands, how fast it answers and draws, and (optionally)
how close its images are to real renders.

    python training/bench_mllm.py                                   # assets/mllm, 2 threads
    python training/bench_mllm.py --model runs/mllm_stage2/final --scenes 600 --fid 300 --json out.json

Prints three tables:
1. Understanding: greedy exact-match answer accuracy on held-out scene questions (scenes built only
   from held-out colour-shape pairs) per question category (with ``--seen-scenes N``, beside it the
   accuracy on new scenes of training pairs; with ``--trained-scenes N``, on the first N scenes of the
   training pool itself, which tells memorising from underfitting; with ``--read-back``, on the same
   held-out scenes read back as the model's own drawings are, decoded at the pixel depth and
   encoded again (``evotok.mllm.read_back``: the view its best-of-n judge gets)); a separate row
   asks on which side of the image's middle single objects lie ("side of image middle",
   ``place_questions``: the position questions' wording with the middle as the reference; not
   counted in "all scene questions", so that figure stays comparable with earlier runs); then on
   clip-art category questions (held-out 10% of the pictures) and on Fashion-MNIST class questions
   (its test split).
2. Speed on CPU, end to end: one text-to-image image (prompt -> decoded pixels, guidance 3), the
   same kept as the best of ``--best-of`` (4) candidates (``evotok.mllm.rerank``: all drawn, read
   back and scored by the default judge; each other judge gets a row of its own) and one answer
   (image tensor -> full answer text), median over ``--repeats``.
3. With ``--fid N``: FID (bundled Inception) of N images generated from held-out scene captions
   against the N renders those captions describe.
A GenEval-style score needs an oracle that reads generated scenes; it is not part of this script.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.sources import MissingDataError  # noqa: E402
from evotok.data.scenes import SceneObject, SceneWorld, place_questions  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.mllm import EvoTokMLLM  # noqa: E402
from evotok.mllm.data import LABEL_QUESTIONS, load_or_skip  # noqa: E402
from evotok.mllm.read_back import read_back_codes  # noqa: E402
from evotok.mllm.rerank import DEFAULT_JUDGE, JUDGES, generate_best_of  # noqa: E402

TRAINING_POOL_SEED = 0  # data.seed of the bundled configs: their scene pool is SceneWorld(seed=0, split="train")
PLACE = "side of image middle"  # the category of place questions


def accuracy(model: EvoTokMLLM, images: torch.Tensor, questions: list[str], truths: list[str],
             batch_size: int, read_back: bool = False) -> list[int]:
    """Greedy exact-match hits; ``read_back``: the images decoded at the pixel depth and encoded
    again first, as the model reads its own drawings."""
    hits = []
    for start in range(0, len(questions), batch_size):
        batch = images[start:start + batch_size]
        codes = read_back_codes(model, model.encode_images(batch)) if read_back else None
        answers = model.answer_batch(None if read_back else batch, questions[start:start + batch_size],
                                     max_new_tokens=12, image_codes=codes)
        hits += [int(a.strip().lower() == t.strip().lower()) for a, t in zip(answers, truths[start:start + batch_size])]
    return hits


def scene_understanding(model: EvoTokMLLM, count: int, size: int, batch_size: int,
                        split: str = "heldout", seed: int = 4242,
                        read_back: bool = False) -> dict[str, tuple[float, int]]:
    """Accuracy per question category on ``count`` scenes of ``split`` (every question each scene keeps,
    and its place questions as the separate category ``PLACE``).

    "heldout" scenes hold only colour-shape pairs never seen in training; "train" scenes are new
    images of the training pairs, so the gap between the two is the cost of unseen combinations.
    ``seed=TRAINING_POOL_SEED`` with "train" gives the scenes the bundled configs trained on."""
    world = SceneWorld(size, seed=seed, split=split)
    images, questions, truths, categories = [], [], [], []
    for i in range(count):
        sample = world[i]
        image = pil_to_tensor(sample.image, size)
        for (q, a), category in zip(sample.qa, sample.attributes["qa_categories"]):
            images.append(image)
            questions.append(q)
            truths.append(a)
            categories.append(category)
        objects = [SceneObject.from_any(o) for o in sample.attributes["objects"]]
        for q, a in place_questions(objects, np.random.default_rng([seed, i])):  # the sample's own draws untouched
            images.append(image)
            questions.append(q)
            truths.append(a)
            categories.append(PLACE)
    hits = accuracy(model, torch.stack(images), questions, truths, batch_size, read_back)
    table: dict[str, list[int]] = {}
    for hit, category in zip(hits, categories):
        table.setdefault(category, []).append(hit)
    table["all scene questions"] = [hit for hit, category in zip(hits, categories) if category != PLACE]
    return {k: (sum(v) / len(v), len(v)) for k, v in table.items()}


def label_understanding(model: EvoTokMLLM, name: str, count: int, size: int, batch_size: int) -> tuple[float, int] | None:
    from evotok.data.sources import ClipArtSource, FashionMNISTSource

    try:
        source = ClipArtSource(split="heldout") if name == "clipart" else FashionMNISTSource(split="heldout")
    except MissingDataError as err:
        print(f"skipping {name}: {err}")
        return None
    samples = [s for s in (load_or_skip(source, i) for i in range(min(count, len(source)))) if s is not None]
    question = LABEL_QUESTIONS[name][0]
    hits = accuracy(model, torch.stack([pil_to_tensor(s.image, size) for s in samples]), [question] * len(samples),
                    [s.label for s in samples], batch_size)
    return sum(hits) / len(hits), len(hits)


def speed(model: EvoTokMLLM, repeats: int, size: int, best_of: int = 4) -> dict[str, float]:
    sample = SceneWorld(size, seed=7, split="heldout")[0]
    image = pil_to_tensor(sample.image, size)
    judges = [DEFAULT_JUDGE] + [j for j in JUDGES if j != DEFAULT_JUDGE]
    image_times, answer_times = [], []
    best_times: dict[str, list[float]] = {j: [] for j in judges}
    model.generate_image("a red circle", seed=0)  # warm-up (lazy inits)
    for k in range(repeats):
        start = time.perf_counter()
        model.decode_codes(model.generate_image(sample.caption, guidance_scale=3.0, seed=k))
        image_times.append(time.perf_counter() - start)
        for judge in judges:
            start = time.perf_counter()
            model.decode_codes(generate_best_of(model, [sample.caption], best_of, seed=k, guidance_scale=3.0,
                                                judge=judge)[0])
            best_times[judge].append(time.perf_counter() - start)
        start = time.perf_counter()
        "".join(model.answer(image, sample.qa[0][0]))
        answer_times.append(time.perf_counter() - start)
    return {"one image (s)": statistics.median(image_times),
            f"one image, best of {best_of} (s)": statistics.median(best_times[DEFAULT_JUDGE]),
            **{f"one image, best of {best_of}, {j} judge (s)": statistics.median(best_times[j]) for j in judges[1:]},
            "one answer (s)": statistics.median(answer_times)}


def generation_fid(model: EvoTokMLLM, count: int, size: int, batch_size: int) -> float:
    from evotok.metrics import fid_bundled

    world = SceneWorld(size, seed=9090, split="heldout")
    samples = [world[i] for i in range(count)]
    real = torch.stack([pil_to_tensor(s.image, size) for s in samples])
    fake = []
    for start in range(0, count, batch_size):
        prompts = [s.caption for s in samples[start:start + batch_size]]
        fake.append(model.decode_codes(model.generate_image(prompts, guidance_scale=3.0, seed=start)).cpu())
    return fid_bundled(real, torch.cat(fake))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/mllm", help="saved EvoTokMLLM folder or hub id")
    parser.add_argument("--tokenizer", default=None, help="image tokenizer folder (default: the one the model records)")
    parser.add_argument("--scenes", type=int, default=300, help="held-out scenes (about 6 questions each)")
    parser.add_argument("--seen-scenes", type=int, default=0,
                        help="also this many new scenes of training colour-shape pairs (0 = skip)")
    parser.add_argument("--trained-scenes", type=int, default=0,
                        help="also the first N scenes of the training pool, seen in training (0 = skip)")
    parser.add_argument("--read-back", action="store_true",
                        help="also the held-out scenes read back as the model's own drawings are")
    parser.add_argument("--labels", type=int, default=500, help="clip-art / Fashion-MNIST images per source")
    parser.add_argument("--best-of", type=int, default=4, help="candidates of the timed best-of-n image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fid", type=int, default=0, help="generated images for FID (0 = skip)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = EvoTokMLLM.from_pretrained(args.model, image_tokenizer=args.tokenizer).eval()
    size = model.tokenizer.config.image_size
    results: dict = {"model": args.model, "threads": args.threads, "judge": DEFAULT_JUDGE}

    scenes = scene_understanding(model, args.scenes, size, args.batch_size)
    columns = {}  # JSON key -> (column title, accuracies)
    if args.seen_scenes:
        columns["scenes_seen_pairs"] = ("seen pairs", scene_understanding(model, args.seen_scenes, size,
                                                                          args.batch_size, "train"))
    if args.trained_scenes:
        columns["scenes_trained"] = ("trained", scene_understanding(model, args.trained_scenes, size,
                                                                    args.batch_size, "train", TRAINING_POOL_SEED))
    if args.read_back:
        columns["scenes_read_back"] = ("read back", scene_understanding(model, args.scenes, size,
                                                                        args.batch_size, read_back=True))
    labels = {name: label_understanding(model, name, args.labels, size, args.batch_size) if args.labels > 0 else None
              for name in ("clipart", "fashion_mnist")}  # --labels 0: skip them
    print("\nUnderstanding (greedy exact match)")
    print(f"{'questions':32s} {'accuracy':>9s} {'n':>6s}" + "".join(f" {title:>11s} {'n':>6s}" for title, _ in columns.values()))
    for name, (acc, n) in sorted(scenes.items()):
        extra = "".join(f" {table[name][0]:11.3f} {table[name][1]:6d}" for _, table in columns.values() if name in table)
        print(f"{'scenes: ' + name:32s} {acc:9.3f} {n:6d}{extra}")
    for name, value in labels.items():
        if value is not None:
            print(f"{name + ' category':32s} {value[0]:9.3f} {value[1]:6d}")
    results["understanding"] = {"scenes": scenes, **{k: v for k, v in labels.items() if v is not None}}
    results["understanding"].update({key: table for key, (_, table) in columns.items()})

    timing = speed(model, args.repeats, size, args.best_of)
    print(f"\nSpeed, end to end, {args.threads} CPU threads (median of {args.repeats}; best of n by the "
          f"{DEFAULT_JUDGE} judge unless named)")
    for name, seconds in timing.items():
        print(f"{name:42s} {seconds:9.3f}")
    results["speed"] = timing

    if args.fid:
        fid = generation_fid(model, args.fid, size, args.batch_size)
        print(f"\nGeneration: FID (bundled Inception), {args.fid} held-out captions vs their renders: {fid:.2f}")
        results["fid_bundled"] = fid
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
