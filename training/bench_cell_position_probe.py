"""Do the multimodal model's image tokens know where they are?

``bench_position_probe.py`` reads the answer position; this reads the image cells themselves. Each
scene image is put to the model with one question, and the LM's hidden state at every image cell is
kept after every layer. Two 8-way linear probes per layer (ridge classifiers on standardised states,
which fit in seconds where logistic regression takes minutes on this many cells), fitted on the
cells of 70% of the images and scored on the cells of the rest, read the cell's row and its column
(chance 0.125). If the cells hold their column but the answer does not, what is missing is the step that
carries the named object's place to the answer; if the cells do not hold it, nothing downstream
can read it.

Measured (200 scenes: cells of 140 images fitted, of 60 scored): on stage 8
(runs/mllm_grid_rope/final) the row reads 1.000, 0.991, 0.931, 0.807, 0.740 after the embedding and
layers 1-4, the column 1.000, 0.994, 0.922, 0.809, 0.703; on stage 7 (runs/mllm_place/final) row
1.000-0.673, column 1.000-0.656. The cells hold both equally, while stage 8's answer reads the row
and not the column (``bench_position_probe.py --questions place``); stage 11 (bundled until
stage 19) reads both at the answer.

    python training/bench_cell_position_probe.py --model assets/mllm
    python training/bench_cell_position_probe.py --model runs/mllm_grid_rope/final --json cells.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import SceneWorld  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.mllm import EvoTokMLLM  # noqa: E402
from evotok.mllm.generate import answer_inputs  # noqa: E402
from training.bench_position_probe import layer_states, probe_arguments  # noqa: E402

QUESTION = "Is the red star left or right of the middle of the image?"


@torch.no_grad()
def cell_states(model: EvoTokMLLM, images: torch.Tensor, question: str = QUESTION) -> np.ndarray:
    """``layers+1 × b × cells × hidden``: the LM's hidden state at each image cell after every layer."""
    embeds, mask, cell_index = answer_inputs(model, [question] * len(images), model.encode_images(images))
    layers = layer_states(model, embeds, mask, cell_index)
    cells = layers[:, cell_index >= 0]  # layers+1 × (b·cells) × hidden, image by image in raster order
    return cells.view(len(layers), len(images), model.config.num_cells, -1).float().numpy()


def main(argv: list[str] | None = None) -> dict:
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    probe_arguments(parser, batch_size=50)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = EvoTokMLLM.from_pretrained(args.model).eval()
    size, g = model.tokenizer.config.image_size, model.config.grid_size
    world = SceneWorld(size, seed=args.seed, split="train")
    states = []
    for k in range(0, args.images, args.batch_size):
        batch = torch.stack([pil_to_tensor(world[i].image, size) for i in range(k, min(k + args.batch_size, args.images))])
        states.append(cell_states(model, batch))
    states = np.concatenate(states, axis=1)  # layers+1, images, cells, hidden
    cut = int(0.7 * states.shape[1])
    cell = np.arange(model.config.num_cells)
    results = {"model": args.model, "images": args.images, "cells": int(states.shape[2]), "probes": {}}
    for name, label in (("row", cell // g), ("column", cell % g)):
        scores = []
        for layer in states:
            train, test = layer[:cut].reshape(-1, layer.shape[-1]), layer[cut:].reshape(-1, layer.shape[-1])
            probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0)).fit(train, np.tile(label, cut))
            scores.append(float(probe.score(test, np.tile(label, layer.shape[0] - cut))))
        results["probes"][name] = scores

    print(f"\nImage cells' own row and column ({args.images} scenes, {g}×{g} grid, chance {1 / g:.3f}); "
          "accuracy on the cells of the held-back 30% of images")
    print(f"{'read':<8}probe after embedding, layer 1, 2, ...")
    for name, scores in results["probes"].items():
        print(f"{name:<8}" + " ".join(f"{s:.3f}" for s in scores))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
