"""The stage explorer: everything the demo shows about one image's token trajectory.

``Explorer`` holds a tokenizer and (optionally) its teacher and computes, with no UI library:

* ``explore(image, labels)`` -> ``ExploreResult``: the reconstruction after every stage 1..D (one
  batched pixel-decoder call), PSNR/SSIM per depth, the semantic decoder's cosine to the teacher
  per depth, a zero-shot probe per depth through the teacher's text side, and the codes;
* figure builders (plotly) for the depth curves, the probe, the code grids, codebook health and
  UMAP views of stage features;
* ``umap(depth, kind)``: a UMAP of stage features of held-out images, cached on disk.

The demo (``app/``) only lays these out. Everything here runs on CPU in well under a second per
image for the bundled 64-pixel tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots
from PIL import Image

from .hub import CheckpointError, resolve_checkpoint
from .images import ImageError, load_image_safely, pil_to_tensor, tensor_to_pil
from .metrics import psnr, semantic_cosine, ssim
from .model import EvoTok
from .probe import DEFAULT_LABELS, zero_shot
from .teacher import matches_pins

__all__ = [
    "ModelCard", "read_model_card", "prepare_image", "parse_labels", "DepthProbe", "ExploreResult",
    "Explorer", "SampleSet", "load_sample_set", "stage_features", "umap_embedding",
    "metrics_figure", "probe_figure", "probe_rows", "codes_figure", "codebook_figure", "umap_figure",
    "codes_to_json", "codes_from_json", "upscale_for_display",
]

MAX_LABELS = 100
MAX_LABEL_CHARS = 80
FEATURE_KINDS = ("semantic", "latent")
ProgressFn = Callable[[float, str], None]
_SHORT_ROLES = {"pixel depth": "Lpix", "semantic depth": "Lsem", "off-distribution": "off-dist."}


def _no_progress(fraction: float, message: str) -> None:
    return None


# ------------------------------------------------------------------------------------ model card
@dataclass
class ModelCard:
    """What a checkpoint's ``README.md`` says about itself.

    Front-matter keys read: ``trained_on`` (one line), ``max_train_depth`` (the deepest prefix the
    pixel decoder was trained to render; ``trained_pixel_depths: [1, ..., N]`` also works).
    """

    title: str = ""
    trained_on: str = ""
    body: str = ""
    metadata: dict = field(default_factory=dict)
    max_train_depth: int | None = None


def _split_front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", text, flags=re.S)
    if not match:
        return {}, text
    try:
        import yaml

        meta = yaml.safe_load(match.group(1)) or {}
    except Exception:  # a malformed card must not stop the app
        meta = {}
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


def _first_paragraph(markdown: str) -> str:
    for block in re.split(r"\n\s*\n", markdown):
        block = block.strip()
        if block and not block.startswith(("#", "|", "```", "<", "!", "-", "*")):
            return " ".join(block.split())
    return ""


def _trained_on_section(body: str) -> str:
    """The first paragraph under a heading that talks about training data."""
    parts = re.split(r"^(#{1,6}\s.*)$", body, flags=re.M)
    for heading, content in zip(parts[1::2], parts[2::2]):
        if re.search(r"train|data", heading, flags=re.I):
            paragraph = _first_paragraph(content)
            if paragraph:
                return paragraph
    return ""


def read_model_card(folder: str | os.PathLike | None) -> ModelCard:
    """Parse ``folder/README.md`` (YAML front matter + markdown); an empty card when absent."""
    if folder is None:
        return ModelCard()
    path = Path(folder) / "README.md"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ModelCard()
    meta, body = _split_front_matter(text)
    title_match = re.search(r"^#\s+(.+)$", body, flags=re.M)
    trained_on = str(meta.get("trained_on") or "").strip() or _trained_on_section(body) or _first_paragraph(body)
    max_depth = meta.get("max_train_depth")
    if max_depth is None and isinstance(meta.get("trained_pixel_depths"), (list, tuple)) and meta["trained_pixel_depths"]:
        max_depth = max(meta["trained_pixel_depths"])
    try:
        max_depth = int(max_depth) if max_depth is not None else None
    except (TypeError, ValueError):
        max_depth = None
    return ModelCard(title=title_match.group(1).strip() if title_match else "", trained_on=trained_on[:600],
                     body=body.strip(), metadata=meta, max_train_depth=max_depth)


# ------------------------------------------------------------------------------------ inputs
def prepare_image(source: Any, size: int) -> tuple[torch.Tensor, str]:
    """Any upload -> ``3 size size`` tensor in [-1, 1] and a sentence on how it was normalised.

    Raises ``ImageError`` (a ``ValueError``) with a clear message for anything that is not a
    readable, reasonably sized image.
    """
    image, note = load_image_safely(source)
    w, h = image.size
    steps = []
    if w != h:
        side = min(w, h)
        kept = 100.0 * side / max(w, h)
        steps.append(f"centre-cropped to a {side}×{side} square (kept {kept:.0f}% of the {'width' if w > h else 'height'})")
    if min(w, h) != size:
        steps.append(f"{'downscaled' if min(w, h) > size else 'upscaled'} to {size}×{size}, the model's resolution")
    tensor = pil_to_tensor(image, size)
    return tensor, note + (". Then " + " and ".join(steps) if steps else "") + "."


def parse_labels(text: str | Sequence[str] | None) -> list[str]:
    """Comma- or newline-separated labels -> a clean unique list (the defaults when empty)."""
    if text is None:
        return list(DEFAULT_LABELS)
    items = re.split(r"[,\n;]", text) if isinstance(text, str) else [str(t) for t in text]
    labels, seen = [], set()
    for item in items:
        label = " ".join(item.split())
        if not label or label.lower() in seen:
            continue
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"label {label[:30]!r}... is longer than {MAX_LABEL_CHARS} characters")
        seen.add(label.lower())
        labels.append(label)
    if not labels:
        return list(DEFAULT_LABELS)
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels given; the probe takes at most {MAX_LABELS}")
    return labels


def upscale_for_display(image: Image.Image, min_side: int = 256) -> Image.Image:
    """Nearest-neighbour upscale by an integer factor so small decodes show their real pixels."""
    factor = max(1, math.ceil(min_side / max(1, min(image.size))))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


# ------------------------------------------------------------------------------------ results
@dataclass
class DepthProbe:
    """Zero-shot probe per depth: softmax over the given labels of the teacher's logits."""

    labels: list[str]
    probs: np.ndarray           # D × L, reading the semantic decoder's prediction at each depth
    teacher_probs: np.ndarray   # L, the teacher reading the real image

    def top(self, depth_index: int | None, k: int = 3) -> list[tuple[str, float]]:
        """Best ``k`` labels at a depth (0-based row), or of the teacher itself for ``None``."""
        row = self.teacher_probs if depth_index is None else self.probs[depth_index]
        order = np.argsort(-row, kind="stable")[:k]
        return [(self.labels[j], float(row[j])) for j in order]


@dataclass
class ExploreResult:
    """One image's trajectory through the residual chain (``D`` stages)."""

    image: torch.Tensor             # 3 H W in [-1, 1], the input as the model saw it
    reconstructions: torch.Tensor   # D 3 H W in [-1, 1], pixel decoder after 1..D stages
    codes: torch.Tensor             # h w D code indices
    depths: list[int]
    psnr: list[float]
    ssim: list[float]
    semantic_cosine: list[float] | None
    probe: DepthProbe | None
    pixel_depth: int
    semantic_depth: int
    max_train_depth: int
    codebook_size: int
    input_note: str = ""
    teacher_note: str = ""
    seconds: float = 0.0

    def roles(self, depth: int) -> list[str]:
        tags = []
        if depth == self.pixel_depth:
            tags.append("pixel depth")
        if depth == self.semantic_depth:
            tags.append("semantic depth")
        if depth > self.max_train_depth:
            tags.append("off-distribution")
        return tags

    def caption(self, depth: int, long: bool = False) -> str:
        """``depth 4 · 27.1 dB · Lpix`` (``long``: the roles spelled out)."""
        i = self.depths.index(depth)
        tags = self.roles(depth) if long else [_SHORT_ROLES[t] for t in self.roles(depth)]
        return " · ".join([f"depth {depth}", f"{self.psnr[i]:.1f} dB", *tags])

    def reconstruction_image(self, depth: int, min_side: int = 256) -> Image.Image:
        return upscale_for_display(tensor_to_pil(self.reconstructions[self.depths.index(depth)]), min_side)

    def input_image(self, min_side: int = 256) -> Image.Image:
        return upscale_for_display(tensor_to_pil(self.image), min_side)

    def gallery(self, min_side: int = 256) -> list[tuple[Image.Image, str]]:
        return [(self.reconstruction_image(d, min_side), self.caption(d)) for d in self.depths]

    def summary_markdown(self) -> str:
        lines = [f"**Input.** {self.input_note}"]
        lines.append(
            f"**Depths.** Pixel depth L<sub>pix</sub> = {self.pixel_depth}, semantic depth "
            f"L<sub>sem</sub> = {self.semantic_depth}, {len(self.depths)} stages in all.")
        if self.max_train_depth < len(self.depths):
            lines.append(
                f"Depths {self.max_train_depth + 1}–{len(self.depths)} are **off-distribution** for the pixel "
                f"decoder (it was trained on prefixes of 1–{self.max_train_depth} stages): their pictures show "
                "what it does with latents it never saw.")
        best = int(np.argmax(self.psnr))
        lines.append(f"**Pixels.** Best PSNR {self.psnr[best]:.2f} dB at depth {self.depths[best]}; "
                     f"{self.psnr[self.depths.index(self.pixel_depth)]:.2f} dB at the pixel depth.")
        if self.probe is not None and self.semantic_cosine is not None:
            s = self.depths.index(self.semantic_depth)
            top = ", ".join(f"{label} ({p:.0%})" for label, p in self.probe.top(s, 3))
            teacher = ", ".join(f"{label} ({p:.0%})" for label, p in self.probe.top(None, 3))
            lines.append(f"**Semantics.** Cosine to the teacher {self.semantic_cosine[s]:.3f} at the semantic depth; "
                         f"probe there: {top}. The teacher on the real image: {teacher}.")
        elif self.teacher_note:
            lines.append(f"**Semantics.** {self.teacher_note}")
        lines.append(f"Computed in {self.seconds * 1000:.0f} ms.")
        return "\n\n".join(lines)


def codes_to_json(result: ExploreResult, checkpoint: str = "") -> dict:
    """A self-describing JSON payload of the codes (``codes[row][col][stage]``)."""
    h, w, d = result.codes.shape
    return {
        "format": "evotok-codes", "version": 1, "checkpoint": checkpoint,
        "layout": "codes[row][col][stage]", "grid": [h, w], "num_stages": d,
        "codebook_size": result.codebook_size, "pixel_depth": result.pixel_depth,
        "semantic_depth": result.semantic_depth, "image_size": int(result.image.shape[-1]),
        "codes": result.codes.tolist(),
    }


def codes_from_json(payload: dict | str | os.PathLike) -> torch.Tensor:
    """Read a payload of ``codes_to_json`` (dict or file) back -> ``1 h w D`` LongTensor for ``tok.decode``."""
    if not isinstance(payload, dict):
        payload = json.loads(Path(payload).read_text())
    if payload.get("format") != "evotok-codes":
        raise ValueError("not an evotok-codes payload (missing format: evotok-codes)")
    codes = torch.tensor(payload["codes"], dtype=torch.long)
    if codes.ndim != 3 or list(codes.shape[:2]) != list(payload["grid"]):
        raise ValueError(f"codes of shape {tuple(codes.shape)} do not match grid {payload['grid']}")
    return codes[None]


# ------------------------------------------------------------------------------------ explorer
def _find_path(name: str, search_dirs: Sequence[Path]) -> Path | None:
    path = Path(name).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for base in search_dirs:
        if (base / path).exists():
            return base / path
    return None


def _fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Explorer:
    """A tokenizer (+ teacher) ready for the explorer's views."""

    def __init__(self, tokenizer: EvoTok, teacher=None, card: ModelCard | None = None,
                 source: str = "", teacher_source: str = "", teacher_note: str = "") -> None:
        self.tok = tokenizer.eval()
        self.config = tokenizer.config
        self.card = card or ModelCard()
        self.source = source
        self.teacher_source = teacher_source
        self.teacher = None
        self.teacher_note = teacher_note
        if teacher is not None:
            problem = self._teacher_mismatch(teacher)
            if problem:
                self.teacher_note = problem
            else:
                self.teacher = teacher.eval()
        depth = self.card.max_train_depth or self.config.pixel_depth
        self.max_train_depth = max(1, min(int(depth), self.config.num_stages))
        self.depths = list(range(1, self.config.num_stages + 1))
        self._fingerprint: str | None = None
        self._lock = threading.Lock()
        self._memory: dict[tuple, Any] = {}

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str | os.PathLike, teacher: str | os.PathLike | None = None,
             search_dirs: Sequence[str | os.PathLike] = (), device: str = "cpu") -> "Explorer":
        """Load a tokenizer folder or hub id and its teacher.

        ``teacher=None`` uses the tokenizer config's ``teacher`` field, looked up as given, then
        under ``search_dirs`` and the checkpoint folder's parents; when that default is missing the
        explorer runs without the semantic views (and says so). An explicit ``teacher`` must load.
        ``"none"`` disables the teacher.
        """
        from .teacher import load_teacher

        folder = resolve_checkpoint(checkpoint)
        tok = EvoTok.from_pretrained(folder, map_location=device)
        card = read_model_card(folder)
        dirs = [Path(d) for d in search_dirs] + [Path.cwd(), folder, *folder.resolve().parents[:3]]
        teacher_model, note, teacher_source = None, "", ""
        if teacher is not None and str(teacher).lower() == "none":
            note = "No teacher loaded (--teacher none): semantic cosine and the probe are off."
        elif teacher is not None:
            found = _find_path(str(teacher), dirs)
            teacher_source = str(found or teacher)
            teacher_model = load_teacher(teacher_source, device=device)
        elif tok.config.teacher:
            found = _find_path(tok.config.teacher, dirs)
            try:
                teacher_source = str(found or tok.config.teacher)
                teacher_model = load_teacher(teacher_source, device=device)
            except (CheckpointError, OSError, ValueError) as err:
                note = (f"The tokenizer's teacher {tok.config.teacher!r} could not be loaded ({err}); "
                        "semantic cosine and the probe are off.")
        else:
            note = "The tokenizer names no teacher: semantic cosine and the probe are off."
        return cls(tok, teacher_model, card, source=str(checkpoint), teacher_source=teacher_source, teacher_note=note)

    def _teacher_mismatch(self, teacher) -> str:
        grid, width = self.config.grid_size, self.config.teacher_dim
        if teacher.num_patches != grid * grid or teacher.feature_dim != width:
            return (f"The teacher's patch features ({teacher.grid_size}×{teacher.grid_size} × {teacher.feature_dim}) do not "
                    f"match the tokenizer's semantic decoder ({grid}×{grid} × {width}); semantic views are off.")
        if teacher.embed_dim is None:
            return "The teacher has no text side, so there is no zero-shot probe; semantic views are off."
        if not matches_pins(teacher, self.config.teacher_features_sha256, self.config.teacher_sha256):
            expected = self.config.teacher_features_sha256 or self.config.teacher_sha256
            return (f"This teacher is not the one the tokenizer was trained against (the sha256 of the weights its "
                    f"patch features depend on should start {expected[:12]}); its probe would read features the "
                    "tokenizer never learned, so semantic views are off.")
        return ""

    @property
    def device(self) -> torch.device:
        return next(self.tok.parameters()).device

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.tok)
        return self._fingerprint

    def describe(self) -> str:
        """Markdown: what is loaded, what it was trained on, at what resolution."""
        c = self.config
        name = self.card.title or Path(self.source).name or "EvoTok tokenizer"
        lines = [
            f"**Loaded:** {name} (`{self.source}`) — {c.image_size}×{c.image_size} pixels, "
            f"{c.grid_size}×{c.grid_size} tokens × {c.num_stages} stages of {c.codebook_size:,} codes "
            f"(pixel depth {c.pixel_depth}, semantic depth {c.semantic_depth}). "
            f"Uploads are centre-cropped and resized to {c.image_size}×{c.image_size}.",
            f"**Trained on:** {self.card.trained_on or 'not stated (the checkpoint has no model card).'}",
        ]
        if self.teacher is not None:
            lines.append(f"**Teacher:** `{self.teacher_source}` ({type(self.teacher).__name__}).")
        elif self.teacher_note:
            lines.append(f"**Teacher:** {self.teacher_note}")
        return "\n\n".join(lines)

    # -- the explorer ----------------------------------------------------------------------------
    @torch.no_grad()
    def semantic_features_all_depths(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``b h w D`` -> semantic features ``D b N C`` after every depth, in one decoder call."""
        b, depths = codes.shape[0], len(self.depths)
        stacked = codes.repeat(depths, 1, 1, 1)
        per_sample = torch.arange(1, depths + 1, device=codes.device).repeat_interleave(b)
        latents = self.tok.quantizer.codes_to_latent(stacked, per_sample)
        return self.tok.semantic_decoder(latents).reshape(depths, b, *self._feature_shape())

    def _feature_shape(self) -> tuple[int, int]:
        return (self.config.grid_size ** 2, self.config.teacher_dim)

    @torch.no_grad()
    def explore(self, source: Any, labels: str | Sequence[str] | None = None) -> ExploreResult:
        """The full trajectory of one image (a path, bytes, PIL image, array or ``3 H W`` tensor)."""
        started = time.perf_counter()
        label_list = parse_labels(labels)
        if isinstance(source, torch.Tensor):
            image, note = self._check_tensor(source), "tensor input used as given."
        else:
            image, note = prepare_image(source, self.config.image_size)
        x = image[None].to(self.device)
        codes = self.tok.encode(x)
        recons = self.tok.decode_all_depths(codes, self.depths)[:, 0]
        target = x.expand(len(self.depths), -1, -1, -1)
        psnr_d, ssim_d = psnr(recons, target).tolist(), ssim(recons, target).tolist()
        cosine, probe = None, None
        if self.teacher is not None:
            predicted = self.semantic_features_all_depths(codes)[:, 0]          # D N C
            real = self.teacher.image_features(x)                                # 1 N C
            cosine = semantic_cosine(predicted, real.expand_as(predicted)).tolist()
            result = zero_shot(self.teacher, torch.cat([predicted, real.to(predicted.dtype)]), label_list)
            probs = result.logits.float().softmax(dim=-1).numpy()
            probe = DepthProbe(labels=label_list, probs=probs[:-1], teacher_probs=probs[-1])
        return ExploreResult(
            image=image.cpu(), reconstructions=recons.cpu(), codes=codes[0].cpu(), depths=list(self.depths),
            psnr=psnr_d, ssim=ssim_d, semantic_cosine=cosine, probe=probe,
            pixel_depth=self.config.pixel_depth, semantic_depth=self.config.semantic_depth,
            max_train_depth=self.max_train_depth, codebook_size=self.config.codebook_size,
            input_note=note, teacher_note=self.teacher_note, seconds=time.perf_counter() - started,
        )

    def _check_tensor(self, image: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ImageError(f"expected a float tensor 3×H×W in [-1, 1], got {image.dtype} {tuple(image.shape)}")
        if image.shape[1:] != (size, size):
            image = F.interpolate(image[None], size=(size, size), mode="bicubic", antialias=True)[0]
        return image.clamp(-1, 1).float()

    # -- codebook --------------------------------------------------------------------------------
    def codebook_stats(self) -> dict[str, list[float]]:
        stats = self.tok.quantizer.codebook_stats()
        return {k: [float(v) for v in torch.as_tensor(t).flatten().tolist()] for k, t in stats.items()}

    def codebook_markdown(self, stats: dict[str, list[float]] | None = None) -> str:
        stats = stats or self.codebook_stats()
        k = self.config.codebook_size
        usage, perplexity, dead = stats["usage"], stats["perplexity"], stats["dead_codes"]
        worst = int(np.argmin(usage))
        return (f"{len(usage)} stages × {k:,} codes. Mean usage {np.mean(usage):.1%} "
                f"(lowest: stage {worst + 1}, {usage[worst]:.1%}); perplexity {min(perplexity):,.0f}–{max(perplexity):,.0f} "
                f"of at most {k:,}; {int(sum(dead)):,} dead codes in all. Counts are the codebooks' EMA statistics "
                "at the end of training (a code is dead when its EMA count fell below the restart threshold).")

    # -- UMAP ------------------------------------------------------------------------------------
    def umap(self, depth: int, kind: str = "semantic", cache_dir: str | os.PathLike | None = None,
             per_source: int = 100, seed: int = 0, progress: ProgressFn = _no_progress) -> tuple[np.ndarray, "SampleSet", bool]:
        """2-D UMAP of mean-pooled stage features at ``depth`` for held-out images.

        Features of every depth are computed once per (checkpoint, kind, sample set) and cached,
        as is each depth's embedding; returns ``(embedding n×2, samples, was_cached)``.
        """
        if kind not in FEATURE_KINDS:
            raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
        depth = int(depth)
        if depth not in self.depths:
            raise ValueError(f"depth must lie in 1..{len(self.depths)}, got {depth}")
        cache = Path(cache_dir) if cache_dir else None
        stem = f"{self.fingerprint}-{kind}-n{per_source}-s{seed}"
        key = (stem, depth)
        with self._lock:
            if key in self._memory:
                return (*self._memory[key], True)
            emb_file = cache / f"{stem}-d{depth}-umap.npz" if cache else None
            samples, features = self._umap_features(kind, per_source, seed, cache, stem, progress)
            if emb_file is not None and emb_file.is_file():
                embedding = np.load(emb_file)["embedding"]
                cached = True
            else:
                progress(0.7, f"fitting UMAP on {len(samples.labels)} images at depth {depth} "
                              "(the first fit in a process compiles numba: ~10 s)")
                embedding = umap_embedding(features[depth - 1], seed=seed,
                                           metric="cosine" if kind == "semantic" else "euclidean")
                cached = False
                if emb_file is not None:
                    _atomic_save_npz(emb_file, embedding=embedding)
            self._memory[key] = (embedding, samples)
            progress(1.0, "done")
            return embedding, samples, cached

    def _umap_features(self, kind: str, per_source: int, seed: int, cache: Path | None, stem: str,
                       progress: ProgressFn) -> tuple["SampleSet", np.ndarray]:
        mem_key = (stem, "features")
        if mem_key in self._memory:
            return self._memory[mem_key]
        feat_file = cache / f"{stem}-features.npz" if cache else None
        if feat_file is not None and feat_file.is_file():
            progress(0.1, "reading cached features")
            data = np.load(feat_file)
            samples = SampleSet(images=None, labels=data["labels"].tolist(), sources=data["sources"].tolist(),
                                notes=data["notes"].tolist())
            features = data["features"]
        else:
            samples = load_sample_set(self.config.image_size, per_source, seed,
                                      progress=lambda f, m: progress(0.05 + 0.45 * f, m))
            progress(0.5, f"encoding {len(samples.labels)} images at every depth")
            features = stage_features(self, samples.images, kind)
            if feat_file is not None:
                _atomic_save_npz(feat_file, features=features, labels=np.array(samples.labels),
                                 sources=np.array(samples.sources), notes=np.array(samples.notes, dtype=str))
            samples.images = None  # keep memory small
        self._memory[mem_key] = (samples, features)
        return samples, features


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------ samples
@dataclass
class SampleSet:
    images: torch.Tensor | None   # n 3 H W in [-1, 1] (dropped once features are computed)
    labels: list[str]             # "scene: circle", "clip art: animals", "fashion: sneaker", ...
    sources: list[str]
    notes: list[str] = field(default_factory=list)


def _sample_label(sample) -> str:
    if sample.source == "scenes":
        objects = (sample.attributes or {}).get("objects") or []
        return f"scene: {objects[0]['shape']}" if objects else "scene: empty"
    prefix = {"clipart": "clip art", "fashion_mnist": "fashion"}.get(sample.source, sample.source)
    return f"{prefix}: {sample.label or 'unlabelled'}"


def load_sample_set(resolution: int, per_source: int = 100, seed: int = 0,
                    progress: ProgressFn = _no_progress) -> SampleSet:
    """Held-out images of the offline sources (scenes, clip art, Fashion-MNIST), labelled.

    A source whose Debian package is missing is skipped with a note.
    """
    from .data.scenes import SceneWorld
    from .data.sources import ClipArtSource, FashionMNISTSource, MissingDataError

    builders = {
        "scenes": lambda: SceneWorld(resolution=resolution, seed=seed, split="heldout"),
        "clip art": lambda: ClipArtSource(resolution=resolution, seed=seed, split="heldout"),
        "Fashion-MNIST": lambda: FashionMNISTSource(resolution=resolution, seed=seed, split="heldout"),
    }
    images, labels, sources, notes = [], [], [], []
    for s, (name, build) in enumerate(builders.items()):
        progress(s / len(builders), f"loading {per_source} held-out {name} images")
        try:
            source = build()
        except MissingDataError as err:
            notes.append(f"{name} skipped: {err}")
            continue
        for i in range(min(per_source, len(source))):
            try:
                sample = source[i]
            except ImageError:
                continue
            images.append(pil_to_tensor(sample.image, resolution))
            labels.append(_sample_label(sample))
            sources.append(name)
    if not images:
        raise ValueError("no held-out images could be loaded: " + " ".join(notes))
    return SampleSet(images=torch.stack(images), labels=labels, sources=sources, notes=notes)


@torch.no_grad()
def stage_features(explorer: Explorer, images: torch.Tensor, kind: str = "semantic",
                   batch_size: int = 64) -> np.ndarray:
    """Mean-pooled features after every depth -> ``D n F``.

    ``kind="semantic"``: the semantic decoder's prediction of the teacher's patch features;
    ``kind="latent"``: the quantized prefix latent ``q_d`` itself.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    tok, chunks = explorer.tok, []
    for batch in images.split(batch_size):
        codes = tok.encode(batch.to(explorer.device))
        if kind == "semantic":
            feats = explorer.semantic_features_all_depths(codes).mean(dim=2)             # D b C
        else:
            feats = torch.stack([tok.quantizer.codes_to_latent(codes, d).mean(dim=(1, 2)) for d in explorer.depths])
        chunks.append(feats.float().cpu())
    return torch.cat(chunks, dim=1).numpy()


def umap_embedding(features: np.ndarray, seed: int = 0, n_neighbors: int = 15, metric: str = "euclidean") -> np.ndarray:
    """``n F`` -> ``n 2`` with umap-learn (imported here: its numba start-up is slow)."""
    import umap

    n = features.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1), min_dist=0.1, metric=metric,
                        random_state=seed, init="spectral" if n > 16 else "random")
    return np.asarray(reducer.fit_transform(features.astype(np.float32)), dtype=np.float32)


# ------------------------------------------------------------------------------------ figures
_LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=60, b=45), font=dict(size=12))
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
            "#31a354", "#756bb1", "#636363", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8", "#969696"]


def _mark_depths(fig: go.Figure, result: "ExploreResult", cols: Sequence[int]) -> None:
    """Dashed lines at the pixel and semantic depths, grey band over off-distribution depths."""
    last = len(result.depths)
    for col in cols:
        for depth, name, colour in ((result.pixel_depth, "L<sub>pix</sub>", "#d62728"),
                                    (result.semantic_depth, "L<sub>sem</sub>", "#9467bd")):
            fig.add_vline(x=depth, line=dict(color=colour, dash="dash", width=1.5), row=1, col=col,
                          annotation_text=name, annotation_position="bottom left", annotation_font_color=colour)
        if result.max_train_depth < last:
            fig.add_vrect(x0=result.max_train_depth + 0.5, x1=last + 0.5, fillcolor="#888", opacity=0.15,
                          line_width=0, row=1, col=col)


def metrics_figure(result: ExploreResult) -> go.Figure:
    """PSNR and SSIM (pixel branch) and semantic cosine (semantic branch) against depth."""
    fig = make_subplots(rows=1, cols=2, specs=[[{"secondary_y": True}, {}]], horizontal_spacing=0.12,
                        subplot_titles=("Pixel branch: reconstruction vs input", "Semantic branch: cosine to the teacher"))
    fig.add_trace(go.Scatter(x=result.depths, y=result.psnr, name="PSNR (dB)", mode="lines+markers",
                             line=dict(color="#1f77b4")), row=1, col=1, secondary_y=False)
    fig.add_trace(go.Scatter(x=result.depths, y=result.ssim, name="SSIM", mode="lines+markers",
                             line=dict(color="#ff7f0e", dash="dot")), row=1, col=1, secondary_y=True)
    if result.semantic_cosine is not None:
        fig.add_trace(go.Scatter(x=result.depths, y=result.semantic_cosine, name="cosine to teacher",
                                 mode="lines+markers", line=dict(color="#2ca02c")), row=1, col=2)
    else:
        fig.add_annotation(text="no teacher loaded", showarrow=False, xref="x3 domain", yref="y3 domain", x=0.5, y=0.5)
    _mark_depths(fig, result, cols=(1, 2))
    if result.max_train_depth < len(result.depths):  # a legend entry for the grey band
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="off-distribution for the pixel decoder",
                                 marker=dict(symbol="square", size=12, color="rgba(136,136,136,0.35)")), row=1, col=1)
    fig.update_xaxes(title_text="depth (stages)", dtick=1, range=[0.5, len(result.depths) + 0.5])
    fig.update_yaxes(title_text="PSNR (dB)", row=1, col=1, secondary_y=False)
    fig.update_yaxes(title_text="SSIM", row=1, col=1, secondary_y=True, showgrid=False)
    fig.update_yaxes(title_text="cosine", row=1, col=2)
    fig.update_layout(height=360, legend=dict(orientation="h", y=-0.28, x=0.5, xanchor="center"), **_LAYOUT)
    return fig


def probe_rows(result: ExploreResult, k: int = 3) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the probe table: top ``k`` labels at every depth, then the teacher's."""
    headers = ["depth", f"top {k} labels", "cos"]
    if result.probe is None:
        return headers, []
    rows = []
    for i, depth in enumerate(result.depths):
        name = " · ".join([str(depth), *[_SHORT_ROLES[t] for t in result.roles(depth)]])
        tops = ", ".join(f"{label} {p:.0%}" for label, p in result.probe.top(i, k))
        rows.append([name, tops, f"{result.semantic_cosine[i]:.3f}"])
    rows.append(["teacher", ", ".join(f"{label} {p:.0%}" for label, p in result.probe.top(None, k)), "1.000"])
    return headers, rows


def probe_figure(result: ExploreResult, max_labels: int = 12) -> go.Figure:
    """Heat map of each label's probability (softmax over the listed labels) against depth."""
    fig = go.Figure()
    if result.probe is None:
        fig.add_annotation(text=result.teacher_note or "no teacher loaded", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
        fig.update_layout(height=300, **_LAYOUT)
        return fig
    probe = result.probe
    table = np.concatenate([probe.probs, probe.teacher_probs[None]], axis=0)           # (D+1) × L
    shown = np.argsort(-table.max(axis=0), kind="stable")[:max_labels]
    shown = shown[np.argsort(-table[-2, shown], kind="stable")]                          # order by the deepest stage
    columns = [str(d) for d in result.depths] + ["teacher"]
    z = table[:, shown].T
    fig.add_trace(go.Heatmap(z=z, x=columns, y=[probe.labels[j] for j in shown], colorscale="Viridis", zmin=0,
                             zmax=float(max(z.max(), 1e-6)), colorbar=dict(title="P", thickness=12),
                             text=[[f"{v:.0%}" for v in row] for row in z], texttemplate="%{text}",
                             hovertemplate="depth %{x}<br>%{y}: %{z:.1%}<extra></extra>"))
    for depth, name in ((result.pixel_depth, "L<sub>pix</sub>"), (result.semantic_depth, "L<sub>sem</sub>")):
        fig.add_annotation(x=str(depth), y=1.0, yref="paper", yanchor="bottom", text=name, showarrow=False)
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="depth (stages) · teacher = the teacher on the real image", type="category")
    fig.update_layout(title=f"Zero-shot probe: top {len(shown)} of {len(probe.labels)} labels",
                      height=max(300, 60 + 26 * len(shown)), **_LAYOUT)
    return fig


def codes_figure(result: ExploreResult, max_cols: int = 4) -> go.Figure:
    """Small multiples: the grid of code indices chosen at each stage."""
    h, w, stages = result.codes.shape
    cols = min(stages, max_cols)
    rows = math.ceil(stages / cols)
    titles = [f"stage {d}" + (" (Lpix)" if d == result.pixel_depth else "") + (" (Lsem)" if d == result.semantic_depth else "")
              for d in result.depths]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.03, vertical_spacing=0.08)
    codes = result.codes.numpy()
    for s in range(stages):
        fig.add_trace(go.Heatmap(z=codes[:, :, s], coloraxis="coloraxis",
                                 hovertemplate=f"stage {s + 1}<br>row %{{y}}, col %{{x}}<br>code %{{z}}<extra></extra>"),
                      row=s // cols + 1, col=s % cols + 1)
    fig.update_xaxes(showticklabels=False, constrain="domain")
    fig.update_yaxes(showticklabels=False, autorange="reversed", constrain="domain")
    for i in range(1, stages + 1):
        fig.update_yaxes(scaleanchor=f"x{i if i > 1 else ''}", row=(i - 1) // cols + 1, col=(i - 1) % cols + 1)
    fig.update_layout(coloraxis=dict(colorscale="Turbo", cmin=0, cmax=result.codebook_size - 1,
                                     colorbar=dict(title="code", thickness=12)),
                      title=f"Code indices per stage ({h}×{w} grid, {result.codebook_size:,} codes per stage)",
                      height=80 + 190 * rows, **_LAYOUT)
    return fig


def codebook_figure(stats: dict[str, list[float]], codebook_size: int) -> go.Figure:
    """Per-stage usage, perplexity and dead codes as bars."""
    stages = list(range(1, len(stats["usage"]) + 1))
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("usage (codes alive)", "perplexity", "dead codes"))
    usage = [100 * u for u in stats["usage"]]
    for col, values, name, colour, fmt in ((1, usage, "usage %", "#1f77b4", "{:.0f}%"),
                                           (2, stats["perplexity"], "perplexity", "#2ca02c", "{:,.0f}"),
                                           (3, stats["dead_codes"], "dead codes", "#d62728", "{:,.0f}")):
        fig.add_trace(go.Bar(x=stages, y=values, name=name, marker_color=colour, text=[fmt.format(v) for v in values],
                             textposition="outside", cliponaxis=False, textfont=dict(size=10),
                             hovertemplate=f"stage %{{x}}: %{{text}}<extra>{name}</extra>"), row=1, col=col)
    fig.add_hline(y=codebook_size, line=dict(dash="dot", color="#666"), row=1, col=2,
                  annotation_text=f"K = {codebook_size:,}", annotation_position="bottom right")
    fig.update_xaxes(title_text="stage", dtick=1)
    fig.update_yaxes(title_text="% of codes", range=[0, 112], row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=3)
    fig.update_layout(height=340, showlegend=False, **_LAYOUT)
    return fig


def umap_figure(embedding: np.ndarray, samples: SampleSet, depth: int, kind: str, colour_by: str = "label") -> go.Figure:
    """Scatter of a UMAP embedding, one trace (legend entry) per label or source."""
    keys = samples.labels if colour_by == "label" else samples.sources
    symbols = {name: s for name, s in zip(dict.fromkeys(samples.sources), ("circle", "square", "diamond", "cross", "x"))}
    fig = go.Figure()
    for i, key in enumerate(dict.fromkeys(sorted(keys))):
        idx = [j for j, k in enumerate(keys) if k == key]
        fig.add_trace(go.Scattergl(
            x=embedding[idx, 0], y=embedding[idx, 1], mode="markers", name=key,
            marker=dict(size=7, color=_PALETTE[i % len(_PALETTE)], opacity=0.85, line=dict(width=0.5, color="white"),
                        symbol=[symbols.get(samples.sources[j], "circle") for j in idx]),
            text=[samples.labels[j] for j in idx], hovertemplate="%{text}<extra></extra>"))
    what = "semantic decoder output" if kind == "semantic" else "prefix latent q<sub>d</sub>"
    fig.update_layout(title=f"UMAP of the mean-pooled {what} after {depth} stages ({len(keys)} held-out images)",
                      height=520, legend=dict(font=dict(size=10), itemsizing="constant"), **_LAYOUT)
    fig.update_xaxes(showticklabels=False, title_text="UMAP 1")
    fig.update_yaxes(showticklabels=False, title_text="UMAP 2")
    return fig
