"""Which output head lets a drawing generalise to colour-shape pairs never seen together?

A probe of the depth transformer's output head, apart from the language model: a small MLP maps
what a grid cell of a single-object scene should show (the object's colour, shape and size, the
background's kind, and where the cell's centre sits in the square the object is drawn in) to the
cell's stage-1 code from the bundled image tokenizer. It is trained on training-pair scenes and scored
(negative log-likelihood in nats, top-1 accuracy) on new scenes of seen pairs and of held-out pairs.
Heads:

* ``free``: a learned output vector per code (what the bundled model has);
* ``codebook``: ``evotok.mllm.codebook_head.CodebookHead``, codes scored by their vectors in the
  tokenizer;
* ``free-then-codebook``: trained with the free head, then the head swapped for a new codebook
  head and trained for a quarter as long again (what continuing a trained model does).

The held-out minus seen NLL says how much worse a head knows the codes of a pair it never saw.

    python training/bench_code_head_probe.py --scenes 12000
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
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import BACKGROUND_KINDS, COLOURS, SHAPES, SIZES, SceneWorld  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.mllm.cell_attributes import object_cells  # noqa: E402
from evotok.mllm.codebook_head import CodebookHead  # noqa: E402
from evotok.model import EvoTok  # noqa: E402

HEADS = ("free", "codebook", "free-then-codebook")
FEATURES = len(COLOURS) + len(SHAPES) + len(SIZES) + len(BACKGROUND_KINDS) + 2
SETS = {"train": ("train", 1), "seen": ("train", 2), "held-out": ("heldout", 3)}  # split, world seed


def cell_features(scene, grid: int) -> tuple[list[int], np.ndarray]:
    """The object's cells (``evotok.mllm.cell_attributes.object_cells``: centre inside the drawn
    shape's box) and each one's features."""
    obj = scene.objects[0]
    attributes = np.zeros(FEATURES - 2, np.float32)
    at = 0
    for value, names in ((obj.colour, list(COLOURS)), (obj.shape, SHAPES), (obj.size, list(SIZES)),
                         (scene.background["kind"], BACKGROUND_KINDS)):
        attributes[at + list(names).index(value)] = 1.0
        at += len(names)
    cells = np.flatnonzero(object_cells(obj, grid))
    rows, cols = np.divmod(cells, grid)
    # where the cell's centre sits in the square the object is drawn in, from -1 to 1 on each axis
    place = np.stack([(cols + 0.5) / grid - obj.centre[0], (rows + 0.5) / grid - obj.centre[1]], 1) * 2 / obj.extent
    features = np.concatenate([np.repeat(attributes[None], len(cells), 0), place], 1).astype(np.float32)
    return cells.tolist(), features


@torch.no_grad()
def collect(tokenizer: EvoTok, split: str, seed: int, count: int, batch_size: int = 200):
    """``(features N F, stage-1 codes N)`` over the object cells of ``count`` single-object scenes."""
    size, grid = tokenizer.config.image_size, tokenizer.config.grid_size
    world = SceneWorld(size, seed=seed, split=split, scene_weights={"single_object": 1.0})
    features, codes = [], []
    for first in range(0, count, batch_size):
        indices = range(first, min(count, first + batch_size))
        images = torch.stack([pil_to_tensor(world[i].image, size) for i in indices])
        stage1 = tokenizer.encode(images)[..., 0].flatten(1)  # b cells
        for k, i in enumerate(indices):
            cells, rows = cell_features(world.scene(i), grid)
            features.append(rows)
            codes.append(stage1[k, cells].numpy())
    return torch.from_numpy(np.concatenate(features)), torch.from_numpy(np.concatenate(codes)).long()


class Probe(nn.Module):
    def __init__(self, head: str, codebook: torch.Tensor, width: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEATURES, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                   nn.Linear(width, width), nn.GELU())
        self.codebook, self.width = codebook, width
        self.set_head(head)

    def set_head(self, head: str) -> None:
        if head == "free":
            self.head = nn.Linear(self.width, self.codebook.shape[0])
        else:
            self.head = CodebookHead(self.width, 1, self.codebook.shape[0], self.codebook.shape[1])
            self.head.set_codebooks(self.codebook[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return self.head(z) if isinstance(self.head, nn.Linear) else self.head.stage_logits(z, 0)


def fit(probe: Probe, data, epochs: int, seed: int) -> None:
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=0.01)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for first in range(0, len(x), 512):
            pick = order[first:first + 512]
            loss = F.cross_entropy(probe(x[pick]), y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def score(probe: Probe, data) -> dict:
    logits = probe(data[0])
    return {"nll": float(F.cross_entropy(logits, data[1])),
            "accuracy": float((logits.argmax(-1) == data[1]).float().mean())}


def run_head(head: str, sets: dict, codebook: torch.Tensor, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    probe = Probe("free" if head == "free-then-codebook" else head, codebook)
    fit(probe, sets["train"], epochs, seed)
    if head == "free-then-codebook":
        probe.set_head("codebook")
        fit(probe, sets["train"], max(1, epochs // 4), seed + 1)
    return {name: score(probe, data) for name, data in sets.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="assets/tokenizer")
    parser.add_argument("--scenes", type=int, default=12000, help="training scenes (single object each)")
    parser.add_argument("--eval-scenes", type=int, default=800, help="scenes of seen and of held-out pairs")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.scenes, args.eval_scenes, args.epochs) < 1:
        parser.error("--scenes, --eval-scenes and --epochs must be at least 1")
    torch.set_num_threads(args.threads)
    tokenizer = EvoTok.from_pretrained(args.tokenizer).eval()
    counts = {"train": args.scenes, "seen": args.eval_scenes, "held-out": args.eval_scenes}
    sets = {name: collect(tokenizer, split, seed, counts[name]) for name, (split, seed) in SETS.items()}
    codebook = tokenizer.quantizer.embed[0].detach().clone()
    results = {"tokenizer": args.tokenizer, "cells": {k: len(v[1]) for k, v in sets.items()}, "epochs": args.epochs,
               "heads": {h: run_head(h, sets, codebook, args.epochs, args.seed) for h in args.heads}}
    print(f"Stage-1 codes of object cells from scene features ({args.scenes} training scenes, "
          f"{results['cells']['train']} cells; {results['cells']['seen']} seen-pair and "
          f"{results['cells']['held-out']} held-out-pair cells)\n")
    print("| head | NLL train | NLL seen | NLL held-out | held-out − seen | accuracy seen | accuracy held-out |")
    print("|---|---|---|---|---|---|---|")
    for head, r in results["heads"].items():
        print(f"| {head} | {r['train']['nll']:.2f} | {r['seen']['nll']:.2f} | {r['held-out']['nll']:.2f} | "
              f"{r['held-out']['nll'] - r['seen']['nll']:+.2f} | {r['seen']['accuracy']:.3f} | "
              f"{r['held-out']['accuracy']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
