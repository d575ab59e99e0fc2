"""Which image representation can be read for colour and shape on colour-shape pairs never seen?

Linear probes (logistic regression) are fitted on scenes of the training pairs and scored on
scenes built only from the held-out pairs (``HELDOUT_PAIRS``). A representation whose shape
probe stays good on the held-out pairs encodes shape apart from colour; one whose probe falls to
chance encodes each seen pair as its own thing, and a model reading it (the multimodal model's
LM) inherits that. Two representations of the bundled tokenizer are compared:

* grid cells: the semantic features at the semantic depth, one vector per cell, labelled with the
  object whose drawn box covers the cell's centre (cells on the background are left out);
* teacher cells: the teacher's own patch features of the image (what the semantic decoder learns
  to predict), same cells and labels;
* teacher last block: the teacher's last block and norm applied to the grid cells (what its
  max-pooling reads);
* summary: the tokenizer's teacher's pooled image embedding of those same features
  (``Teacher.embed_features``), on single-object scenes.

Measured on the bundled tokenizer (defaults: 2000 / 600 scenes): grid cells give colour 0.933 but
shape 0.133 on held-out pairs, below the majority class (0.274); the pooled embedding gives shape
0.745 (98 single-object scenes). Feeding that embedding to the multimodal model as one
extra input token (commit 06b9d13, ``mllm_stage3_summary.yaml`` there) moved its held-out shape
answers only from 0.298 to 0.348: the language model did not read it compositionally either.
With ``--train-scenes 1000 --heldout-scenes 400`` the teacher's own patch features read shape at
0.120 on held-out pairs (majority 0.261): the tokenizer inherits the entanglement from its teacher.
A teacher trained with 30% greyscale, shape-only views of its training scenes (commit 723f890, teacher_colour_free.yaml there) read
0.112: colour-free views do not untie it.

    python training/bench_attribute_probe.py                        # assets/tokenizer, its teacher
    python training/bench_attribute_probe.py --train-scenes 3000 --json probe.json
"""
from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import COLOURS, SHAPES, SceneObject, SceneWorld  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.model import EvoTok  # noqa: E402
from evotok.teacher import load_teacher  # noqa: E402


CELL_REPRESENTATIONS = ("grid cells", "teacher cells", "teacher last block")


def cell_labels(objects, grid: int) -> dict[str, np.ndarray]:
    """Colour and shape index of the object covering each cell centre (-1: background); a later
    object is drawn on top of an earlier one."""
    labels = {"colour": np.full(grid * grid, -1), "shape": np.full(grid * grid, -1)}
    centres = (np.arange(grid) + 0.5) / grid
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox
        inside = ((centres[None, :] >= x0) & (centres[None, :] <= x1) &
                  (centres[:, None] >= y0) & (centres[:, None] <= y1)).reshape(-1)
        labels["colour"][inside] = list(COLOURS).index(obj.colour)
        labels["shape"][inside] = list(SHAPES).index(obj.shape)
    return labels


@torch.no_grad()
def representations(tokenizer: EvoTok, teacher, split: str, count: int, batch_size: int) -> dict:
    """Grid-cell features with labels, and summary embeddings of the single-object scenes."""
    world = SceneWorld(tokenizer.config.image_size, seed=1234 if split == "train" else 4321, split=split)
    grid, depth = tokenizer.config.grid_size, tokenizer.config.semantic_depth
    cells, cell_y = {name: [] for name in CELL_REPRESENTATIONS}, {"colour": [], "shape": []}
    summary, summary_y = [], {"colour": [], "shape": []}
    for start in range(0, count, batch_size):
        samples = [world[i] for i in range(start, min(start + batch_size, count))]
        images = torch.stack([pil_to_tensor(s.image, tokenizer.config.image_size) for s in samples])
        features = tokenizer.semantic_features(tokenizer.encode(images), depth=depth)
        embeds = teacher.embed_features(features)
        per_cell = {"grid cells": features, "teacher cells": teacher.image_features(images),
                    "teacher last block": teacher.norm(teacher.blocks[-1](features))}
        for k, sample in enumerate(samples):
            objects = [SceneObject.from_any(o) for o in sample.attributes["objects"]]
            labels = cell_labels(objects, grid)
            covered = labels["colour"] >= 0
            for name, values in per_cell.items():
                cells[name].append(values[k][torch.from_numpy(covered)].numpy())
            for name in cell_y:
                cell_y[name].append(labels[name][covered])
            if len(objects) == 1:
                summary.append(embeds[k].numpy())
                summary_y["colour"].append(list(COLOURS).index(objects[0].colour))
                summary_y["shape"].append(list(SHAPES).index(objects[0].shape))
    return {
        **{name: (np.concatenate(v), {k: np.concatenate(y) for k, y in cell_y.items()}) for name, v in cells.items()},
        "summary": (np.stack(summary), {k: np.asarray(v) for k, v in summary_y.items()}),
    }


def probe(train: tuple, heldout: tuple, attribute: str) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_held, y_held) = (train[0], train[1][attribute]), (heldout[0], heldout[1][attribute])
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    return {"seen pairs": float(classifier.score(x_train, y_train)),
            "held-out pairs": float(classifier.score(x_held, y_held)),
            "majority class": float(np.bincount(y_held).max() / len(y_held)), "n held-out": int(len(y_held))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="assets/tokenizer")
    parser.add_argument("--teacher", default=None, help="default: the teacher the tokenizer records")
    parser.add_argument("--train-scenes", type=int, default=2000, help="scenes of training pairs to fit on")
    parser.add_argument("--heldout-scenes", type=int, default=600, help="scenes of held-out pairs to score on")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = EvoTok.from_pretrained(args.tokenizer).eval()
    teacher = load_teacher(args.teacher or tokenizer.config.teacher)
    train = representations(tokenizer, teacher, "train", args.train_scenes, args.batch_size)
    held = representations(tokenizer, teacher, "heldout", args.heldout_scenes, args.batch_size)
    results: dict = {"tokenizer": args.tokenizer, "train_scenes": args.train_scenes,
                     "heldout_scenes": args.heldout_scenes, "probes": {}}
    print(f"\nLinear probes fitted on {args.train_scenes} scenes of seen pairs, scored on "
          f"{args.heldout_scenes} scenes of held-out pairs")
    print(f"{'representation':16s} {'attribute':9s} {'seen (fit)':>11s} {'held-out':>9s} {'majority':>9s} {'n':>6s}")
    for name in (*CELL_REPRESENTATIONS, "summary"):
        for attribute in ("colour", "shape"):
            row = probe(train[name], held[name], attribute)
            results["probes"][f"{name}/{attribute}"] = row
            print(f"{name:16s} {attribute:9s} {row['seen pairs']:11.3f} {row['held-out pairs']:9.3f} "
                  f"{row['majority class']:9.3f} {row['n held-out']:6d}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
