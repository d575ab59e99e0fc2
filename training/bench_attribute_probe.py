"""Which image representation can be read for colour and shape on colour-shape pairs never seen?

Probes are fitted on scenes of the training pairs and scored on scenes built only from the
held-out pairs (``HELDOUT_PAIRS``). Each is fitted twice:

* plain: softmax over every class. A probe fitted on seen pairs then also learns the gaps ("no red
  object is ever a star"), and on a red star it names a shape red was seen with;
* gaps masked: for each training example, the classes never seen with its other attribute are
  left out of the softmax (the shapes never paired with its colour, and so on), the cure the
  teacher's contrastive loss and the multimodal model's answers use (``evotok.mllm.answer_gaps``).
  What this probe reads on held-out pairs is in the features; what only the plain probe misses is
  the prior a model fitted on seen pairs adds.

Representations of the bundled tokenizer (and its teacher):

* grid cells: the semantic features at the semantic depth, one vector per cell, labelled with the
  object whose drawn box covers the cell's centre (cells on the background are left out), linear;
* grid 3×3: each such cell with its eight neighbours, through a one-hidden-layer MLP (what the
  multimodal model's ``GridContext`` projector branch can see);
* teacher cells: the teacher's own patch features (what the semantic decoder learns to predict), linear;
* summary: the teacher's pooled image embedding of the grid cells (``Teacher.embed_features``), on
  single-object scenes, linear.

Measured on the bundled tokenizer (defaults: 2000 / 600 scenes, 6101 held-out cells; majority
class 0.274), shape on held-out pairs, plain -> gaps masked: grid cells 0.120 -> 0.291, grid 3×3
0.408 -> 0.823 (seen-pair fit 0.992 / 0.953), teacher cells 0.102 -> 0.353, summary 0.745 -> 0.857
(98 single-object scenes). Colour reads at 0.89-1.00 everywhere. So shape is in the features, spread
over neighbouring cells, and the prior from the gaps hides it: the reason for the multimodal model's
``GridContext`` branch and gap-masked answers (``training/configs/mllm_gaps.yaml``). Two earlier
remedies did not help: the summary embedding as an extra input token (commit 06b9d13) and a teacher
trained with greyscale, shape-only views (commit 723f890; its patch features read shape at 0.112
with a plain linear probe, the bundled teacher's at 0.120).

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
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import COLOURS, SHAPES, TRAIN_PAIRS, SceneObject, SceneWorld  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.mllm.cell_attributes import cell_labels, gap_class_mask  # noqa: E402
from evotok.model import EvoTok  # noqa: E402
from evotok.teacher import load_teacher  # noqa: E402


CELL_REPRESENTATIONS = ("grid cells", "grid 3×3", "teacher cells")
MLP_REPRESENTATIONS = {"grid 3×3"}


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
        raster = features.transpose(1, 2).reshape(len(samples), -1, grid, grid)
        per_cell = {"grid cells": features, "teacher cells": teacher.image_features(images),
                    "grid 3×3": F.unfold(raster, kernel_size=3, padding=1).transpose(1, 2)}
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


def allowed_classes(other: np.ndarray, attribute: str) -> torch.Tensor:
    """``n × classes`` booleans: the classes of ``attribute`` seen in training with each example's
    other attribute (``other``: its colour index for a shape probe, its shape index for a colour probe)."""
    colour_gaps, shape_gaps = gap_class_mask(TRAIN_PAIRS)  # the last column is "background": not a class here
    gaps = shape_gaps if attribute == "shape" else colour_gaps
    return ~gaps[torch.from_numpy(other), :-1]


def fit_probe(x: np.ndarray, y: np.ndarray, classes: int, allowed: torch.Tensor | None, hidden: int = 0,
              steps: int = 2000, seed: int = 0):
    """Softmax regression (or a one-hidden-layer MLP) on standardised features: ``steps`` AdamW
    steps on minibatches of 256; ``allowed`` (``n × classes``) leaves the other classes out of each
    example's softmax."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(x).float()
    mean, std = x.mean(0), x.std(0) + 1e-5
    x, y = (x - mean) / std, torch.from_numpy(y)
    net = (torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes))
           if hidden else torch.nn.Linear(x.shape[1], classes))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(steps):
        idx = torch.randint(len(x), (256,), generator=generator)
        logits = net(x[idx])
        if allowed is not None:
            logits = logits.masked_fill(~allowed[idx], float("-inf"))
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict(features: np.ndarray) -> np.ndarray:
        return net((torch.from_numpy(features).float() - mean) / std).argmax(1).numpy()
    return predict


def probe(train: tuple, heldout: tuple, attribute: str, hidden: int = 0) -> dict[str, float]:
    """Seen-pair fit and held-out accuracy of a plain and a gap-masked probe of ``attribute``."""
    other = "colour" if attribute == "shape" else "shape"
    (x_train, labels_train), (x_held, labels_held) = train, heldout
    y_train, y_held = labels_train[attribute], labels_held[attribute]
    classes = len(SHAPES if attribute == "shape" else COLOURS)
    row = {}
    for name, allowed in (("plain", None), ("gaps masked", allowed_classes(labels_train[other], attribute))):
        predict = fit_probe(x_train, y_train, classes, allowed, hidden)
        row[f"{name}: seen pairs"] = float((predict(x_train) == y_train).mean())
        row[f"{name}: held-out pairs"] = float((predict(x_held) == y_held).mean())
    return {**row, "majority class": float(np.bincount(y_held).max() / len(y_held)), "n held-out": int(len(y_held))}


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
    print(f"\nProbes fitted on {args.train_scenes} scenes of seen pairs, scored on {args.heldout_scenes} scenes of "
          "held-out pairs (linear; grid 3×3: an MLP)")
    print(f"{'representation':15s} {'attribute':9s} | {'plain: seen':>11s} {'held-out':>9s} | "
          f"{'gaps masked: seen':>17s} {'held-out':>9s} | {'majority':>8s} {'n':>6s}")
    for name in (*CELL_REPRESENTATIONS, "summary"):
        for attribute in ("colour", "shape"):
            row = probe(train[name], held[name], attribute, hidden=256 if name in MLP_REPRESENTATIONS else 0)
            results["probes"][f"{name}/{attribute}"] = row
            print(f"{name:15s} {attribute:9s} | {row['plain: seen pairs']:11.3f} {row['plain: held-out pairs']:9.3f} | "
                  f"{row['gaps masked: seen pairs']:17.3f} {row['gaps masked: held-out pairs']:9.3f} | "
                  f"{row['majority class']:8.3f} {row['n held-out']:6d}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
