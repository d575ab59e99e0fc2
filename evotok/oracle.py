"""An oracle that reads images of the scene world, and a GenEval-style judge built on it.

Reading an image (``SceneOracle.detect``) takes three steps:

1. **Colour segmentation against the palette.** Every pixel is given its nearest palette colour
   (``evotok.data.scenes.COLOURS``) and kept when it lies within that colour's threshold.
   Backgrounds are muted (saturation ≤ 0.3, mid value), so the thresholds are set just inside
   the closest any background pixel comes to each colour (``calibrate_thresholds``).
2. **Connected components** per colour (``scipy.ndimage.label``) above a minimum area, and with a
   core left after a one-pixel erosion, which removes thin anti-aliasing rims (a blue object on
   a reddish background has a purple-ish rim).
3. **A small CNN** classifies each component's crop (hard mask, soft colour membership and the
   vividness of its surroundings, at the image's own scale so size is visible) into the six
   shapes or ``"other"`` (fragments, merged blobs, stretched shapes, colour noise: things the
   scene world never draws).

``judge(spec, detections)`` decides whether the detections satisfy a prompt of one of the six
GenEval categories; ``geneval_prompts`` writes such prompts over the held-out colour/shape pairs
in the phrasings of the scene world's captions, each with its structured ``PromptSpec``;
``render_spec`` draws a scene that makes a spec true (the reference image and the oracle's
ceiling). Coordinates are normalised to ``[0, 1]``, ``x`` to the right and ``y`` down, as in the
scene world's attributes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .data.scenes import (
    CAPTION_TEMPLATES,
    COLOURS,
    COUNT_WORDS,
    HELDOUT_PAIRS,
    PLURALS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SceneObject,
    _background_array,
    _place,
    _sample_background,
    render_scene,
)
from .hub import PretrainedMixin

__all__ = [
    "GENEVAL_CATEGORIES",
    "ORACLE_CLASSES",
    "OracleConfig",
    "SceneOracle",
    "Component",
    "PromptSpec",
    "to_uint8_images",
    "calibrate_thresholds",
    "segment_colours",
    "component_crops",
    "judge",
    "geneval_prompts",
    "false_spec",
    "render_spec",
    "reference_renders",
    "render_accuracy",
]

GENEVAL_CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_objects",
    "counting",
    "colours",
    "position",
    "colour_attribution",
)
ORACLE_CLASSES: tuple[str, ...] = SHAPES + ("other",)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # 8 × 3, in COLOURS order


# ----------------------------------------------------------------------------- images


def to_uint8_images(images: Any, resolution: int | None = None) -> list[np.ndarray]:
    """Images as a list of ``H W 3`` uint8 arrays (resized to ``resolution`` when given).

    Accepts a PIL image, an ``H W 3`` uint8 array, a ``3 H W`` / ``b 3 H W`` float tensor in
    ``[-1, 1]`` (the library's image convention), or a list of any of these.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensors must be 3 H W or b 3 H W in [-1, 1], got shape {tuple(images.shape)}")
        arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        items: list[Any] = list(arr.permute(0, 2, 3, 1).numpy())
    elif isinstance(images, (Image.Image, np.ndarray)):
        items = [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise TypeError("expected a PIL image, a uint8 array, a tensor in [-1, 1] or a list; "
                        f"got {type(images).__name__}")
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            out.extend(to_uint8_images(item, resolution))
            continue
        if isinstance(item, Image.Image):
            pil = item.convert("RGB")
        elif isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                raise ValueError(f"image arrays must be H W 3 uint8, got {item.shape} {item.dtype}")
            pil = Image.fromarray(item)
        else:
            raise TypeError(f"cannot read an image from {type(item).__name__}")
        if resolution is not None and pil.size != (resolution, resolution):
            shrink = pil.size[0] > resolution
            pil = pil.resize((resolution, resolution), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
        out.append(np.asarray(pil, dtype=np.uint8))
    return out


# ----------------------------------------------------------------------------- segmentation


@dataclass
class Component:
    """One connected region of a single palette colour (pixel coordinates)."""

    colour: str
    mask: np.ndarray  # H W bool
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive-exclusive)
    centroid: tuple[float, float]  # x, y in pixels (pixel centres at +0.5)


def calibrate_thresholds(samples: int = 2000, seed: int = 0, fraction: float = 0.8, cap: float = 70.0,
                         resolution: int = 64) -> tuple[float, ...]:
    """Per-colour RGB distance thresholds: ``min(cap, fraction × closest background approach)``.

    The closest approach is measured over ``samples`` backgrounds drawn the way the scene world
    draws them, so no background pixel of a real render is ever taken for an object colour.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    closest = np.full(len(_PALETTE), np.inf)
    for _ in range(samples):
        pixels = _background_array(_sample_background(rng), resolution).reshape(-1, 3).astype(np.float32)
        dist = np.sqrt(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1)).min(0)
        closest = np.minimum(closest, dist)
    return tuple(float(min(cap, fraction * c)) for c in closest)


def _palette_distances(rgb: np.ndarray) -> np.ndarray:
    """``H W 8`` Euclidean RGB distances of every pixel to every palette colour."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    sq = (pixels ** 2).sum(1, keepdims=True) - 2.0 * pixels @ _PALETTE.T + (_PALETTE ** 2).sum(1)[None]
    return np.sqrt(np.maximum(sq, 0.0)).reshape(*rgb.shape[:2], len(_PALETTE))


def _window(bbox: tuple[int, int, int, int], shape: tuple[int, ...], pad: int) -> tuple[slice, slice]:
    x0, y0, x1, y1 = bbox
    return slice(max(y0 - pad, 0), min(y1 + pad, shape[0])), slice(max(x0 - pad, 0), min(x1 + pad, shape[1]))


def segment_colours(rgb: np.ndarray, thresholds: Sequence[float], min_area: int = 12,
                    min_core_area: int = 4) -> tuple[list[Component], np.ndarray]:
    """Palette-coloured connected components of one ``H W 3`` uint8 image.

    Returns the components (largest first) and the ``H W 8`` palette distances (reused to build
    the classifier's soft colour channel).
    """
    from scipy import ndimage

    if len(thresholds) != len(_PALETTE):
        raise ValueError(f"need one threshold per palette colour ({len(_PALETTE)}), got {len(thresholds)}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H W 3 image, got shape {rgb.shape}")
    dist = _palette_distances(rgb)
    nearest = dist.argmin(-1)
    inside = np.take_along_axis(dist, nearest[..., None], -1)[..., 0] < np.asarray(thresholds)[nearest]
    labelled = np.where(inside, nearest + 1, 0)
    components: list[Component] = []
    names = list(COLOURS)
    for c in np.unique(labelled[labelled > 0]):
        labels, count = ndimage.label(labelled == c)
        if count == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        boxes = ndimage.find_objects(labels)
        for k in range(1, count + 1):
            if areas[k] < min_area:
                continue
            ys, xs = boxes[k - 1]
            bbox = (xs.start, ys.start, xs.stop, ys.stop)
            wy, wx = _window(bbox, labels.shape, 1)
            local = labels[wy, wx] == k
            if int(ndimage.binary_erosion(local).sum()) < min_core_area:
                continue
            region = labels == k
            py, px = np.nonzero(local)
            components.append(Component(
                colour=names[int(c) - 1], mask=region, area=int(areas[k]), bbox=bbox,
                centroid=(float(px.mean()) + wx.start + 0.5, float(py.mean()) + wy.start + 0.5),
            ))
    components.sort(key=lambda comp: -comp.area)
    return components, dist


def component_crops(components: Sequence[Component], dist: np.ndarray, thresholds: Sequence[float],
                    crop_size: int = 32, soft_width: float = 2.0) -> np.ndarray:
    """Classifier inputs ``n 3 S S`` float32 for the components of one image.

    Channels: the component's filled mask; its soft colour membership (``1`` at the palette
    colour, ``0`` at ``soft_width`` × the colour's threshold) within 2 pixels of it; and the
    surroundings: how close every *other* pixel of the window is to any palette colour. The last
    tells a shape on a calm background from a blob in a field of colour noise (a failed
    generation). The crop is centred on the component's box at the image's own scale (so small
    and large look different); a component wider than ``S - 2`` pixels is shrunk to fit.
    """
    from scipy import ndimage

    names = list(COLOURS)
    scale = soft_width * np.asarray(thresholds, dtype=np.float32)
    vivid = np.clip(1.0 - dist / scale, 0.0, 1.0).max(-1)  # H W: how close to any palette colour
    out = np.zeros((len(components), 3, crop_size, crop_size), dtype=np.float32)
    h, w = dist.shape[:2]
    for n, comp in enumerate(components):
        c = names.index(comp.colour)
        x0, y0, x1, y1 = comp.bbox
        side = max(x1 - x0, y1 - y0) + 2
        window = max(crop_size, side)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, top = int(round(cx - window / 2)), int(round(cy - window / 2))
        sx0, sy0 = max(left, 0), max(top, 0)
        sx1, sy1 = min(left + window, w), min(top + window, h)
        mask = comp.mask[sy0:sy1, sx0:sx1]
        near = ndimage.binary_dilation(mask, iterations=2)
        soft = np.clip(1.0 - dist[sy0:sy1, sx0:sx1, c] / scale[c], 0.0, 1.0) * near
        padded = np.zeros((3, window, window), dtype=np.float32)
        inside = (slice(sy0 - top, sy1 - top), slice(sx0 - left, sx1 - left))
        padded[(0, *inside)] = ndimage.binary_fill_holes(mask)
        padded[(1, *inside)] = soft
        padded[(2, *inside)] = vivid[sy0:sy1, sx0:sx1] * ~near
        if window != crop_size:
            padded = F.interpolate(torch.from_numpy(padded)[None], size=(crop_size, crop_size), mode="area")[0].numpy()
        out[n] = padded
    return out


# ----------------------------------------------------------------------------- the model


@dataclass
class OracleConfig:
    """Settings of the oracle (saved as ``config.json``).

    Args:
        resolution: images are resized to this side before reading (the scene world's 64).
        colour_thresholds: per palette colour (``COLOURS`` order), the largest RGB distance at
            which a pixel counts as that colour; see ``calibrate_thresholds``.
        soft_width: the soft colour channel falls to 0 at this multiple of the threshold.
        min_area: smallest component, in pixels at ``resolution``.
        min_core_area: pixels a component must keep after a one-pixel erosion (drops thin rims).
        crop_size: side of the classifier's input crop.
        widths: channels of the classifier's three conv stages.
        classes: classifier outputs: the shapes, then ``"other"``.
        min_confidence: detections whose class probability is below this are dropped.
        position_margin: in ``judge``, the smallest centre offset (fraction of the side) that
            counts as "left of" / "above" / ...
    """

    resolution: int = 64
    # calibrate_thresholds() on 1,000 backgrounds (seed 0): purple and green come closest to them
    colour_thresholds: tuple[float, ...] = (70.0, 55.1, 70.0, 70.0, 52.4, 70.0, 70.0, 70.0)
    soft_width: float = 2.0
    min_area: int = 12
    min_core_area: int = 4
    crop_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    classes: tuple[str, ...] = ORACLE_CLASSES
    min_confidence: float = 0.5
    position_margin: float = 0.08

    def __post_init__(self) -> None:
        if len(self.colour_thresholds) != len(COLOURS):
            raise ValueError(f"colour_thresholds needs {len(COLOURS)} values (one per colour in {tuple(COLOURS)})")
        if len(self.widths) != 3:
            raise ValueError(f"widths needs three conv stages, got {self.widths}")
        if self.crop_size % 8:
            raise ValueError(f"crop_size must be a multiple of 8, got {self.crop_size}")
        unknown = [c for c in self.classes if c not in ORACLE_CLASSES]
        if unknown or "other" not in self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names from {ORACLE_CLASSES}, including 'other'; "
                             f"got {self.classes}")


class SceneOracle(nn.Module, PretrainedMixin):
    """Reads a scene-world image: ``oracle.detect(images)`` -> per image, a list of detections
    ``{"shape", "colour", "centre": (x, y), "bbox": (x0, y0, x1, y1), "area", "score"}``
    (normalised coordinates; ``area`` in pixels at ``config.resolution``)."""

    config_class = OracleConfig
    model_type = "evotok_scene_oracle"

    def __init__(self, config: OracleConfig | None = None):
        super().__init__()
        self.config = config or OracleConfig()
        w1, w2, w3 = self.config.widths

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(3, w1), stage(w1, w2), stage(w2, w3))
        cells = (self.config.crop_size // 8) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(w3 * cells, 64), nn.ReLU(),
                                  nn.Linear(64, len(self.config.classes)))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Class logits ``n classes`` for crops ``n 3 S S`` (see ``component_crops``)."""
        return self.head(self.features(crops))

    # ---- reading images

    def components(self, rgb: np.ndarray) -> tuple[list[Component], np.ndarray]:
        """Segment one ``H W 3`` uint8 image: its components and their classifier crops."""
        cfg = self.config
        comps, dist = segment_colours(rgb, cfg.colour_thresholds, cfg.min_area, cfg.min_core_area)
        crops = component_crops(comps, dist, cfg.colour_thresholds, cfg.crop_size, cfg.soft_width)
        return comps, crops

    @torch.no_grad()
    def detect(self, images: Any, keep_other: bool = False) -> list[list[dict[str, Any]]]:
        """Objects in each image (see the class docstring). ``keep_other`` also returns
        components classified ``"other"`` or below ``min_confidence`` (with their best guess)."""
        cfg = self.config
        arrays = to_uint8_images(images, cfg.resolution)
        per_image = [self.components(rgb) for rgb in arrays]
        all_crops = [crops for _, crops in per_image if len(crops)]
        probs = torch.empty(0, len(cfg.classes))
        if all_crops:
            device = next(self.parameters()).device
            was_training = self.training
            self.eval()
            probs = self(torch.from_numpy(np.concatenate(all_crops)).to(device)).softmax(-1).cpu()
            self.train(was_training)
        results: list[list[dict[str, Any]]] = []
        offset = 0
        side = float(cfg.resolution)
        for comps, _ in per_image:
            found = []
            for comp, p in zip(comps, probs[offset:offset + len(comps)]):
                score, k = (float(v) for v in p.max(-1))
                shape = cfg.classes[int(k)]
                valid = shape != "other" and score >= cfg.min_confidence
                if not (valid or keep_other):
                    continue
                x0, y0, x1, y1 = comp.bbox
                det = {
                    "shape": shape,
                    "colour": comp.colour,
                    "centre": (comp.centroid[0] / side, comp.centroid[1] / side),
                    "bbox": (x0 / side, y0 / side, x1 / side, y1 / side),
                    "area": comp.area,
                    "score": score,
                }
                if keep_other:
                    det["valid"] = valid
                found.append(det)
            offset += len(comps)
            results.append(found)
        return results

    def judge(self, spec: "PromptSpec", image: Any) -> bool:
        """Whether ``image`` satisfies ``spec`` (one image)."""
        return judge(spec, self.detect(image)[0], self.config.position_margin)


# ----------------------------------------------------------------------------- prompts and the judge


@dataclass(frozen=True)
class PromptSpec:
    """A GenEval-style prompt and what it asks for.

    ``objects`` are ``(colour, shape)`` pairs (colour ``None``: any colour). ``count``: counting
    asks for exactly this many of ``objects[0]``. ``relation``: position asks for
    ``objects[0] <relation> objects[1]``. ``background``: the background kind the prompt names
    (``None``: any); ``render_spec`` honours it.
    """

    category: str
    prompt: str
    objects: tuple[tuple[str | None, str], ...]
    count: int | None = None
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if self.category not in GENEVAL_CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; expected one of {GENEVAL_CATEGORIES}")
        needed = {"single_object": 1, "colours": 1, "counting": 1}.get(self.category, 2)
        if len(self.objects) != needed:
            raise ValueError(f"a {self.category} spec needs {needed} object(s), got {self.objects}")
        for colour, shape in self.objects:
            if shape not in SHAPES or (colour is not None and colour not in COLOURS):
                raise ValueError(f"unknown object ({colour!r}, {shape!r})")
        if self.category == "counting" and (self.count is None or self.count < 1):
            raise ValueError("a counting spec needs count >= 1")
        if self.category == "colours" and self.objects[0][0] is None:
            raise ValueError("a colours spec needs a colour")
        if self.category == "position" and self.relation not in RELATIONS:
            raise ValueError(f"a position spec needs a relation in {tuple(RELATIONS)}, got {self.relation!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "prompt": self.prompt, "objects": [list(o) for o in self.objects],
                "count": self.count, "relation": self.relation, "background": self.background}


def _is(det: dict[str, Any], colour: str | None, shape: str) -> bool:
    return det["shape"] == shape and (colour is None or det["colour"] == colour)


def _holds(relation: str, a: dict[str, Any], b: dict[str, Any], margin: float) -> bool:
    """``a`` is ``relation`` ``b``: offset beyond ``margin`` along the axis, and that axis dominant."""
    dx = b["centre"][0] - a["centre"][0]
    dy = b["centre"][1] - a["centre"][1]
    if relation == "left of":
        return dx > margin and abs(dx) > abs(dy)
    if relation == "right of":
        return -dx > margin and abs(dx) > abs(dy)
    if relation == "above":
        return dy > margin and abs(dy) > abs(dx)
    if relation == "below":
        return -dy > margin and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def judge(spec: PromptSpec, detections: Sequence[dict[str, Any]], margin: float = 0.08) -> bool:
    """Whether ``detections`` (from ``SceneOracle.detect``) satisfy ``spec``.

    * single_object: an object of the shape (and colour, when given) exists;
    * two_objects: both objects exist;
    * counting: exactly ``count`` objects of the shape (and colour) exist;
    * colours: the shape exists and its largest instance has the colour;
    * position: some instance of the first object is ``relation`` some instance of the second,
      by more than ``margin`` along that axis, which also dominates the other axis;
    * colour_attribution: an object of shape 1 in colour 1 and one of shape 2 in colour 2 exist.
    """
    dets = [d for d in detections if d.get("valid", True)]
    objs = spec.objects
    if spec.category == "single_object":
        return any(_is(d, *objs[0]) for d in dets)
    if spec.category in ("two_objects", "colour_attribution"):
        return all(any(_is(d, *o) for d in dets) for o in objs)
    if spec.category == "counting":
        return sum(_is(d, *objs[0]) for d in dets) == spec.count
    if spec.category == "colours":
        colour, shape = objs[0]
        same = [d for d in dets if d["shape"] == shape]
        return bool(same) and max(same, key=lambda d: d["area"])["colour"] == colour
    if spec.category == "position":
        firsts = [d for d in dets if _is(d, *objs[0])]
        seconds = [d for d in dets if _is(d, *objs[1])]
        assert spec.relation is not None
        return any(_holds(spec.relation, a, b, margin) for a in firsts for b in seconds if a is not b)
    raise ValueError(f"unknown category {spec.category!r}")  # pragma: no cover - checked by PromptSpec


# Scene-world caption templates each category borrows (the LM has read these sentences).
_TEMPLATE_SOURCE = {
    "single_object": "single_object",
    "two_objects": "two_objects",
    "counting": "counting",
    "colours": "single_object",
    "position": "position",
    "colour_attribution": "colour_attribution",
}
_BACKGROUND_KIND = {"plain": ("solid",), "gradient": ("vertical_gradient", "horizontal_gradient"),
                    "striped": ("stripes",), "checkered": ("checker",), "mottled": ("noise",)}


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _one_prompt(category: str, rng: np.random.Generator, pairs: Sequence[tuple[str, str]]) -> PromptSpec:
    first = _pick(rng, pairs)
    if category in ("two_objects", "colour_attribution", "position"):
        def fits(p: tuple[str, str]) -> bool:
            if category == "position":
                return p != first
            if category == "colour_attribution":
                return p[1] != first[1] and p[0] != first[0]
            return p[1] != first[1]
        objects = (first, _pick(rng, [p for p in pairs if fits(p)]))
    else:
        objects = (first,)
    template = _pick(rng, CAPTION_TEMPLATES[_TEMPLATE_SOURCE[category]])
    if category == "colours" and rng.uniform() < 0.4:  # the colour-first phrasing of attribution captions
        template = "a {shape_a} that is {colour_a}"
    bg_word = _pick(rng, list(_BACKGROUND_KIND))
    fields: dict[str, str] = {"bg": bg_word}
    (ca, sa) = objects[0]
    fields.update(a=_article(f"{ca} {sa}"), colour_a=ca, shape_a=sa)
    if len(objects) > 1:
        (cb, sb) = objects[1]
        fields.update(b=_article(f"{cb} {sb}"), colour_b=cb, shape_b=sb)
    count = relation = None
    if category == "counting":
        count = int(rng.integers(2, 5))
        fields["count"] = f"{COUNT_WORDS[count]} {ca} {PLURALS[sa]}"
    if category == "position":
        relation = _pick(rng, list(RELATIONS))
        fields["rel"] = _pick(rng, RELATION_PHRASES[relation])
    background = _pick(rng, _BACKGROUND_KIND[bg_word]) if "{bg}" in template else None
    return PromptSpec(category, template.format(**fields), tuple(objects), count, relation, background)


def geneval_prompts(per_category: int, seed: int = 0, categories: Iterable[str] = GENEVAL_CATEGORIES,
                    pairs: Iterable[tuple[str, str]] | None = None) -> list[PromptSpec]:
    """``per_category`` prompts in each category, built only from ``pairs`` (default: the held-out
    colour/shape pairs), phrased like the scene world's captions. Deterministic in ``seed``."""
    if per_category < 0:
        raise ValueError(f"per_category must be >= 0, got {per_category}")
    pool = sorted(HELDOUT_PAIRS if pairs is None else set(pairs))
    if len({s for _, s in pool}) < 2 or len({c for c, _ in pool}) < 2:
        raise ValueError("need pairs with at least two shapes and two colours")
    specs = []
    for c, category in enumerate(categories):
        if category not in GENEVAL_CATEGORIES:
            raise ValueError(f"unknown category {category!r}; expected one of {GENEVAL_CATEGORIES}")
        for i in range(per_category):
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, GENEVAL_CATEGORIES.index(category), i])
            specs.append(_one_prompt(category, rng, pool))
    return specs


def false_spec(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """A near-miss of ``spec`` that a scene satisfying ``spec`` (and nothing more) makes false:
    another colour or shape, one more or one fewer, the opposite relation, swapped colours."""
    objs = list(spec.objects)
    colours, shapes = list(COLOURS), list(SHAPES)
    cat = spec.category
    if cat in ("single_object", "colours", "two_objects"):
        k = len(objs) - 1
        colour, shape = objs[k]
        taken = {s for _, s in objs}
        if cat == "colours" or (cat == "single_object" and rng.uniform() < 0.5):
            colour = _pick(rng, [c for c in colours if c != colour])
        else:
            shape = _pick(rng, [s for s in shapes if s not in taken])
        objs[k] = (colour, shape)
        return replace(spec, objects=tuple(objs), prompt=f"[false] {spec.prompt}")
    if cat == "counting":
        assert spec.count is not None
        count = spec.count + 1 if spec.count == 1 or rng.uniform() < 0.5 else spec.count - 1
        return replace(spec, count=count, prompt=f"[false] {spec.prompt}")
    if cat == "position":
        assert spec.relation is not None
        return replace(spec, relation=RELATIONS[spec.relation], prompt=f"[false] {spec.prompt}")
    if cat == "colour_attribution":
        (c1, s1), (c2, s2) = objs
        return replace(spec, objects=((c2, s1), (c1, s2)), prompt=f"[false] {spec.prompt}")
    raise ValueError(f"unknown category {cat!r}")  # pragma: no cover


def render_spec(spec: PromptSpec, rng: np.random.Generator,
                resolution: int = 64) -> tuple[Image.Image, list[SceneObject]]:
    """A scene-world render that makes ``spec`` true (and nothing it tests for false).

    Objects get random sizes as in the scene world (counts of three or more are mostly small),
    the background kind the prompt names (or any), and the relation a position prompt asks for.
    """
    def size() -> str:
        return "small" if rng.uniform() < 0.5 else "large"

    def colour_of(c: str | None) -> str:
        return c if c is not None else _pick(rng, list(COLOURS))

    relation = None
    if spec.category == "counting":
        assert spec.count is not None
        colour, shape = spec.objects[0]
        sz = "small" if spec.count >= 3 and rng.uniform() < 0.6 else size()
        specs = [(colour_of(colour), shape, sz)] * spec.count
    else:
        specs = [(colour_of(c), s, size()) for c, s in spec.objects]
        relation = spec.relation if spec.category == "position" else None
    background = _sample_background(rng)
    for _ in range(200):
        if spec.background is None or background["kind"] == spec.background:
            break
        background = _sample_background(rng)
    objects = list(_place(rng, specs, relation=relation))
    return render_scene(objects, background, resolution), objects



def reference_renders(specs: Sequence[PromptSpec], seed: int = 0, resolution: int = 64) -> list[Image.Image]:
    """One render per spec that makes it true (deterministic in ``seed`` and the spec's position)."""
    return [render_spec(spec, np.random.default_rng([int(seed) & 0xFFFFFFFF, i]), resolution)[0]
            for i, spec in enumerate(specs)]


def render_accuracy(oracle: SceneOracle, specs: Sequence[PromptSpec], images: Sequence[Any],
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """How well the oracle judges images that are known to satisfy ``specs``.

    Per category (and ``"overall"``, the mean of categories): ``true_accept``, the fraction of
    specs the judge accepts on their own images, and ``false_reject``, the fraction of near-miss
    specs (``false_spec``) it rejects on the same images; ``n`` images.
    """
    if len(specs) != len(images):
        raise ValueError(f"{len(specs)} specs but {len(images)} images")
    detections: list[list[dict[str, Any]]] = []
    for start in range(0, len(images), 64):
        detections += oracle.detect(list(images[start:start + 64]))
    margin = oracle.config.position_margin
    table: dict[str, list[tuple[bool, bool]]] = {}
    for i, (spec, dets) in enumerate(zip(specs, detections)):
        wrong = false_spec(spec, np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 1]))
        table.setdefault(spec.category, []).append((judge(spec, dets, margin), not judge(wrong, dets, margin)))
    result = {cat: {"true_accept": float(np.mean([t for t, _ in rows])),
                    "false_reject": float(np.mean([f for _, f in rows])), "n": len(rows)}
              for cat, rows in table.items()}
    if result:
        result["overall"] = {key: float(np.mean([r[key] for r in result.values()]))
                             for key in ("true_accept", "false_reject")}
        result["overall"]["n"] = len(specs)
    return result
