"""How the multimodal model's drawing leans on each word of the prompt, read without sampling.

Teacher-forced: single-object scenes (seen pairs and held-out pairs) are encoded by the image
tokenizer, and the model scores their true codes, cell by cell, as the drawing of a prompt. The
score is the code negative log-likelihood (nats per cell, summed over the pixel-depth stages) on
the object's cells (the cells whose centre lies in the object's box, as in
``bench_attribute_probe.py``), on its onset cells (the object's top row of cells, where a
raster-order drawing first meets it: ``evotok.mllm.onset_weights``) and on the background cells.
Prompts:

* the scene's own caption;
* the caption with another shape, or another colour, named (a wrong prompt should cost more);
* the empty prompt (the unconditional branch of guidance);
* the caption's shapes alone and colours alone (``evotok.mllm.prompt_parts``).

The held-out minus seen difference on the object cells under the true caption is how much worse
the model knows a drawing of a colour-shape pair it never drew: a low-noise companion to the
GenEval-style score, which samples and judges whole images. A second table splits it by held-out
pair: each pair's cost against what its shape and its colour cost on seen pairs (the additive
expectation: same-shape mean + same-colour mean - seen mean), so that a deficit shared by all
pairs can be told from one that a few pairs carry.

With ``--probe``, linear probes of colour and shape are fitted on the hidden states that draw the
seen-pair object cells and scored on the held-out ones (plain and gap-masked, as in
``bench_attribute_probe.py``): whether the state the depth head draws from carries a pair it never
drew. A model trained with the cell-attribute loss also gets its own read-outs' accuracy.

A model that writes layout plans (``evotok.mllm.layout_plan``) draws after its plan, so each
prompt is followed by the plan it names: the scene's object at its true size and cell, in the
prompt's colour and shape (none after the empty prompt). The shapes-only and colours-only prompts
name no whole object to plan and are left out for such a model; one more row gives the caption
with its object planned half the grid away, which costs more only if the drawing follows the
plan's place; the onset cells are where it should cost most, since there nothing drawn yet shows
where the object is.

    python training/bench_drawing_likelihood.py --model assets/mllm --scenes 200
    python training/bench_drawing_likelihood.py --model assets/mllm --scenes 400 --probe
"""
from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import COLOURS, SHAPES, SceneWorld  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.mllm import EvoTokMLLM, encode_generation  # noqa: E402
from evotok.mllm.cell_attributes import object_cells  # noqa: E402
from evotok.mllm.generate import encoded_anchor_row, left_pad, positions_of  # noqa: E402
from evotok.mllm.layout_plan import PlannedObject, centre_cell, parse_plan, plan_text  # noqa: E402
from evotok.mllm.onset_weights import onset_cells  # noqa: E402
from evotok.mllm.plan_canvas import canvas_ids, stack_canvases  # noqa: E402
from evotok.mllm.plan_guidance import moved_plan  # noqa: E402
from evotok.mllm.prompt_parts import colours_only, fix_articles, shapes_only  # noqa: E402

PROMPTS = ("caption", "another shape", "another colour", "empty", "shapes only", "colours only")
# a planning model: the prompts that name a whole object (or none) to plan, and the caption with its
# object planned at a far cell (does the drawing follow the plan's place?)
PLANNED_PROMPTS = (*PROMPTS[:4], "plan at another cell")
SPLITS = {"seen": ("train", 4242), "held-out": ("heldout", 4343)}  # split, world seed


@torch.no_grad()
def code_nll(model: EvoTokMLLM, prompts: Sequence[str], codes: torch.Tensor,
             plans: Sequence[str | None] | None = None) -> torch.Tensor:
    """Teacher-forced negative log-likelihood of ``codes`` (``b h w L``) as drawings of ``prompts``
    (each after its layout plan, when given): ``b cells L`` nats."""
    return drawing_pass(model, prompts, codes, plans)[0]


@torch.no_grad()
def drawing_pass(model: EvoTokMLLM, prompts: Sequence[str], codes: torch.Tensor,
                 plans: Sequence[str | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`code_nll` and the hidden state that draws each cell (``b cells hidden``)."""
    cfg, tok, n = model.config, model.text, model.config.num_cells
    plans = plans if plans is not None else [None] * len(prompts)
    encoded = [encode_generation(tok, p, n, cfg.max_prompt_tokens, truncate=True, plan=plan)
               for p, plan in zip(prompts, plans)]
    ids, mask = left_pad([e.input_ids for e in encoded], tok.ids["pad"], model.device)
    gen = left_pad([e.gen_mask for e in encoded], False, model.device, dtype=torch.bool)[0]
    anchors = None
    if cfg.plan_anchors:
        anchors = left_pad([encoded_anchor_row(model, e, plan) if plan else [-1] * len(e)
                            for e, plan in zip(encoded, plans)], -1, model.device)[0]
    canvas = None
    if cfg.plan_canvas:
        canvas = stack_canvases([canvas_ids(parse_plan(plan, cfg.grid_size) or [], cfg.grid_size) if plan else None
                                 for plan in plans], n)
    codes = codes[..., : cfg.pixel_depth].to(model.device)
    embeds = model.embed_inputs(ids, gen_mask=gen, gen_codes=codes, anchor_cells=anchors, canvas_ids=canvas)
    hidden, _ = model.backbone(embeds, mask, positions_of(mask), cell_index=model.cell_index(None, gen))
    states = model.drawing_states(hidden, gen)
    logits, targets = model.code_logits(states, codes)
    picked = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    return -picked.view(len(prompts), n, cfg.pixel_depth).cpu(), states.view(len(prompts), n, -1)


def prompt_variants(caption: str, colour: str, shape: str, rng: np.random.Generator) -> dict[str, str]:
    other_shape = str(rng.choice([s for s in SHAPES if s != shape]))
    other_colour = str(rng.choice([c for c in COLOURS if c != colour]))
    return {"caption": caption,
            "another colour": fix_articles(re.sub(rf"\b{colour}\b", other_colour, caption)),
            "another shape": fix_articles(re.sub(rf"\b{shape}\b", other_shape, caption)),
            "empty": "",
            "shapes only": shapes_only(caption),
            "colours only": colours_only(caption)}


def named_plan(prompt: str, obj, grid: int, moved: bool = False) -> str | None:
    """The layout plan ``prompt`` names for the scene's one object: its true size and cell, with the
    colour and the shape the prompt says (``None`` for the empty prompt). ``moved``: the cell half
    the grid away in both directions instead of the true one."""
    if not prompt:
        return None
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = next((w for w in words if w in COLOURS), obj.colour)
    shape = next((w for w in words if w in SHAPES), obj.shape)
    plan = [PlannedObject(obj.size, colour, shape, *centre_cell(obj, grid))]
    return plan_text(moved_plan(plan, grid) if moved else plan)


def measure(model: EvoTokMLLM, split: str, seed: int, count: int, batch_size: int,
            keep_states: bool = False) -> dict:
    """The scenes' code NLL under each prompt; ``keep_states``: also the drawing states of the
    object cells under the caption, with their colour and shape (``"states"``: for probes)."""
    world = SceneWorld(model.tokenizer.config.image_size, seed=seed, split=split,
                       scene_weights={"single_object": 1.0})
    grid, rng = model.config.grid_size, np.random.default_rng(seed)
    prompts = PLANNED_PROMPTS if model.config.layout_plan else PROMPTS
    object_nll = {p: [] for p in prompts}
    background_nll = {p: [] for p in prompts}
    onset_nll = {p: [] for p in prompts}
    stages, pairs = [], []
    readout = {"colour": [], "shape": []}  # the cell-attribute head's reading of object cells, if any
    kept, kept_labels = [], {"colour": [], "shape": []}
    for first in range(0, count, batch_size):
        indices = range(first, min(count, first + batch_size))
        samples = [world[i] for i in indices]
        objects = [world.scene(i).objects[0] for i in indices]
        images = torch.stack([pil_to_tensor(s.image, world.resolution) for s in samples])
        codes = model.encode_images(images.to(model.device))
        variants = [prompt_variants(s.caption, o.colour, o.shape, rng) for s, o in zip(samples, objects)]
        on_object = [object_cells(o, grid) for o in objects]
        onsets = [onset_cells([o], grid) for o in objects]
        for name in prompts:
            said = "caption" if name == "plan at another cell" else name
            plans = [named_plan(v[said], o, grid, moved=said != name) for v, o in zip(variants, objects)] \
                if model.config.layout_plan else None
            nll, states = drawing_pass(model, [v[said] for v in variants], codes, plans)
            for k, (obj, inside) in enumerate(zip(objects, on_object) if name == "caption" else ()):
                cell_states = states[k, torch.from_numpy(inside).to(states.device)]
                colour, shape = list(COLOURS).index(obj.colour), list(SHAPES).index(obj.shape)
                if model.cell_attributes is not None:
                    colour_logits, shape_logits = model.cell_attributes(cell_states)
                    readout["colour"] += (colour_logits.argmax(-1) == colour).tolist()
                    readout["shape"] += (shape_logits.argmax(-1) == shape).tolist()
                if keep_states:
                    kept.append(cell_states.float().cpu().numpy())
                    kept_labels["colour"] += [colour] * len(cell_states)
                    kept_labels["shape"] += [shape] * len(cell_states)
            for k, (inside, onset) in enumerate(zip(on_object, onsets)):
                object_nll[name].append(float(nll[k, inside].sum(-1).mean()))
                onset_nll[name].append(float(nll[k, onset].sum(-1).mean()))
                background_nll[name].append(float(nll[k, ~inside].sum(-1).mean()))
                if name == "caption":
                    stages.append(nll[k, inside].mean(0).numpy())
                    pairs.append((objects[k].colour, objects[k].shape))
    caption, caption_onset = np.array(object_nll["caption"]), np.array(onset_nll["caption"])
    extra = {"states": (np.concatenate(kept), {k: np.array(v) for k, v in kept_labels.items()})} if keep_states else {}
    return {**extra, "scenes": count,
            "caption_by_scene": [{"colour": c, "shape": k, "object": v} for (c, k), v in zip(pairs, caption)],
            "object": {p: float(np.mean(v)) for p, v in object_nll.items()},
            "onset": {p: float(np.mean(v)) for p, v in onset_nll.items()},
            "background": {p: float(np.mean(v)) for p, v in background_nll.items()},
            "object_stages": [float(x) for x in np.mean(stages, 0)],
            "object_sem": float(np.std(caption) / np.sqrt(count)),
            # each prompt against the caption on the same scenes: paired, so far tighter
            "object_sem_vs_caption": {p: float(np.std(np.array(v) - caption) / np.sqrt(count))
                                      for p, v in object_nll.items() if p != "caption"},
            "onset_sem_vs_caption": {p: float(np.std(np.array(v) - caption_onset) / np.sqrt(count))
                                     for p, v in onset_nll.items() if p != "caption"},
            "cell_readout": {k: float(np.mean(v)) for k, v in readout.items()} if readout["colour"] else None}


def by_pair(results: dict) -> list[dict]:
    """Each held-out pair's caption cost on its object cells against its additive expectation from
    seen pairs of the same shape and of the same colour."""
    seen, held = results["seen"]["caption_by_scene"], results["held-out"]["caption_by_scene"]
    seen_mean = float(np.mean([r["object"] for r in seen]))
    rows = []
    for colour, shape in sorted({(r["colour"], r["shape"]) for r in held}):
        own = [r["object"] for r in held if (r["colour"], r["shape"]) == (colour, shape)]
        same_shape = [r["object"] for r in seen if r["shape"] == shape]
        same_colour = [r["object"] for r in seen if r["colour"] == colour]
        row = {"pair": f"{colour} {shape}", "n": len(own), "held-out": float(np.mean(own)),
               "seen, same shape": float(np.mean(same_shape)) if same_shape else float("nan"),
               "seen, same colour": float(np.mean(same_colour)) if same_colour else float("nan")}
        row["additive expectation"] = row["seen, same shape"] + row["seen, same colour"] - seen_mean
        row["excess"] = row["held-out"] - row["additive expectation"]
        rows.append(row)
    return rows


def pair_markdown(rows: list[dict]) -> str:
    lines = ["| held-out pair | n | caption, object cells | seen, same shape | seen, same colour | additive expectation | excess |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['pair']} | {r['n']} | {r['held-out']:.2f} | {r['seen, same shape']:.2f} | "
              f"{r['seen, same colour']:.2f} | {r['additive expectation']:.2f} | {r['excess']:+.2f} |" for r in rows]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    seen, held = results["seen"], results["held-out"]
    lines = ["| prompt | object cells: seen pairs | held-out pairs | held-out − seen | onset cells: seen | "
             "held-out | background: seen | held-out |",
             "|---|---|---|---|---|---|---|---|"]
    for p in seen["object"]:
        lines.append(f"| {p} | {seen['object'][p]:.2f} | {held['object'][p]:.2f} | "
                     f"{held['object'][p] - seen['object'][p]:+.2f} | {seen['onset'][p]:.2f} | "
                     f"{held['onset'][p]:.2f} | {seen['background'][p]:.2f} | {held['background'][p]:.2f} |")
    lines += ["", "| caption, object cells, per stage | " + " | ".join(f"stage {j + 1}" for j in
                                                                      range(len(seen["object_stages"]))) + " |",
              "|---|" + "---|" * len(seen["object_stages"])]
    for name, r in (("seen pairs", seen), ("held-out pairs", held)):
        lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in r["object_stages"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/mllm", help="saved EvoTokMLLM folder or hub id")
    parser.add_argument("--scenes", type=int, default=200, help="single-object scenes per pair set")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", action="store_true",
                        help="also fit linear probes of colour and shape on the drawing states of seen-pair object "
                             "cells and score them on held-out pairs (plain and gap-masked, as bench_attribute_probe.py)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    torch.set_num_threads(args.threads)
    model = EvoTokMLLM.from_pretrained(args.model).to(args.device).eval()
    results = {"model": args.model}
    for name, (split, seed) in SPLITS.items():
        results[name] = measure(model, split, seed, args.scenes, args.batch_size, keep_states=args.probe)
    seen, held = results["seen"], results["held-out"]
    print(f"Code negative log-likelihood, nats per cell over {model.config.pixel_depth} stages, teacher-forced "
          f"({args.scenes} single-object scenes per pair set) — {args.model}\n")
    print(markdown(results))
    print(f"\nStandard errors, object cells: the caption row {seen['object_sem']:.2f} (seen) and "
          f"{held['object_sem']:.2f} (held-out), so about {np.hypot(seen['object_sem'], held['object_sem']):.2f} "
          "for held-out − seen; each prompt's difference from the caption on the same scenes: "
          + ", ".join(f"{p} {seen['object_sem_vs_caption'][p]:.2f} / {held['object_sem_vs_caption'][p]:.2f}"
                      for p in seen["object_sem_vs_caption"]) + " (seen / held-out); on the onset cells: "
          + ", ".join(f"{p} {seen['onset_sem_vs_caption'][p]:.2f} / {held['onset_sem_vs_caption'][p]:.2f}"
                      for p in seen["onset_sem_vs_caption"]))
    results["by_pair"] = by_pair(results)
    print("\nBy held-out pair, caption, object cells (additive expectation: the seen same-shape mean plus the "
          "seen same-colour mean minus the seen mean)\n")
    print(pair_markdown(results["by_pair"]))
    if seen["cell_readout"]:
        print("\nThe cell-attribute head's reading of the object cells under the caption (share named right, "
              "all classes in the softmax): " + "; ".join(
                  f"{name} colour {results[name]['cell_readout']['colour']:.3f}, shape "
                  f"{results[name]['cell_readout']['shape']:.3f}" for name in SPLITS))
    if args.probe:
        from training.bench_attribute_probe import probe

        train, held = results["seen"].pop("states"), results["held-out"].pop("states")
        results["state_probes"] = {a: probe(train, held, a) for a in ("colour", "shape")}
        print(f"\nLinear probes of the drawing states of object cells under the caption, fitted on the seen-pair "
              f"cells ({len(train[0])}), scored on the held-out ones ({len(held[0])})\n")
        print(probe_markdown(results["state_probes"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def probe_markdown(probes: dict) -> str:
    keys = ("plain: seen pairs", "plain: held-out pairs", "gaps masked: seen pairs", "gaps masked: held-out pairs",
            "majority class")
    lines = ["| attribute | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {a} | " + " | ".join(f"{p[k]:.3f}" for k in keys) + " |" for a, p in probes.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
