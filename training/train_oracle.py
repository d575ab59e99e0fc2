"""Train the scene oracle (colour segmentation + a small shape CNN) and measure it on real renders.

    nice -n 10 python training/train_oracle.py --out assets/oracle          # ~2-4 min on 2 CPU cores
    python training/train_oracle.py --out /tmp/oracle --scenes 300 --epochs 2 --eval-scenes 60 --per-category 20

Steps:
1. Calibrate the per-colour thresholds against the scene world's backgrounds.
2. Render training scenes (both splits, so every colour/shape pair and both sizes occur), half of
   them degraded the way an imperfect decoder degrades images (blur, down/up-sampling, noise,
   colour drift); segment them and label each component with the object it covers (fragments
   and strays get "other"); add synthetic "other" blobs (stretched ellipses, bars, half discs,
   merged shapes) that the scene world never draws.
3. Train the CNN on the crops.
4. Measure, on *fresh* held-out renders (seeds never used in training), clean and degraded:
   object detection precision/recall and whole-scene exact match; and the GenEval judge per
   category: how often it accepts true prompts and rejects near-miss false ones.
   The numbers go to ``<out>/README.md`` and ``<out>/metrics.json``.
"""
from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import (COLOURS, SHAPES, SceneWorld, _background_array,  # noqa: E402
                                _sample_background, _unit_outline, render_scene)
from evotok.oracle import (GENEVAL_CATEGORIES, OracleConfig, SceneOracle, calibrate_thresholds,  # noqa: E402
                           geneval_prompts, reference_renders, render_accuracy)

TRAIN_SEED_BASE = 1000  # training scenes use seeds from here; evaluation uses EVAL_SEED
EVAL_SEED = 777


# ----------------------------------------------------------------------------- data


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What an imperfect pixel decoder does to a render: blur, rounded corners with sharp edges and
    halos (strong blur, then unsharp masking), lost resolution, noise, colour drift."""
    img = image
    kind = rng.uniform()
    if kind < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.2, 2.5))))
        img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(150, 301)), threshold=0))
    elif kind < 0.65:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.5))))
    if rng.uniform() < 0.3:
        side = img.size[0]
        img = img.resize((side // 2, side // 2), Image.Resampling.BOX).resize((side, side), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if rng.uniform() < 0.5:
        arr = arr * rng.uniform(0.92, 1.08, size=3) + rng.uniform(-10, 10, size=3)
    if rng.uniform() < 0.5:
        arr = arr + rng.normal(0, rng.uniform(1, 6), size=arr.shape)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


def colour_noise(rng: np.random.Generator, resolution: int = 64) -> Image.Image:
    """A failed generation: a coarse random field of palette and muted colours, smoothly upsampled.
    Any palette-coloured patch in it is an irregular blob, never one of the world's shapes."""
    grid = int(rng.choice([6, 8, 12, 16]))
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    cells = rng.uniform(70, 190, size=(grid, grid, 3)).astype(np.float32)
    vivid = rng.uniform(size=(grid, grid)) < rng.uniform(0.2, 0.6)
    cells[vivid] = palette[rng.integers(len(palette), size=int(vivid.sum()))]
    small = Image.fromarray(np.clip(cells, 0, 255).astype(np.uint8))
    return small.resize((resolution, resolution), Image.Resampling.BICUBIC)


def other_blobs(rng: np.random.Generator, resolution: int = 64, supersample: int = 4) -> Image.Image:
    """One or two palette-coloured blobs the scene world never draws, on a scene-world background."""
    side = resolution * supersample
    canvas = Image.fromarray(np.ascontiguousarray(_background_array(_sample_background(rng), side)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):
        fill = tuple(COLOURS[list(COLOURS)[int(rng.integers(len(COLOURS)))]])
        e = rng.uniform(0.2, 0.42) * side
        cx, cy = rng.uniform(0.25, 0.75, size=2) * side
        kind = int(rng.integers(4))
        if kind in (0, 1):  # stretched ellipse or bar
            aspect = rng.uniform(1.9, 3.2)
            w, h = (e, e / aspect) if rng.uniform() < 0.5 else (e / aspect, e)
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            (draw.ellipse if kind == 0 else draw.rectangle)(box, fill=fill)
        elif kind == 2:  # half disc
            start = 90 * int(rng.integers(4))
            draw.pieslice((cx - e / 2, cy - e / 2, cx + e / 2, cy + e / 2), start, start + 180, fill=fill)
        else:  # two shapes of one colour run together
            for k in range(2):
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                ox, oy = (rng.uniform(-0.45, 0.45, size=2) * e) if k else (0.0, 0.0)
                pts = [(cx + ox + u * e, cy + oy + v * e) for u, v in _unit_outline(shape)]
                if shape == "circle":
                    draw.ellipse((cx + ox - e / 2, cy + oy - e / 2, cx + ox + e / 2, cy + oy + e / 2), fill=fill)
                else:
                    draw.polygon(pts, fill=fill)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def label_components(oracle: SceneOracle, image: Image.Image, objects: list[dict[str, Any]] | None
                     ) -> tuple[np.ndarray, list[int]]:
    """Crops of every component and their class indices: the shape of the scene object the
    component's centroid falls in (its largest component only), else "other"."""
    classes = oracle.config.classes
    other = classes.index("other")
    rgb = np.asarray(image.convert("RGB"))
    comps, crops = oracle.components(rgb)
    labels = [other] * len(comps)
    side = rgb.shape[0]
    claimed: set[int] = set()
    for n, comp in enumerate(comps):  # largest first
        x, y = comp.centroid[0] / side, comp.centroid[1] / side
        for k, obj in enumerate(objects or []):
            x0, y0, x1, y1 = obj["bbox"]
            pad = 1.5 / side
            inside = x0 - pad <= x <= x1 + pad and y0 - pad <= y <= y1 + pad
            if k not in claimed and obj["colour"] == comp.colour and inside:
                labels[n] = classes.index(obj["shape"])
                claimed.add(k)
                break
    return crops, labels


def build_dataset(oracle: SceneOracle, scenes: int, others: int, seed: int, degrade_prob: float = 0.5,
                  progress: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops ``n 2 S S`` and labels ``n`` from rendered scenes (both splits) and synthetic blobs."""
    worlds = [SceneWorld(oracle.config.resolution, seed=seed, split="train"),
              SceneWorld(oracle.config.resolution, seed=seed, split="heldout")]
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    start = time.time()
    for i in range(scenes):
        world = worlds[1 if i % 3 == 2 else 0]  # two thirds train-split scenes, one third held-out pairs
        scene = world.scene(i)  # structure only: the captions and questions are not needed here
        image = render_scene(scene.objects, scene.background, world.resolution, world.supersample)
        image = degrade(image, rng) if rng.uniform() < degrade_prob else image
        c, lab = label_components(oracle, image, [o.to_dict() for o in scene.objects])
        crops.append(c)
        labels += lab
        if progress and (i + 1) % 1000 == 0:
            progress(f"  rendered {i + 1}/{scenes} scenes ({time.time() - start:.0f} s)")
    for k in range(others):
        # three in four: shapes the world never draws; one in four: colour noise (a failed generation)
        make = colour_noise if k % 4 == 3 else other_blobs
        image = make(rng, oracle.config.resolution)
        image = degrade(image, rng) if rng.uniform() < degrade_prob else image
        c, lab = label_components(oracle, image, None)
        crops.append(c)
        labels += lab
    return torch.from_numpy(np.concatenate(crops)), torch.tensor(labels)


# ----------------------------------------------------------------------------- training


def augment(crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Left-right flips (every shape is mirror-symmetric) and shifts of up to two pixels."""
    flip = torch.rand(len(crops), generator=generator) < 0.5
    crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(crops, shifts=(dy, dx), dims=(-2, -1))


def train_classifier(oracle: SceneOracle, crops: torch.Tensor, labels: torch.Tensor, epochs: int,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: Callable[[str], None] | None = print) -> list[float]:
    """Adam with a cosine schedule; returns the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * math.ceil(len(crops) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    counts = torch.bincount(labels, minlength=len(oracle.config.classes)).float()
    weight = (counts.sum() / counts.clamp(min=1)).sqrt()
    weight = weight / weight.mean()
    oracle.train()
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(crops), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(oracle(augment(crops[idx], generator)), labels[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        losses.append(total / seen)
        if progress:
            progress(f"  epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
    oracle.eval()
    return losses


@torch.no_grad()
def crop_accuracy(oracle: SceneOracle, crops: torch.Tensor, labels: torch.Tensor) -> float:
    oracle.eval()
    preds = torch.cat([oracle(chunk).argmax(-1) for chunk in crops.split(512)])
    return float((preds == labels).float().mean())


# ----------------------------------------------------------------------------- evaluation


def detection_accuracy(oracle: SceneOracle, images: list[Any], truths: list[list[dict[str, Any]]]
                       ) -> dict[str, Any]:
    """Object precision/recall (same colour and shape, centre inside the true box), the fraction
    of scenes read exactly (every object found, nothing extra), and recall per true shape and size."""
    found = []
    for start in range(0, len(images), 64):
        found += oracle.detect(images[start:start + 64])
    hits = dets = objs = exact = 0
    per_shape: dict[str, list[int]] = {}
    pad = 1.5 / oracle.config.resolution
    for detections, objects in zip(found, truths):
        used: set[int] = set()
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            hit = 0
            for k, d in enumerate(detections):
                x, y = d["centre"]
                if k not in used and (d["shape"], d["colour"]) == (obj["shape"], obj["colour"]) \
                        and x0 - pad <= x <= x1 + pad and y0 - pad <= y <= y1 + pad:
                    used.add(k)
                    hit = 1
                    break
            per_shape.setdefault(f"{obj['size']} {obj['shape']}", []).append(hit)
        hits += len(used)
        dets += len(detections)
        objs += len(objects)
        exact += int(len(used) == len(objects) == len(detections))
    return {"precision": hits / max(dets, 1), "recall": hits / max(objs, 1), "scene_exact": exact / max(len(images), 1),
            "scenes": len(images), "recall_per_shape": {k: float(np.mean(v)) for k, v in sorted(per_shape.items())}}


def reconstructions(tokenizer_path: str, images: list[Image.Image], batch_size: int = 50) -> tuple[torch.Tensor, int]:
    """``images`` encoded and decoded by an EvoTok tokenizer at its pixel depth (and that depth)."""
    from evotok import EvoTok
    from evotok.images import pil_to_tensor

    tok = EvoTok.from_pretrained(tokenizer_path).eval()
    size, depth = tok.config.image_size, tok.config.pixel_depth
    x = torch.stack([pil_to_tensor(img, size) for img in images])
    return tok.reconstruct(x, depth, batch_size), depth


# Fixed harsher degradations for the robustness table: (downsample factor, Gaussian blur radius).
STRESS = ((1, 1.5), (1, 2.0), (2, 1.5), (4, 0.0))


def stress(image: Image.Image, factor: int, radius: float) -> Image.Image:
    """Lose resolution (``factor``× down, bicubic back up) and blur: a decoder much worse than training's."""
    side = image.size[0]
    if factor > 1:
        image = image.resize((side // factor, side // factor), Image.Resampling.BOX).resize(
            (side, side), Image.Resampling.BICUBIC)
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius else image


def evaluate(oracle: SceneOracle, eval_scenes: int, per_category: int, seed: int = EVAL_SEED,
             tokenizer: str | None = None) -> dict[str, Any]:
    """Detection and judge accuracy on fresh held-out renders: clean, degraded, under harsher
    degradations, and (with ``tokenizer``) as reconstructed by an EvoTok tokenizer."""
    world = SceneWorld(oracle.config.resolution, seed=seed, split="heldout")
    samples = [world[i] for i in range(eval_scenes)]
    truths = [s.attributes["objects"] for s in samples]
    clean = [s.image for s in samples]
    rng = np.random.default_rng(seed + 1)
    degraded = [degrade(img, rng) for img in clean]
    specs = geneval_prompts(per_category, seed=seed)
    renders = reference_renders(specs, seed=seed, resolution=oracle.config.resolution)
    renders_degraded = [degrade(img, rng) for img in renders]
    detection = {"clean": detection_accuracy(oracle, clean, truths),
                 "degraded": detection_accuracy(oracle, degraded, truths)}
    few = min(len(clean), 300)
    for factor, radius in STRESS:
        name = f"{factor}x down/up + blur {radius}" if factor > 1 else f"blur {radius}"
        detection[name] = detection_accuracy(oracle, [stress(im, factor, radius) for im in clean[:few]], truths[:few])
    noise_rng = np.random.default_rng(seed + 2)
    noise = oracle.detect([colour_noise(noise_rng, oracle.config.resolution) for _ in range(few)])
    detection["colour noise (no objects)"] = {
        "scenes": few, "images_with_detections": float(np.mean([len(d) > 0 for d in noise])),
        "detections_per_image": float(np.mean([len(d) for d in noise]))}
    judge = {"clean": render_accuracy(oracle, specs, renders, seed=seed),
             "degraded": render_accuracy(oracle, specs, renders_degraded, seed=seed)}
    if tokenizer:
        recon, depth = reconstructions(tokenizer, clean[:few])
        name = f"{tokenizer} reconstructions (depth {depth})"
        detection[name] = detection_accuracy(oracle, list(recon), truths[:few])
        recon, _ = reconstructions(tokenizer, renders)
        judge["reconstructed"] = render_accuracy(oracle, specs, list(recon), seed=seed)
    return {"detection": detection, "judge": judge}


def judge_table(judge: dict[str, dict[str, dict[str, float]]]) -> str:
    sets = list(judge)
    columns = ["category", "n"] + [f"{kind} ({name})" for name in sets for kind in ("true accepted", "false rejected")]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cat in [*GENEVAL_CATEGORIES, "overall"]:
        if cat not in judge["clean"]:
            continue
        name = f"**{cat}** (mean of categories)" if cat == "overall" else cat
        cells = [name, str(judge["clean"][cat]["n"])]
        for key in sets:
            cells += [f"{judge[key][cat]['true_accept']:.3f}", f"{judge[key][cat]['false_reject']:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def detection_table(detection: dict[str, dict[str, Any]]) -> str:
    rows = ["| renders | scenes | object precision | object recall | scenes read exactly |", "|---|---|---|---|---|"]
    for name, d in detection.items():
        if "recall" not in d:  # images with no objects: only false detections to count
            rows.append(f"| {name} | {d['scenes']} | {d['detections_per_image']:.3f} false detections per image "
                        f"| — | {1 - d['images_with_detections']:.3f} |")
            continue
        rows.append(f"| {name} | {d['scenes']} | {d['precision']:.3f} | {d['recall']:.3f} | {d['scene_exact']:.3f} |")
    return "\n".join(rows)


def per_shape_table(detection: dict[str, dict[str, Any]]) -> str:
    names = [n for n, d in detection.items() if "recall_per_shape" in d]
    keys = list(detection[names[0]]["recall_per_shape"])
    rows = ["| object | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        rows.append(f"| {key} | " + " | ".join(f"{detection[n]['recall_per_shape'].get(key, float('nan')):.2f}"
                                               for n in names) + " |")
    return "\n".join(rows)


def model_card(oracle: SceneOracle, metrics: dict[str, Any], args: argparse.Namespace) -> str:
    cfg = oracle.config
    thresholds = ", ".join(f"{name} {t:.1f}" for name, t in zip(COLOURS, cfg.colour_thresholds))
    params = sum(p.numel() for p in oracle.parameters())
    tokenizer_flag = f" --tokenizer {args.tokenizer}" if args.tokenizer else ""
    return f"""# Scene oracle

Reads a {cfg.resolution}×{cfg.resolution} image of EvoTok's procedural scene world and lists its objects
(shape, colour, centre, box, area); `evotok.oracle.judge` turns that into GenEval-style verdicts.
It is the judge of `training/bench_geneval.py`.

```python
from evotok.oracle import SceneOracle, geneval_prompts, judge
oracle = SceneOracle.from_pretrained("assets/oracle")
detections = oracle.detect(image)[0]          # PIL image, H W 3 uint8 array, or tensor in [-1, 1]
spec = geneval_prompts(1)[0]
judge(spec, detections)
```

**How it reads.** Pixels within a per-colour RGB distance of the {len(COLOURS)}-colour palette
({thresholds}; 0.8 × the closest any of {args.calibration} sampled backgrounds comes, capped at 70)
→ connected components of at least {cfg.min_area} px that survive a 1-px erosion → a {params:,}-parameter
CNN on a {cfg.crop_size}×{cfg.crop_size} crop (filled mask, soft colour membership, vividness of the
surroundings; at image scale)
classifies each into {", ".join(cfg.classes)}; detections below probability {cfg.min_confidence} or
classed "other" are dropped.

**Trained on** {args.scenes} rendered scenes (two thirds train-split pairs, one third held-out pairs,
both sizes, all background kinds; seed {args.seed}) and {args.others} images of "other" things (three in four:
stretched ellipses, bars, half discs, merged shapes; one in four: colour noise like a failed generation),
half of all images degraded (Gaussian blur, rounding: strong blur + unsharp mask, 2× down/up-sampling,
noise, colour drift), {args.epochs} epochs,
{metrics['train']['crops']} crops: {metrics['train']['cpu_seconds']:.0f} CPU-seconds
({metrics['train']['seconds']:.0f} s wall on a shared machine), {args.threads} thread(s).
Held-out crop accuracy: {metrics['train']['val_crop_accuracy']:.3f}.

## Accuracy on real renders (fresh seed {EVAL_SEED}, never used in training)

Object detection on held-out-split scenes (objects from held-out colour/shape pairs only). *Degraded*
is the training-time degradation; the rows below it are harsher than anything seen in training
(a 2× or 4× loss of resolution: at 4× a small object is 3-4 pixels wide), to show where reading fails.
A detection counts when its shape and colour are right and its centre lies in the object's box.

{detection_table(metrics['detection'])}

Recall per true object:

{per_shape_table(metrics['detection'])}
{recon_note(args)}
The GenEval judge per category on {args.per_category} prompts each (`geneval_prompts(seed={EVAL_SEED})`,
held-out pairs), each judged on a render that makes it true (`render_spec`). *True accepted*: the
prompt's own render is accepted. *False rejected*: a near miss of the prompt (another colour or shape,
one more or fewer, the opposite relation, swapped colours: `false_spec`) is rejected on the same render.
*Degraded*: the renders blurred / rounded / resampled / noised / colour-shifted as in training.
{"*Reconstructed*: the renders encoded and decoded by the tokenizer above." if args.tokenizer else ""}

{judge_table(metrics['judge'])}

Reproduce: `nice -n 10 python training/train_oracle.py --out assets/oracle{tokenizer_flag}`
(defaults as above).
"""


def recon_note(args: argparse.Namespace) -> str:
    if not args.tokenizer:
        return ""
    return f"""
The reconstruction column reads the same scenes after `{args.tokenizer}` encoded and decoded them at its
pixel depth: the images a generator writing that tokenizer's codes produces at best. The oracle never
saw such images in training; where it misses, look at the reconstructions (small stars and crosses,
and hexagons, lose their corners) before blaming the oracle.
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/oracle", help="folder to write the oracle to")
    parser.add_argument("--scenes", type=int, default=4000, help="rendered training scenes")
    parser.add_argument("--others", type=int, default=800, help="images of synthetic 'other' blobs")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--calibration", type=int, default=1000, help="backgrounds sampled to set colour thresholds")
    parser.add_argument("--eval-scenes", type=int, default=1000)
    parser.add_argument("--per-category", type=int, default=200,
                        help="GenEval prompts per category for the judge check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="a tiny CNN: one thread is the most efficient")
    parser.add_argument("--min-area", type=int, default=OracleConfig.min_area, help="smallest component, in pixels")
    parser.add_argument("--tokenizer", default=None,
                        help="also measure the oracle on this EvoTok tokenizer's reconstructions "
                             "(e.g. assets/tokenizer)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    start, cpu_start = time.time(), time.process_time()
    print(f"calibrating colour thresholds on {args.calibration} backgrounds")
    oracle = SceneOracle(OracleConfig(colour_thresholds=calibrate_thresholds(args.calibration, seed=args.seed),
                                      min_area=args.min_area))
    print("  " + ", ".join(f"{n} {t:.1f}" for n, t in zip(COLOURS, oracle.config.colour_thresholds)))
    print(f"rendering {args.scenes} scenes and {args.others} 'other' images")
    crops, labels = build_dataset(oracle, args.scenes, args.others, TRAIN_SEED_BASE + args.seed)
    counts = torch.bincount(labels, minlength=len(oracle.config.classes)).tolist()
    print("  crops per class: " + ", ".join(f"{c} {n}" for c, n in zip(oracle.config.classes, counts)))
    split = torch.randperm(len(crops), generator=torch.Generator().manual_seed(args.seed))
    n_val = max(1, len(crops) // 10)
    val, train = split[:n_val], split[n_val:]
    print(f"training the shape classifier on {len(train)} crops")
    losses = train_classifier(oracle, crops[train], labels[train], args.epochs, args.batch_size, args.lr, args.seed)
    val_acc = crop_accuracy(oracle, crops[val], labels[val])
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    print(f"  held-out crop accuracy {val_acc:.3f} ({seconds:.0f} s so far)")

    print(f"evaluating on {args.eval_scenes} fresh held-out scenes and {args.per_category} prompts per category")
    metrics = evaluate(oracle, args.eval_scenes, args.per_category, tokenizer=args.tokenizer)
    metrics["train"] = {"crops": len(crops), "class_counts": dict(zip(oracle.config.classes, counts)),
                        "losses": losses, "val_crop_accuracy": val_acc, "seconds": seconds,
                        "cpu_seconds": cpu_seconds}
    print("\n" + detection_table(metrics["detection"]) + "\n\n" + per_shape_table(metrics["detection"]) + "\n\n"
          + judge_table(metrics["judge"]))

    out = Path(args.out)
    oracle.save_pretrained(out)
    (out / "README.md").write_text(model_card(oracle, metrics, args))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\nsaved the oracle to {out} ({time.time() - start:.0f} s in all)")
    return metrics


if __name__ == "__main__":
    main()
