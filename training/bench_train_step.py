"""Benchmark the tokenizer's full training step at the reference shapes, one optimisation at a time.

Builds the reference preset (DESIGN.md §1) from configs with random weights and no download:

* a SigLIP2-L/16-256-shaped ``SiglipConfig`` (vision: hidden 1024, 24 layers, 16 heads, MLP 4096,
  patch 16, 256 px; a tiny text side) saved to a temporary folder and used as both the encoder
  (``reference_config(folder)``, ``EvoTok(config, load_pretrained_encoder=True)``) and the frozen
  teacher (``HFVisionTeacher(folder)``);
* 16 stages × 32,768 × 32 codes, the pixel and semantic decoders of the preset;
* for the perceptual loss, ``VGG16Standin``: VGG16's 13 convolutions with *random* weights, a
  stand-in for timing only (no pretrained VGG/LPIPS is obtainable offline);
* a PatchGAN discriminator, active from the first step.

Each configuration (the plain step, each optimisation on its own, then all together) gets fresh
copies of the same weights, runs warm-up steps and then timed full steps (generator with every
loss, backward, clip, Adam; discriminator step) on one fixed batch, and the table reports
s/step, images/s and peak memory. The losses of the first two steps of every configuration are
compared with the plain step's (max relative difference over all terms).

GPU (the reference shapes):
    python training/bench_train_step.py --device cuda --batch-sizes 32 64 --steps 10 --warmup 3
CPU (a tiny width; the reference shapes do not fit two cores in reasonable time):
    python training/bench_train_step.py --device cpu --tiny --batch-sizes 8 --steps 3 --warmup 2
One optimisation against the plain step: ``--only channels_last`` (names: see ``--help``).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.config import reference_config  # noqa: E402
from evotok.losses import FeatureDistance, LossWeights, PatchDiscriminator, sample_pixel_depths  # noqa: E402
from training.step import DEFAULT_COMPILE, Optimizations, TokenizerTrainer  # noqa: E402

PUBLISHED = {32: (0.434, 73.7, 58.8), 64: (0.825, 77.6, 111.0)}  # DESIGN.md §5: s/step, images/s, peak GiB
TARGET_IMAGES_PER_S, TARGET_PEAK_GIB = 110.0, 30.0               # issue #7, batch 32 on one H200
TOLERANCE = {"cuda": 2e-2, "cpu": 1e-3}                          # bf16 autocast vs fp32


# ------------------------------------------------------------------------------ the stand-in nets
class VGG16Standin(nn.Module):
    """VGG16's convolutional trunk with random weights: a stand-in for timing only.

    Five stages of 3×3 convolutions (64-64 | 128-128 | 256×3 | 512×3 | 512×3 channels, each
    divided by ``width_divisor``) with ReLU, 2×2 max-pooling between stages; ``forward`` returns
    the feature map after each stage's last ReLU (the five maps LPIPS reads), after LPIPS's input
    scaling. Its features mean nothing: do not train a real tokenizer with it.
    """

    STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

    def __init__(self, width_divisor: int = 1):
        super().__init__()
        if width_divisor < 1:
            raise ValueError(f"width_divisor must be >= 1, got {width_divisor}")
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        stages, width = [], 3
        for channels, convs in self.STAGES:
            channels = max(1, channels // width_divisor)
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [nn.Conv2d(width, channels, 3, padding=1), nn.ReLU(inplace=True)]
                width = channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.shift) / self.scale
        features = []
        for i, stage in enumerate(self.stages):
            if i:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            features.append(x)
        return features


def vgg16_standin() -> VGG16Standin:
    """Full-width stand-in (``perceptual_net: training.bench_train_step:vgg16_standin``), timing only."""
    return VGG16Standin(1)


def tiny_vgg16_standin() -> VGG16Standin:
    """An eighth of the width, for CPU smoke runs and tests."""
    return VGG16Standin(8)


# ------------------------------------------------------------------------------ the reference shapes
@dataclass(frozen=True)
class Shapes:
    """Everything the benchmark builds, at the reference width or the tiny CPU width."""

    name: str
    vision: dict
    tokenizer: dict
    discriminator: tuple[int, int]
    vgg_divisor: int

    @property
    def image_size(self) -> int:
        return self.vision["image_size"]


REFERENCE = Shapes(
    name="reference (SigLIP2-L/16-256 shapes, 256 px, 16 × 32,768 × 32 codes)",
    vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                patch_size=16, image_size=256),
    tokenizer={}, discriminator=(64, 3), vgg_divisor=1,
)
TINY = Shapes(
    name="TINY CPU width (vision hidden 64, 2 layers, 64 px, 16 × 512 × 32 codes, decoder channels 16-64, VGG/8)",
    vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                patch_size=16, image_size=64),
    tokenizer=dict(image_size=64, channels=(16, 16, 32, 32, 64), norm_num_groups=8, codebook_size=512,
                   semantic_width=64, semantic_heads=2, teacher_dim=64),
    discriminator=(16, 3), vgg_divisor=8,
)


def write_siglip_folder(folder: Path, vision: dict) -> Path:
    """A transformers ``SiglipModel`` with random weights and the given vision shape (tiny text side)."""
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig(
        vision_config=dict(vision),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=128, max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    )
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(str(folder))
    return folder


@dataclass
class Template:
    """Modules every configuration copies, so all start from the same weights."""

    model: nn.Module
    teacher: nn.Module
    perceptual: nn.Module
    discriminator: nn.Module
    weights: LossWeights


def build_template(shapes: Shapes, folder: Path) -> Template:
    from evotok.model import EvoTok
    from evotok.teacher import HFVisionTeacher

    write_siglip_folder(folder, shapes.vision)
    torch.manual_seed(0)
    config = reference_config(str(folder), **shapes.tokenizer)
    model = EvoTok(config, load_pretrained_encoder=True)
    teacher = HFVisionTeacher(folder)
    if teacher.feature_dim != config.teacher_dim:
        raise ValueError(f"teacher width {teacher.feature_dim} != tokenizer teacher_dim {config.teacher_dim}")
    perceptual = FeatureDistance(VGG16Standin(shapes.vgg_divisor))
    discriminator = PatchDiscriminator(*shapes.discriminator)
    weights = LossWeights(reconstruction=1.0, perceptual=1.0, gan=0.5, gan_start_step=0, commitment=0.25,
                          semantic=1.0, semantic_folds=4)
    return Template(model, teacher, perceptual, discriminator, weights)


def fixed_batch(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1] (low-resolution noise upsampled), the same every call."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(2, size // 8), max(2, size // 8), generator=generator) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


# ------------------------------------------------------------------------------ memory
def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) by writing 5 to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    else:
        try:  # give freed heap back to the OS so the next configuration's RSS baseline is honest
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    try:
        torch._dynamo.reset()
    except Exception:
        pass


# ------------------------------------------------------------------------------ one configuration
@dataclass
class Row:
    label: str
    batch: int
    seconds_per_step: float
    images_per_s: float
    peak_bytes: int
    losses: list[dict[str, float]] = field(default_factory=list)  # terms of the first steps
    max_rel_diff: float | None = None
    worst_term: str = ""
    notes: list[str] = field(default_factory=list)
    spread: tuple[float, float] | None = None  # fastest and slowest round, with --repeats


def run_configuration(template: Template, label: str, opts: Optimizations, batch: int, steps: int, warmup: int,
                      device: torch.device, mixed_precision: str, seed: int = 0) -> Row:
    _release_memory(device)
    rss_before = _rss_bytes("VmRSS") if device.type == "cpu" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    trainer = TokenizerTrainer(
        copy.deepcopy(template.model), weights=template.weights, lr=1e-4, betas=(0.9, 0.95), grad_clip=1.0,
        teacher=copy.deepcopy(template.teacher), perceptual=copy.deepcopy(template.perceptual),
        discriminator=copy.deepcopy(template.discriminator), optimizations=opts, device=device,
        mixed_precision=mixed_precision,
    )
    trainer.model.train()
    images = fixed_batch(batch, template.model.config.image_size, seed).to(device)
    depths = sample_pixel_depths(batch, trainer.model.config.pixel_depth, 0.5, trainer.model.config.pixel_depth,
                                 torch.Generator().manual_seed(seed), device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses = []
    torch.manual_seed(seed)  # the codebook initialisation and restarts draw from it
    for step in range(warmup):
        terms = trainer.step(images, depths, step)
        if step < 2:
            losses.append({k: float(v) for k, v in terms.items()})
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_peak_rss() if device.type == "cpu" else True
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.step(images, depths, step)
    sync()
    elapsed = (time.perf_counter() - started) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _rss_bytes("VmHWM") - rss_before
        if not reset:
            trainer.notes.append("peak RSS not resettable here: VmHWM is the process's lifetime peak")
    row = Row(label, batch, elapsed, batch / elapsed, peak, losses, notes=list(trainer.notes))
    del trainer, images, depths
    _release_memory(device)
    return row


def merge_rounds(rounds: list[Row]) -> Row:
    """One row from repeated rounds: the median s/step, the largest peak, the first round's losses."""
    times = sorted(r.seconds_per_step for r in rounds)
    median = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
    first = rounds[0]
    return Row(first.label, first.batch, median, first.batch / median, max(r.peak_bytes for r in rounds),
               first.losses, notes=first.notes, spread=(times[0], times[-1]) if len(times) > 1 else None)


def compare(row: Row, baseline: Row) -> None:
    """Max relative difference of every loss term of the first steps against the plain step."""
    worst, worst_term = 0.0, ""
    for step, (mine, ref) in enumerate(zip(row.losses, baseline.losses)):
        if mine.keys() != ref.keys():
            raise RuntimeError(f"{row.label}: loss terms {sorted(mine)} differ from the plain step's {sorted(ref)}")
        for key, ref_value in ref.items():
            diff = abs(mine[key] - ref_value) / max(abs(ref_value), 1e-2)
            if not math.isfinite(diff) or diff > worst:
                worst, worst_term = diff, f"{key} (step {step + 1})"
    row.max_rel_diff, row.worst_term = worst, worst_term


# ------------------------------------------------------------------------------ the table
def configurations(only: list[str] | None, compile_targets: tuple[str, ...]) -> list[tuple[str, Optimizations]]:
    """(label, switches) of every row: the plain step first; ``only`` keeps it plus the named rows.
    With no ``compile_targets`` the compile row is left out and the combined rows compile nothing."""
    compiled = {"compile": compile_targets}
    suffix = "" if compile_targets else " (compile off)"
    rows = {"baseline": ("baseline (plain step)", Optimizations.none())}
    for name in Optimizations.switch_names():
        if name == "compile" and not compile_targets:
            continue
        opts = Optimizations.only(name)
        rows[name] = (name, replace(opts, **compiled) if name == "compile" else opts)
    rows["defaults"] = ("defaults (train_tokenizer)", Optimizations())
    rows["all"] = ("all" + suffix, replace(Optimizations.all(), **compiled))
    rows["all_but_checkpointing"] = ("all but activation_checkpointing" + suffix,
                                     replace(Optimizations.all(), activation_checkpointing=(), **compiled))
    if not only:
        return list(rows.values())
    unknown = [name for name in only if name not in rows]
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {unknown}; choose from {list(rows)}")
    return [rows["baseline"]] + [rows[name] for name in dict.fromkeys(only) if name != "baseline"]


def format_memory(row: Row, device: torch.device) -> str:
    gib = row.peak_bytes / 2**30
    return f"{gib:.2f} GiB" if device.type == "cuda" or gib >= 1 else f"{row.peak_bytes / 2**20:.0f} MiB"


def render(rows: list[Row], device: torch.device, shapes: Shapes, tolerance: float, header: list[str]) -> str:
    memory = ("peak GiB (torch.cuda.max_memory_allocated)" if device.type == "cuda"
              else "peak RSS delta (VmHWM − RSS before build)")
    lines = [*header, "",
             f"| configuration | batch | s/step | images/s | speed-up | {memory} | loss max rel. diff | match |",
             "|---|---|---|---|---|---|---|---|"]
    baselines = {r.batch: r for r in rows if r.label.startswith("baseline")}
    for r in rows:
        base = baselines.get(r.batch)
        speedup = f"{base.seconds_per_step / r.seconds_per_step:.2f}×" if base else "—"
        diff = "—" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}"
        match = "—" if r.max_rel_diff is None else ("yes" if r.max_rel_diff <= tolerance else f"NO: {r.worst_term}")
        seconds = f"{r.seconds_per_step:.3f}" + (f" ({r.spread[0]:.3f}–{r.spread[1]:.3f})" if r.spread else "")
        lines.append(f"| {r.label} | {r.batch} | {seconds} | {r.images_per_s:.1f} | {speedup} | "
                     f"{format_memory(r, device)} | {diff} | {match} |")
    return "\n".join(lines)


def render_losses(baseline: Row, other: Row) -> str:
    lines = [f"Loss terms on the fixed batch, first step: plain vs {other.label} (batch {other.batch})", "",
             "| term | plain | optimised | rel. diff |", "|---|---|---|---|"]
    for key, ref in baseline.losses[0].items():
        mine = other.losses[0][key]
        lines.append(f"| {key} | {ref:.6f} | {mine:.6f} | {abs(mine - ref) / max(abs(ref), 1e-2):.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="per-step batch sizes (default: 32 64 on GPU, 8 with --tiny on CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 2: losses of steps 1-2 are compared)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all configurations; the table shows each one's median (use on a shared CPU)")
    parser.add_argument("--tiny", action="store_true", help="a tiny width (for CPU): see the table header")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run the plain step and these configurations only: "
                             + ", ".join(Optimizations.switch_names()) + ", defaults, all, all_but_checkpointing")
    parser.add_argument("--compile-targets", nargs="*", default=list(DEFAULT_COMPILE),
                        help="submodules the compile rows compile (default: %(default)s; "
                             "none: no compile row, nothing compiled in the combined rows)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--output", default=None, help="also write the tables (markdown) to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("refusing to run the reference shapes (SigLIP2-L encoder and teacher, 256 px, "
                         "16 × 32,768 codes) on the CPU: one step takes minutes on two cores. "
                         "Add --tiny for a small-width CPU run, or use --device cuda.")
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        raise SystemExit("--steps, --warmup and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = TINY if args.tiny else REFERENCE
    batch_sizes = args.batch_sizes or ([8] if device.type == "cpu" else [32, 64])
    mixed_precision = "bf16" if device.type == "cuda" else "no"
    tolerance = TOLERANCE[device.type]

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    header = [
        f"### Tokenizer training step — {shapes.name}",
        "",
        f"Device: {device_name}; torch {torch.__version__}; "
        f"{'bf16 autocast' if mixed_precision == 'bf16' else 'fp32'}; {args.warmup} warm-up + {args.steps} timed steps"
        f"{f', median of {args.repeats} interleaved rounds' if args.repeats > 1 else ''}; "
        "generator (MSE, perceptual on a random-weight VGG16-shaped stand-in, PatchGAN active, cosine+fold, "
        "commitment) + backward + clip + Adam, then the discriminator step.",
        f"Loss check: the loss terms of steps 1–2 on one fixed batch against the plain step's; "
        f"relative difference |a−b| / max(|b|, 0.01); tolerance {tolerance:g}.",
    ]
    if device.type == "cuda" and not args.tiny:
        header.append("Published recipe on one H200 (DESIGN.md §5): "
                      + "; ".join(f"batch {b}: {s} s/step, {i} images/s, {g} GiB" for b, (s, i, g) in PUBLISHED.items()))
    if device.type == "cpu":
        header.append("Peak memory on CPU: VmHWM from /proc/self/status, reset through /proc/self/clear_refs after "
                      "the warm-up, minus VmRSS before the configuration was built (after gc and malloc_trim): "
                      "it includes the weights, gradients and optimizer state of that configuration.")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="evotok-bench-") as tmp:
        print(f"building the {'tiny' if args.tiny else 'reference'} template (random weights) ...", flush=True)
        template = build_template(shapes, Path(tmp) / "siglip")
        confs = configurations(args.only, tuple(args.compile_targets))
        for batch in batch_sizes:
            # one untimed plain step first: the process's first step pays one-off set-up costs
            run_configuration(template, "priming", Optimizations.none(), batch, 1, 1, device, mixed_precision)
            runs: dict[str, list[Row]] = {label: [] for label, _ in confs}
            for repeat in range(args.repeats):
                for label, opts in confs:
                    print(f"batch {batch}, round {repeat + 1}/{args.repeats}: {label} ...", flush=True)
                    row = run_configuration(template, label, opts, batch, args.steps, args.warmup, device,
                                            mixed_precision)
                    print(f"  {row.seconds_per_step:.3f} s/step", flush=True)
                    runs[label].append(row)
            merged = [merge_rounds(found) for found in runs.values()]
            for row in merged[1:]:
                compare(row, merged[0])
            rows.extend(merged)

    tables = [render(rows, device, shapes, tolerance, header)]
    first = [r for r in rows if r.batch == batch_sizes[0]]
    if len(first) > 1:
        tables.append(render_losses(first[0], first[-1]))
    if device.type == "cuda" and not args.tiny:
        best = [r for r in rows if r.batch == 32 and not r.label.startswith("baseline")]
        if best:
            fastest = max(best, key=lambda r: r.images_per_s if r.peak_bytes <= TARGET_PEAK_GIB * 2**30 else 0)
            met = fastest.images_per_s >= TARGET_IMAGES_PER_S and fastest.peak_bytes <= TARGET_PEAK_GIB * 2**30
            tables.append(f"Target (batch 32: ≥ {TARGET_IMAGES_PER_S:g} images/s at ≤ {TARGET_PEAK_GIB:g} GiB): "
                          f"{'MET' if met else 'not met'} by '{fastest.label}' "
                          f"({fastest.images_per_s:.1f} images/s, {fastest.peak_bytes / 2**30:.1f} GiB)")
    else:
        tables.append(f"GPU target (reference shapes, one H200, batch 32: ≥ {TARGET_IMAGES_PER_S:g} images/s at "
                      f"≤ {TARGET_PEAK_GIB:g} GiB): not measured by this run.")
    mismatched = [r for r in rows if r.max_rel_diff is not None and r.max_rel_diff > tolerance]
    tables.append("Losses match the plain step within tolerance: "
                  + ("yes, every configuration" if not mismatched else "NO: " + ", ".join(r.label for r in mismatched)))
    notes = sorted({n for r in rows for n in r.notes if "not available" in n or "not resettable" in n})
    if notes:
        tables.append("Notes: " + "; ".join(notes))
    text = "\n\n".join(tables)
    print("\n" + text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if mismatched:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
