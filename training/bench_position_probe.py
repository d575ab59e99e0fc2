"""Where does the multimodal model lose "left or right" / "above or below"?

For every two-way position question the scene world can ask about a set of scenes ("Is the red
star left or right of the blue square?"), the question is put to the model with its image and the
LM's hidden state at the answer position is kept, after every layer. A logistic-regression probe
per layer is fitted on 70% of the questions and scored on the rest, next to the model's own choice
between the two answer words. A probe near the majority class at the last layer means the relation
is not computed at all (not merely computed and left unsaid); a probe that reads it where the
model does not would point at the output instead.

Measured on stage 7 (runs/mllm_place/final; defaults: 3000 seen-pair scenes, 1266 questions per
axis, each pair asked both ways round, so the majority class is 0.500): left or right, the model's
own choice 0.482 and the probe 0.500, 0.479, 0.489, 0.479, 0.508 after the embedding and layers
1-4; above or below, 0.518 and 0.500, 0.497, 0.524, 0.576, 0.529. The relation is not computed
(stage 6 read the same: 0.489-0.505 and 0.500-0.553; stage 8: 0.482-0.508 and 0.518-0.545).
Stage 11 (bundled until stage 19) computes above or below (model 0.955, probe 0.526-0.961) but not
yet left or right (0.553, probe 0.497-0.603).

``--questions place`` asks the one-object place questions instead ("Is the red star left or right of the
middle of the image?", ``evotok.data.scenes.place_questions``), the stepping stone to the relations.
On the same scenes (about 2,280 questions per axis, majority 0.51) stage 7, trained on them, answers
above or below at 0.816 (probe 0.584, 0.812, 0.812, 0.832 after layers 1-4) but left or right at
0.529 (probe 0.568, 0.587, 0.620, 0.595). Stage 6, never asked them, already held the row (probe
0.703-0.787) more than the column (0.555-0.606). Stage 8, with grid rotary positions
(``model.grid_rope``), answers 0.848 and 0.504 (probes 0.599-0.828 and 0.548-0.642): the column is
still not read, though the image cells hold it (``bench_cell_position_probe.py``). Stage 11, after
three GPU stages of larger batches, answers 0.977 and 0.853 (probes 0.586-0.975 and 0.587-0.852).

    python training/bench_position_probe.py --model assets/mllm
    python training/bench_position_probe.py --questions place
    python training/bench_position_probe.py --scenes 4000 --json position_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import SceneWorld, place_questions, question_candidates, split_pairs  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.mllm import EvoTokMLLM  # noqa: E402
from evotok.mllm.generate import answer_inputs, positions_of  # noqa: E402

AXES = {"left or right": ("left", "right"), "above or below": ("above", "below")}


def position_questions(world: SceneWorld, scenes: int, seed: int,
                       kind: str = "relations") -> list[tuple[int, str, str, int]]:
    """(scene index, axis, question, index of the answer word) for every two-way position question
    (``kind`` "relations": one object against another; "place": one object against the image's middle)."""
    if kind not in ("relations", "place"):
        raise ValueError(f"kind must be 'relations' or 'place', got {kind!r}")
    rng = np.random.default_rng(seed)
    pairs = split_pairs(world.split)
    found = []
    for i in range(scenes):
        objects = world.scene(i).objects
        asked = place_questions(objects, rng) if kind == "place" else question_candidates(objects, rng, pairs)["position"]
        for question, answer in asked:
            for axis, words in AXES.items():
                if answer in words:  # yes/no questions name no side
                    found.append((i, axis, question, words.index(answer)))
    return found


@torch.no_grad()
def answer_states(model: EvoTokMLLM, images: torch.Tensor, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states at the answer position after every layer (``layers+1 × b × hidden``) and the
    logits of the first answer token (``b × vocab``)."""
    embeds, mask, cell_index = answer_inputs(model, questions, model.encode_images(images))
    layers = layer_states(model, embeds, mask, cell_index)
    return layers[:, :, -1].float().numpy(), model.text_logits(layers[-1, :, -1]).float().numpy()


@torch.no_grad()
def layer_states(model: EvoTokMLLM, embeds: torch.Tensor, mask: torch.Tensor,
                 cell_index: torch.Tensor | None) -> torch.Tensor:
    """``layers+1 × b × L × hidden``: the LM's hidden states after the embedding and every layer,
    at the positions the answering path gives them (grid rotary positions included)."""
    out = model.lm.base_model(inputs_embeds=embeds, attention_mask=mask,
                              position_ids=model.lm_position_ids(positions_of(mask), cell_index),
                              output_hidden_states=True)
    return torch.stack(out.hidden_states)


def word_scores(model: EvoTokMLLM, logits: np.ndarray, words: tuple[str, str]) -> np.ndarray:
    """``b × 2``: each word's best first-token logit, with or without a leading space."""
    ids = [[model.text.encode(w)[0], model.text.encode(" " + w)[0]] for w in words]
    return np.stack([logits[:, i].max(axis=1) for i in ids], axis=1)


def probe_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """The arguments both probe scripts take: model, scene seed, batch size, threads, JSON output."""
    parser.add_argument("--model", default="assets/mllm")
    parser.add_argument("--seed", type=int, default=4242, help="scene world seed (not the training pool's 0)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("EVOTOK_THREADS", "2")))
    parser.add_argument("--json", help="also write the results here")


def main(argv: list[str] | None = None) -> dict:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    probe_arguments(parser, batch_size=64)
    parser.add_argument("--split", default="train", choices=("train", "heldout"),
                        help="scene pairs: position does not depend on them; train = the pairs the model saw")
    parser.add_argument("--scenes", type=int, default=3000)
    parser.add_argument("--questions", default="relations", choices=("relations", "place"),
                        help="relations: one object against another; place: one object against the image's middle")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = EvoTokMLLM.from_pretrained(args.model).eval()
    size = model.tokenizer.config.image_size
    world = SceneWorld(size, seed=args.seed, split=args.split)
    items = position_questions(world, args.scenes, args.seed, args.questions)
    images = {i: pil_to_tensor(world[i].image, size) for i in sorted({i for i, *_ in items})}
    results = {"model": args.model, "split": args.split, "scenes": args.scenes, "questions": args.questions, "axes": {}}
    for axis, words in AXES.items():
        chosen = [item for item in items if item[1] == axis]
        if len(chosen) < 20:
            raise SystemExit(f"only {len(chosen)} '{axis}' questions in {args.scenes} scenes; ask for more scenes")
        states, own = [], []
        for k in range(0, len(chosen), args.batch_size):
            batch = chosen[k:k + args.batch_size]
            batch_images = torch.stack([images[i] for i, *_ in batch])
            layer_states, logits = answer_states(model, batch_images, [q for _, _, q, _ in batch])
            states.append(layer_states)
            own.append(word_scores(model, logits, words).argmax(axis=1))
        states, own = np.concatenate(states, axis=1), np.concatenate(own)
        truth = np.array([t for *_, t in chosen])
        cut = int(0.7 * len(truth))
        test = truth[cut:]
        probes = []
        for layer in states:
            probe = LogisticRegression(max_iter=3000).fit(layer[:cut], truth[:cut])
            probes.append(float(probe.score(layer[cut:], test)))
        results["axes"][axis] = {
            "questions": len(truth), "test": len(test), "majority": float(max(test.mean(), 1 - test.mean())),
            "model_choice": float((own[cut:] == test).mean()), "probe_by_layer": probes}

    print(f"\nTwo-way position questions ({args.questions}), {args.split} pairs, {args.scenes} scenes; "
          "accuracy on the held-back 30%")
    print(f"{'axis':<16}{'n':>6}{'majority':>10}{'model':>8}  probe after embedding, layer 1, 2, ...")
    for axis, r in results["axes"].items():
        print(f"{axis:<16}{r['questions']:>6}{r['majority']:>10.3f}{r['model_choice']:>8.3f}  "
              + " ".join(f"{p:.3f}" for p in r["probe_by_layer"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
