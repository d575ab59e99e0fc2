"""GenEval-style text-to-image benchmark on held-out colour/shape combinations, judged by the scene oracle.

    python training/bench_geneval.py --model assets/mllm                       # 20 prompts per category
    python training/bench_geneval.py --model assets/mllm --per-category 50 --json geneval.json
    python training/bench_geneval.py --renders-only --per-category 200          # the oracle's ceiling alone
    python training/bench_geneval.py --model assets/mllm --best-of 4            # keep the model's own pick of 4
    python training/bench_geneval.py --model assets/mllm --best-of 8 --judge contrast caption   # two judges, same draws
    python training/bench_geneval.py --model assets/mllm --best-of 8 --judge contrast+questions contrast questions
    python training/bench_geneval.py --model assets/mllm --sample-seed 1        # the same prompts, another draw

Prompts: ``evotok.oracle.geneval_prompts`` — six categories (single object, two objects, counting,
colours, position, colour attribution), objects drawn only from ``HELDOUT_PAIRS`` (never seen in
training), phrased like the scene world's captions. Each prompt has a reference render that makes
it true (``render_spec``).

Prints one markdown table: per category, the share of generated images the oracle accepts; the
share of the reference renders *passed through the model's image tokenizer* (encode, decode at the
pixel depth) it accepts — what a perfect generator writing these codes would score, so a gap here
is the tokenizer's, not the language model's; and the oracle's own accuracy on the reference renders
(true prompts accepted = the oracle's ceiling, near-miss prompts rejected). The overall score is the
mean of categories, as in GenEval. A second table says what the oracle found in the generations
(objects asked for and found; asked-for shapes, colours and pairs found), which tells drawing
apart from composition. With ``--best-of n``, a third table judges all n candidates of each
prompt: the share accepted (one image's score, from n times the draws) and the share of prompts
with at least one accepted, the most any way of picking among these candidates could score.
For a model that writes layout plans (``evotok.mllm.layout_plan``), a table judges the plans as
they stand (each planned object at its cell's centre), which tells a wrong plan apart from a
drawing that did not follow a good one. Below it: FID (bundled Inception) of the generations, and
of the reconstructions, against the reference renders, and seconds per image (prompt to decoded
pixels, batched). FID on a few hundred images is biased upwards; compare it only between runs of
the same size.
"""
from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import HELDOUT_PAIRS, TRAIN_PAIRS  # noqa: E402
from evotok.hub import CheckpointError  # noqa: E402
from evotok.images import pil_to_tensor, tensor_to_pil  # noqa: E402
from evotok.mllm.layout_plan import parse_plan, plan_detections  # noqa: E402
from evotok.mllm.rerank import DEFAULT_JUDGE, JUDGES  # noqa: E402
from evotok.oracle import (GENEVAL_CATEGORIES, PromptSpec, SceneOracle, geneval_prompts, judge,  # noqa: E402
                           reference_renders, render_accuracy)


def load_oracle(path: str) -> SceneOracle:
    try:
        return SceneOracle.from_pretrained(path).eval()
    except CheckpointError as err:
        raise SystemExit(f"cannot load the scene oracle from {path!r} ({err}).\n"
                         f"Train one with: nice -n 10 python training/train_oracle.py --out {path}") from None


def generate(model: Any, specs: list[PromptSpec], args: argparse.Namespace
             ) -> tuple[torch.Tensor, float, torch.Tensor, list[str] | None, dict[str, torch.Tensor]]:
    """Decoded images ``n 3 H W`` in [-1, 1] for the specs' prompts, seconds per image (with
    ``--best-of n``, per kept image: n drawn, read back and scored by the first ``--judge``), every
    candidate's codes (``n best_of h w L``), for a model that writes layout plans each prompt's
    plan, and each judge's pick among each prompt's candidates (indices ``n``; the first judge's
    picks are the kept images, the others' are scored on the same candidates, untimed)."""
    from evotok.mllm.rerank import draw_candidates, pick_best, read_back

    images, candidates = [], []
    picks: dict[str, list[torch.Tensor]] = {name: [] for name in args.judge}
    trace: list[str] = []  # a planning model's plans, one per drawn candidate
    seconds = 0.0
    for first in range(0, len(specs), args.batch_size):
        prompts = [s.prompt for s in specs[first:first + args.batch_size]]
        start = time.perf_counter()
        drawn = draw_candidates(model, prompts, args.best_of, guidance_scale=args.guidance,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                attribute_guidance=args.attribute_guidance, seed=args.sample_seed * 100_003 + first,
                                plan_trace=trace, region_guidance=args.region_guidance,
                                place_guidance=args.place_guidance)
        read = read_back(model, drawn) if args.best_of > 1 else None  # once, for every judge
        kept, scores = pick_best(model, prompts, drawn, judge=args.judge[0], read=read)
        images.append(model.decode_codes(kept).float().cpu())
        seconds += time.perf_counter() - start
        picks[args.judge[0]].append(scores.argmax(1))
        for name in args.judge[1:]:
            picks[name].append(pick_best(model, prompts, drawn, judge=name, read=read)[1].argmax(1))
        candidates.append(drawn.cpu())
        done = first + len(prompts)
        print(f"  generated {done}/{len(specs)} ({seconds / done:.2f} s/image)", flush=True)
    # plans are written greedily: every candidate of a prompt shares one
    plans = trace[::args.best_of] if model.config.layout_plan else None
    return (torch.cat(images), seconds / len(specs), torch.cat(candidates), plans,
            {name: torch.cat(p) for name, p in picks.items()})


def judge_plans(specs: list[PromptSpec], plans: list[str], verdicts: list[bool], grid: int,
                margin: float) -> tuple[dict[str, dict[str, float]], list[bool | None]]:
    """Per category, for a model that writes layout plans: the share of plans that parse, that the
    oracle's judge accepts as they stand (the plan's objects at their cells' centres), and of the
    images whose plan it accepts, the share it accepts too (the drawing followed a good plan).
    Also each prompt's plan verdict (``None``: the plan did not parse)."""
    plan_verdicts: list[bool | None] = []
    per: dict[str, dict[str, list[bool]]] = {}
    for spec, text, image_ok in zip(specs, plans, verdicts):
        plan = parse_plan(text, grid)
        ok = None if plan is None else judge(spec, plan_detections(plan, grid), margin)
        plan_verdicts.append(ok)
        row = per.setdefault(spec.category, {"parsed": [], "accepted": [], "image_given_plan": []})
        row["parsed"].append(plan is not None)
        row["accepted"].append(bool(ok))
        if ok:
            row["image_given_plan"].append(image_ok)
    table = {cat: {**{k: float(np.mean(v)) if v else float("nan") for k, v in row.items()},
                   "n": len(row["parsed"]), "n_accepted": len(row["image_given_plan"])}
             for cat, row in per.items()}
    return table, plan_verdicts


def near_entry(entry: Any, detections: list[dict[str, Any]], grid: int, same_object: bool = False) -> bool:
    """Whether a detection is centred within one cell's width of the plan entry's cell centre
    (``same_object``: one with the entry's colour and shape)."""
    centre = np.array([(entry.col + 0.5) / grid, (entry.row + 0.5) / grid])
    return any(np.linalg.norm(np.array(d["centre"]) - centre) <= 1.0 / grid
               and (not same_object or (d["colour"], d["shape"]) == (entry.colour, entry.shape)) for d in detections)


def plan_following(specs: list[PromptSpec], plans: list[str], detections: list[list[dict[str, Any]]],
                   grid: int) -> dict[str, dict[str, float]]:
    """Per category, over the entries of the plans that parse: the share with an object drawn at the
    entry's cell (within one cell's width of its centre), the share with the planned object there,
    and, as the chance level of a drawing that ignores where its plan puts things, the share of the
    entries of the next prompt's plan in the same category that the image has an object at."""
    per: dict[str, dict[str, list[bool]]] = {}
    by_category: dict[str, list[tuple[list, list]]] = {}
    for spec, text, found in zip(specs, plans, detections):
        by_category.setdefault(spec.category, []).append((parse_plan(text, grid), found))
    for cat, rows in by_category.items():
        row = per.setdefault(cat, {"object_at_cell": [], "planned_object_at_cell": [], "other_plan_cell": []})
        for k, (plan, found) in enumerate(rows):
            other = rows[(k + 1) % len(rows)][0] if len(rows) > 1 else None
            for entry in plan or []:
                row["object_at_cell"].append(near_entry(entry, found, grid))
                row["planned_object_at_cell"].append(near_entry(entry, found, grid, same_object=True))
            for entry in other or []:
                row["other_plan_cell"].append(near_entry(entry, found, grid))
    return {cat: {**{k: float(np.mean(v)) if v else float("nan") for k, v in row.items()},
                  "entries": len(row["object_at_cell"])} for cat, row in per.items()}


def following_markdown(table: dict[str, dict[str, float]]) -> str:
    rows = ["| category | plan entries | an object at the entry's cell | the planned object there | "
            "chance: an object at the next prompt's planned cell |", "|" + "---|" * 5]
    for cat in GENEVAL_CATEGORIES:
        if cat in table:
            t = table[cat]
            rows.append(f"| {cat} | {t['entries']} | {t['object_at_cell']:.2f} | {t['planned_object_at_cell']:.2f} | "
                        f"{t['other_plan_cell']:.2f} |")
    return "\n".join(rows)


def plans_markdown(table: dict[str, dict[str, float]]) -> str:
    rows = ["| category | n | plan parses | judge accepts the plan | image accepted, of those with an accepted plan |",
            "|" + "---|" * 5]
    for cat in GENEVAL_CATEGORIES:
        if cat in table:
            t = table[cat]
            given = f"{t['image_given_plan']:.2f} ({t['n_accepted']})" if t["n_accepted"] else "–"
            rows.append(f"| {cat} | {t['n']} | {t['parsed']:.2f} | {t['accepted']:.2f} | {given} |")
    return "\n".join(rows)


def judge_candidates(model: Any, oracle: SceneOracle, specs: list[PromptSpec], candidates: torch.Tensor,
                     picks: dict[str, torch.Tensor] | None = None,
                     records: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per category, of all ``best_of`` candidates drawn for each prompt: the share the oracle
    accepts (one image's score, from ``best_of`` times the draws), the share of prompts with at
    least one accepted (what a perfect judge of the candidates would score) and, under
    ``picked_by``, the share each judge's picks (``picks``: judge -> candidate index per prompt)
    that the oracle accepts. ``records`` (one per spec) gain each candidate's verdict and each
    judge's pick, so that judges can be compared prompt by prompt."""
    n = candidates.shape[1]
    verdicts = []
    for first in range(0, len(specs), 8):
        chunk = candidates[first:first + 8].flatten(0, 1)
        detections = oracle.detect(model.decode_codes(chunk.to(model.device)).clamp(-1, 1).float().cpu())
        verdicts += [judge(specs[first + k // n], d, oracle.config.position_margin) for k, d in enumerate(detections)]
    accepted = np.array(verdicts).reshape(len(specs), n)
    picked = {name: accepted[np.arange(len(specs)), index.numpy()] for name, index in (picks or {}).items()}
    for i, record in enumerate(records or []):
        record.update(candidates_passed=accepted[i].tolist(),
                      picks={name: int(index[i]) for name, index in (picks or {}).items()})
    table: dict[str, dict[str, Any]] = {}
    for cat in dict.fromkeys(s.category for s in specs):
        mine = np.array([s.category == cat for s in specs])
        rows = accepted[mine]
        table[cat] = {"mean": float(rows.mean()), "any": float(rows.any(1).mean()), "n": len(rows),
                      "picked_by": {name: float(ok[mine].mean()) for name, ok in picked.items()}}
    cats = list(table.values())
    table["overall"] = {key: float(np.mean([t[key] for t in cats])) for key in ("mean", "any")}
    table["overall"].update(n=len(specs), picked_by={name: float(np.mean([t["picked_by"][name] for t in cats]))
                                                     for name in picked})
    return table


def score(specs: list[PromptSpec], verdicts: list[bool]) -> dict[str, dict[str, float]]:
    """The oracle's verdict on each prompt's image, averaged per category and over categories."""
    per: dict[str, list[bool]] = {}
    for spec, passed in zip(specs, verdicts):
        per.setdefault(spec.category, []).append(passed)
    table = {cat: {"score": float(np.mean(v)), "n": len(v)} for cat, v in per.items()}
    table["overall"] = {"score": float(np.mean([t["score"] for t in table.values()])), "n": len(specs)}
    return table


def drawing_breakdown(specs: list[PromptSpec], detections: list[list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per category, what the oracle found in the generated images, to tell drawing apart from
    composition: objects asked for and detected (means per image; counting asks for ``count``), the
    share of images with fewer objects detected than asked for and with more, and the share of
    asked-for objects whose shape, whose colour (where the prompt names one), and whose
    colour and shape together are among the detections."""
    per: dict[str, dict[str, list[float]]] = {}
    for spec, dets in zip(specs, detections):
        row = per.setdefault(spec.category, {"asked": [], "found": [], "fewer": [], "more": [], "shape": [],
                                             "colour": [], "pair": []})
        asked = spec.count if spec.count is not None else len(spec.objects)
        row["asked"].append(asked)
        row["found"].append(len(dets))
        row["fewer"].append(len(dets) < asked)
        row["more"].append(len(dets) > asked)
        shapes, colours = {d["shape"] for d in dets}, {d["colour"] for d in dets}
        pairs = {(d["colour"], d["shape"]) for d in dets}
        for colour, shape in spec.objects:
            row["shape"].append(shape in shapes)
            if colour is not None:
                row["colour"].append(colour in colours)
                row["pair"].append((colour, shape) in pairs)
    return {cat: {**{k: float(np.mean(v)) if v else float("nan") for k, v in row.items()}, "n": len(row["asked"])}
            for cat, row in per.items()}


ONE_OBJECT_CATEGORIES = ("single_object", "colours")


def one_object_by_pair(specs: list[PromptSpec], detections: list[list[dict[str, Any]]],
                       verdicts: list[bool]) -> dict[str, dict[str, float]]:
    """Prompts that ask for one object of a named colour, by colour-shape pair: how many pass, and
    how often the asked shape and the asked colour are among the detections."""
    per: dict[str, dict[str, list[bool]]] = {}
    for spec, dets, passed in zip(specs, detections, verdicts):
        if spec.category not in ONE_OBJECT_CATEGORIES or spec.objects[0][0] is None:
            continue
        colour, shape = spec.objects[0]
        row = per.setdefault(f"{colour} {shape}", {"passed": [], "shape": [], "colour": []})
        row["passed"].append(passed)
        row["shape"].append(shape in {d["shape"] for d in dets})
        row["colour"].append(colour in {d["colour"] for d in dets})
    return {pair: {**{k: float(np.mean(v)) for k, v in row.items()}, "n": len(row["passed"])}
            for pair, row in sorted(per.items())}


def by_pair_markdown(table: dict[str, dict[str, float]]) -> str:
    rows = ["| pair | n | oracle accepts | asked shape found | asked colour found |", "|" + "---|" * 5]
    rows += [f"| {pair} | {r['n']} | {r['passed']:.2f} | {r['shape']:.2f} | {r['colour']:.2f} |"
             for pair, r in table.items()]
    return "\n".join(rows)


def breakdown_markdown(breakdown: dict[str, dict[str, float]]) -> str:
    rows = ["| category | n | objects asked (mean) | objects found | fewer found than asked | more found | "
            "asked shape found | asked colour found | asked colour and shape found |", "|" + "---|" * 9]
    for cat in GENEVAL_CATEGORIES:
        if cat in breakdown:
            b = breakdown[cat]
            cells = [f"{b[k]:.2f}" if b[k] == b[k] else "–"
                     for k in ("asked", "found", "fewer", "more", "shape", "colour", "pair")]
            rows.append(f"| {cat} | {b['n']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def candidates_markdown(generated: dict, candidates: dict, judges: list[str]) -> str:
    """The kept images' score (the first judge's picks), the other judges' picks on the same
    candidates, one candidate's and a perfect judge's."""
    others = judges[1:]
    rows = [f"| category | n | the model's pick ({judges[0]} judge) | "
            + "".join(f"{name} judge's pick | " for name in others)
            + "one candidate (mean of all) | any candidate (a perfect judge's pick) |",
            "|" + "---|" * (5 + len(others))]
    for cat in [*GENEVAL_CATEGORIES, "overall"]:
        if cat in candidates:
            c = candidates[cat]
            name = "**overall** (mean of categories)" if cat == "overall" else cat
            rows.append(f"| {name} | {c['n']} | {generated[cat]['score']:.3f} | "
                        + "".join(f"{c['picked_by'][j]:.3f} | " for j in others)
                        + f"{c['mean']:.3f} | {c['any']:.3f} |")
    return "\n".join(rows)


def markdown(ceiling: dict, generated: dict | None = None, recon: dict | None = None) -> str:
    columns = ["category", "n"] + (["generated: oracle accepts"] if generated else []) + \
        (["reconstructions: true accepted"] if recon else []) + \
        ["renders: true accepted (ceiling)", "renders: false rejected"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cat in [*GENEVAL_CATEGORIES, "overall"]:
        if cat not in ceiling:
            continue
        c = ceiling[cat]
        cells = ["**overall** (mean of categories)" if cat == "overall" else cat, str(c["n"])]
        if generated:
            cells.append(f"{generated[cat]['score']:.3f}")
        if recon:
            cells.append(f"{recon[cat]['true_accept']:.3f}")
        cells += [f"{c['true_accept']:.3f}", f"{c['false_reject']:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/mllm", help="saved EvoTokMLLM folder or hub id")
    parser.add_argument("--tokenizer", default=None, help="image tokenizer folder (default: the one the model records)")
    parser.add_argument("--oracle", default="assets/oracle", help="scene oracle folder (training/train_oracle.py)")
    parser.add_argument("--per-category", type=int, default=20, help="prompts per GenEval category")
    parser.add_argument("--seed", type=int, default=0, help="prompts, reference renders and sampling")
    parser.add_argument("--sample-seed", type=int, default=None,
                        help="sampling alone (default: --seed): another draw of the same prompts")
    parser.add_argument("--pairs", choices=("heldout", "train"), default="heldout",
                        help="colour/shape pairs of the prompts: held-out (the score) or seen in training "
                             "(separates composition from drawing quality)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (<= 0: none)")
    parser.add_argument("--attribute-guidance", type=float, default=None,
                        help="also guide by each prompt's shapes alone and colours alone, at this scale "
                             "(evotok.mllm.prompt_parts; for models trained with data.attribute_dropout)")
    parser.add_argument("--place-guidance", type=float, default=None,
                        help="a model that writes layout plans: also guide by the plan against the same plan "
                             "moved half the grid away, at this scale (evotok.mllm.plan_guidance)")
    parser.add_argument("--region-guidance", type=float, default=None,
                        help="a model that writes layout plans: each planned object also guides the cells its "
                             "plan gives it, at this scale (evotok.mllm.plan_guidance)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--best-of", type=int, default=1,
                        help="draw this many candidates per prompt and keep the one under which the prompt is the "
                             "model's likeliest caption (evotok.mllm.rerank; 1: one image, as plain generation)")
    parser.add_argument("--judge", choices=JUDGES, nargs="+", default=[DEFAULT_JUDGE],
                        help="how the model picks among its --best-of candidates: the prompt's likelihood as their "
                             "caption, or how much likelier the prompt is than its near misses (evotok.mllm.rerank). "
                             "The first judge's picks are the kept images; any others are scored on the same "
                             "candidates in the candidates table")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-fid", action="store_true", help="skip FID (bundled Inception)")
    parser.add_argument("--renders-only", action="store_true", help="only the oracle on the reference renders")
    parser.add_argument("--save-images", default=None, help="write each generated image here, named by verdict")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.per_category < 1:
        parser.error("--per-category must be at least 1")
    if args.best_of < 1:
        parser.error("--best-of must be at least 1")
    if args.guidance is not None and args.guidance <= 0:
        args.guidance = None
    if args.attribute_guidance is not None and args.guidance is None:
        parser.error("--attribute-guidance mixes guidance branches: it needs --guidance > 0")
    for flag, value in (("--place-guidance", args.place_guidance), ("--region-guidance", args.region_guidance)):
        if value is not None and args.guidance is None:
            parser.error(f"{flag} mixes guidance branches: it needs --guidance > 0")
    if args.place_guidance is not None and args.region_guidance is not None:
        parser.error("give --place-guidance or --region-guidance, not both")
    if args.sample_seed is None:
        args.sample_seed = args.seed
    torch.set_num_threads(args.threads)

    oracle = load_oracle(args.oracle)
    specs = geneval_prompts(args.per_category, seed=args.seed,
                            pairs=TRAIN_PAIRS if args.pairs == "train" else HELDOUT_PAIRS)
    model = None
    size = oracle.config.resolution
    if not args.renders_only:
        from evotok.mllm import EvoTokMLLM

        model = EvoTokMLLM.from_pretrained(args.model, image_tokenizer=args.tokenizer).to(args.device).eval()
        size = model.tokenizer.config.image_size
    renders = reference_renders(specs, seed=args.seed, resolution=size)
    ceiling = render_accuracy(oracle, specs, renders, seed=args.seed)
    results: dict[str, Any] = {"model": None if args.renders_only else args.model, "oracle": args.oracle,
                               "pairs": args.pairs,
                               "per_category": args.per_category, "seed": args.seed, "sample_seed": args.sample_seed,
                               "image_size": size,
                               "renders": ceiling, "prompts": [s.to_dict() for s in specs]}
    generated = recon = None
    if model is not None:
        real = torch.stack([pil_to_tensor(img, size) for img in renders])
        reconstructions = model.tokenizer.reconstruct(real.to(model.device)).float().cpu()
        recon = render_accuracy(oracle, specs, list(reconstructions), seed=args.seed)
        results["reconstructions"] = recon
        print(f"generating {len(specs)} images ({args.per_category} per category, guidance {args.guidance}, "
              f"attribute guidance {args.attribute_guidance}, place guidance {args.place_guidance}, "
              f"region guidance {args.region_guidance}, "
              f"batch {args.batch_size}, {args.threads} threads, {args.device})", flush=True)
        images, seconds, candidates, plans, picks = generate(model, specs, args)
        detections: list[list[dict[str, Any]]] = []
        for first in range(0, len(images), 64):
            detections += oracle.detect(images[first:first + 64])
        verdicts = [judge(s, d, oracle.config.position_margin) for s, d in zip(specs, detections)]
        generated = score(specs, verdicts)
        results.update(generated=generated, found=drawing_breakdown(specs, detections),
                       one_object_by_pair=one_object_by_pair(specs, detections, verdicts),
                       seconds_per_image=seconds, batch_size=args.batch_size,
                       sampling={"guidance": args.guidance, "attribute_guidance": args.attribute_guidance,
                                 "place_guidance": args.place_guidance, "region_guidance": args.region_guidance,
                                 "temperature": args.temperature, "top_k": args.top_k,
                                 "top_p": args.top_p, "best_of": args.best_of,
                                 "judge": args.judge[0], "judges": args.judge},
                       prompts=[{**s.to_dict(), "passed": v, "detections": d}
                                for s, d, v in zip(specs, detections, verdicts)])
        if plans is not None:
            results["plans"], plan_verdicts = judge_plans(specs, plans, verdicts, model.config.grid_size,
                                                          oracle.config.position_margin)
            for record, text, ok in zip(results["prompts"], plans, plan_verdicts):
                record.update(plan=text, plan_passed=ok)
            results["plan_following"] = plan_following(specs, plans, detections, model.config.grid_size)
        if args.best_of > 1:
            results["candidates"] = judge_candidates(model, oracle, specs, candidates, picks, results["prompts"])
        if not args.no_fid:
            from evotok.metrics import fid_bundled

            results["fid_bundled"] = fid_bundled(real, images)
            results["fid_bundled_reconstructions"] = fid_bundled(real, reconstructions)
        if args.save_images:
            out = Path(args.save_images)
            out.mkdir(parents=True, exist_ok=True)
            for i, (spec, image, rec) in enumerate(zip(specs, images, results["prompts"])):
                verdict = "pass" if rec["passed"] else "fail"
                tensor_to_pil(image).save(out / f"{i:04d}_{spec.category}_{verdict}.png")

    title = f"GenEval-style score on {'held-out' if args.pairs == 'heldout' else 'training'} colour/shape pairs" + \
        ("" if model is None else f" — {args.model}, guidance {args.guidance}"
         + (f", best of {args.best_of} by the model's own {args.judge[0]} score" if args.best_of > 1 else ""))
    print(f"\n{title}\n\n{markdown(ceiling, generated, recon)}")
    if model is not None:
        print(f"\nWhat the oracle found in the generated images\n\n{breakdown_markdown(results['found'])}")
        if args.pairs == "heldout":  # 7 pairs (the training pairs' table, in the JSON, has 41)
            print("\nOne-object prompts (" + ", ".join(ONE_OBJECT_CATEGORIES) + ") by colour-shape pair\n\n"
                  + by_pair_markdown(results["one_object_by_pair"]))
        if "plans" in results:
            print(f"\nThe model's layout plans, judged as they stand (objects at their cells' centres)\n\n"
                  f"{plans_markdown(results['plans'])}")
            print(f"\nWhere the drawings put the planned objects (the oracle's detections against the plan)\n\n"
                  f"{following_markdown(results['plan_following'])}")
        if "candidates" in results:
            print(f"\nAll {args.best_of} candidates of each prompt, judged by the oracle\n\n"
                  f"{candidates_markdown(generated, results['candidates'], args.judge)}")
        if "fid_bundled" in results:
            print(f"\nFID (bundled Inception) against the {len(specs)} reference renders: generations "
                  f"{results['fid_bundled']:.2f}; the tokenizer's reconstructions of the renders "
                  f"{results['fid_bundled_reconstructions']:.2f}")
        print(f"Seconds per image (prompt to pixels, batch {args.batch_size}, {args.device}): "
              f"{results['seconds_per_image']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=_jsonable))
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    main()
