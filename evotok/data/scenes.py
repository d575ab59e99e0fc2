"""Procedural scenes of coloured shapes with exact captions, attributes and question/answer pairs.

``SceneWorld(resolution, seed, split)[i]`` renders scene ``i``: a muted background and one to
four non-overlapping objects drawn from a small vocabulary (6 shapes × 8 colours × 2 sizes).
Scene *types* mirror the GenEval categories (single object, two objects, counting, position,
colour attribution), so the same world trains the tokenizer and tests what a model knows.

A fixed set of (colour, shape) pairs, ``HELDOUT_PAIRS``, never appears in ``split="train"``;
``split="heldout"`` scenes are built only from those pairs, to test compositional generalisation
(every colour and every shape still occurs in training, only with other partners).

Coordinates in attributes are normalised to ``[0, 1]``, ``x`` to the right and ``y`` down.
"""
from __future__ import annotations

import colorsys
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .base import Sample, check_index, item_rng, stable_hash, validate_split

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "SCENE_TYPES",
    "HELDOUT_PAIRS",
    "TRAIN_PAIRS",
    "COUNT_WORDS",
    "SceneObject",
    "Scene",
    "SceneWorld",
    "render_scene",
    "describe_relation",
    "image_side",
    "question_candidates",
    "place_questions",
    "is_place_question",
    "split_pairs",
    "scene_to_dict",
    "vocabulary",
]

# ----------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

# Saturated, well separated colours; backgrounds are kept muted and mid-bright so that
# every one of these (white and black included) stands out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 30),
    "purple": (135, 50, 185),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

# Side of the square each object is drawn in, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.22, "large": 0.38}

SCENE_TYPES: dict[str, float] = {
    "single_object": 0.2,
    "two_objects": 0.2,
    "counting": 0.2,
    "position": 0.2,
    "colour_attribution": 0.2,
}

COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
RELATIONS: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

BACKGROUND_KINDS: tuple[str, ...] = (
    "solid",
    "vertical_gradient",
    "horizontal_gradient",
    "stripes",
    "checker",
    "noise",
)
BACKGROUND_WORDS: dict[str, str] = {
    "solid": "plain",
    "vertical_gradient": "gradient",
    "horizontal_gradient": "gradient",
    "stripes": "striped",
    "checker": "checkered",
    "noise": "mottled",
}

MARGIN = 0.02  # free border around the image, fraction of the side
GAP = 0.04  # minimum free space between two objects' boxes
RELATION_GAP = 0.06  # boxes must be this far apart along the relation's axis...
RELATION_DOMINANCE = 2.0  # ...and the centre offset along it this many times the other axis'
IMAGE_MIDDLE = "the middle of the image"  # the fixed reference of place questions
PLACE_GAP = RELATION_GAP / 2  # an object's box must clear the image's midline by this to be on one side


def _select_heldout_pairs() -> frozenset[tuple[str, str]]:
    """~15% of (colour, shape) pairs, chosen by a fixed hash.

    At most one pair per colour and two per shape, so each colour keeps five training shapes
    and each shape keeps at least six training colours.
    """
    pairs = sorted(
        ((c, s) for c in COLOURS for s in SHAPES),
        key=lambda p: stable_hash(f"evotok-heldout:{p[0]}:{p[1]}"),
    )
    target = round(0.15 * len(pairs))
    chosen: list[tuple[str, str]] = []
    per_colour: dict[str, int] = {}
    per_shape: dict[str, int] = {}
    for colour, shape in pairs:
        if per_colour.get(colour, 0) >= 1 or per_shape.get(shape, 0) >= 2:
            continue
        chosen.append((colour, shape))
        per_colour[colour] = per_colour.get(colour, 0) + 1
        per_shape[shape] = per_shape.get(shape, 0) + 1
        if len(chosen) == target:
            break
    return frozenset(chosen)


HELDOUT_PAIRS: frozenset[tuple[str, str]] = _select_heldout_pairs()
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS
)
_SPLIT_PAIRS = {"train": TRAIN_PAIRS, "heldout": tuple(sorted(HELDOUT_PAIRS))}
_SPLIT_STREAM = {"train": 0, "heldout": 1}


def split_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs scenes of ``split`` are built from."""
    return _SPLIT_PAIRS[validate_split(split)]


# ----------------------------------------------------------------------------- text templates
# Placeholders: {a} {b} noun phrases with article, {count} "three green stars", {rel} relation
# words, {bg} background word, {x} a referring expression such as "the red circle".

CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": (
        "{a}",
        "a photo of {a}",
        "an image of {a}",
        "{a} on a {bg} background",
        "a picture showing {a}",
    ),
    "two_objects": (
        "{a} and {b}",
        "a photo of {a} and {b}",
        "an image of {a} and {b}",
        "{a} and {b} on a {bg} background",
    ),
    "counting": (
        "{count}",
        "a photo of {count}",
        "an image with {count}",
        "{count} on a {bg} background",
    ),
    "position": (
        "{a} {rel} {b}",
        "a photo of {a} {rel} {b}",
        "an image of {a} {rel} {b}",
    ),
    "colour_attribution": (
        "{a} and {b}",
        "a photo of {a} and {b}",
        "one {colour_a} {shape_a} and one {colour_b} {shape_b}",
        "a {shape_a} that is {colour_a} and a {shape_b} that is {colour_b}",
    ),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "underneath"),
}
# reading prompts back: the relation each phrase names, and the phrases longest first ("to the left of"
# before "left of"), as one pattern
RELATION_OF_PHRASE: dict[str, str] = {phrase: rel for rel, phrases in RELATION_PHRASES.items() for phrase in phrases}
RELATION_PHRASE_PATTERN = re.compile(r"\b(" + "|".join(sorted(RELATION_OF_PHRASE, key=len, reverse=True)) + r")\b")
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape_only": ("What shape is the object?", "What shape is shown?", "Which shape is in the image?"),
    "shape": ("What shape is {x}?", "What is the shape of {x}?"),
    "colour": ("What colour is {x}?", "What color is {x}?", "Which colour is {x}?"),
    "count_shape": ("How many {shapes} are there?", "How many {shapes} are in the image?"),
    "count_colour": ("How many {colour} objects are there?",),
    "count_all": ("How many objects are there?", "How many shapes are in the image?"),
    "position_lr": ("Is {x} left or right of {y}?", "Is {x} to the left or to the right of {y}?"),
    "position_ab": ("Is {x} above or below {y}?",),
    "position_yes_no": ("Is {x} {rel} {y}?",),
    "existence": ("Is there {a}?", "Is there {a} in the image?", "Does the image contain {a}?"),
    "size": ("Is {x} small or large?", "What size is {x}?"),
}
ANSWER_WORDS = ("yes", "no", "left", "right", "above", "below")
QA_PER_SCENE = 6


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


# ----------------------------------------------------------------------------- scene structure


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is and where its drawing box is centred (normalised coordinates)."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")
        if len(self.centre) != 2:
            raise ValueError(f"centre must be (x, y), got {self.centre!r}")

    @property
    def extent(self) -> float:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The square the object is drawn in: (x0, y0, x1, y1)."""
        h = self.extent / 2
        x, y = self.centre
        return (x - h, y - h, x + h, y + h)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Tight bounding box of the drawn shape."""
        xs, ys = zip(*_unit_outline(self.shape))
        x, y = self.centre
        e = self.extent
        return (x + min(xs) * e, y + min(ys) * e, x + max(xs) * e, y + max(ys) * e)

    def phrase(self, with_size: bool = False) -> str:
        words = ([self.size] if with_size else []) + [self.colour, self.shape]
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "centre": [float(v) for v in self.centre],
            "bbox": [float(v) for v in self.bbox],
            "rgb": list(COLOURS[self.colour]),
        }

    @classmethod
    def from_any(cls, obj: "SceneObject | Mapping[str, Any]") -> "SceneObject":
        if isinstance(obj, SceneObject):
            return obj
        try:
            return cls(obj["shape"], obj["colour"], obj["size"], tuple(obj["centre"]))  # type: ignore[arg-type]
        except KeyError as exc:
            raise ValueError(f"a scene object needs shape, colour, size and centre; missing {exc}") from None


@dataclass(frozen=True)
class Scene:
    """Everything needed to render and describe one scene (no pixels)."""

    scene_type: str
    objects: tuple[SceneObject, ...]
    background: dict[str, Any]
    relation: tuple[int, str, int] | None = None  # the relation a position scene is about


# ----------------------------------------------------------------------------- geometry


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Outline of a shape inside a unit box centred at (0, 0) (circle: its bounding points)."""
    if shape == "circle":
        return [(-0.5, -0.5), (0.5, 0.5)]
    if shape == "square":
        h = 0.42
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(0.0, -0.47), (0.5, 0.40), (-0.5, 0.40)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.25
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.04))
        return pts
    if shape == "hexagon":
        return [(0.5 * math.cos(k * math.pi / 3), 0.5 * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "cross":
        a, w = 0.46, 0.16
        return [
            (-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
            (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def describe_relation(a: SceneObject, b: SceneObject) -> str | None:
    """The relation of ``a`` to ``b`` ("left of", "right of", "above", "below") when it is clear.

    Clear means: the boxes are separated along one axis by ``RELATION_GAP`` and the centre
    offset along that axis is at least ``RELATION_DOMINANCE`` times the offset along the other,
    so no one could call it the other relation. Otherwise ``None``.
    """
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    dx = b.centre[0] - a.centre[0]
    dy = b.centre[1] - a.centre[1]
    if abs(dx) >= RELATION_DOMINANCE * abs(dy):
        if ax1 + RELATION_GAP <= bx0:
            return "left of"
        if bx1 + RELATION_GAP <= ax0:
            return "right of"
    if abs(dy) >= RELATION_DOMINANCE * abs(dx):
        if ay1 + RELATION_GAP <= by0:
            return "above"
        if by1 + RELATION_GAP <= ay0:
            return "below"
    return None


def image_side(obj: SceneObject) -> tuple[str | None, str | None]:
    """Where ``obj`` lies against the image's middle: ("left" | "right" | None, "above" | "below" | None).

    A side is given only when the object's box clears the midline by ``PLACE_GAP``; an object
    across or near the middle has no side on that axis."""
    x0, y0, x1, y1 = obj.box
    horizontal = "left" if x1 + PLACE_GAP <= 0.5 else "right" if x0 - PLACE_GAP >= 0.5 else None
    vertical = "above" if y1 + PLACE_GAP <= 0.5 else "below" if y0 - PLACE_GAP >= 0.5 else None
    return horizontal, vertical


def _boxes_apart(a: SceneObject, b: SceneObject, gap: float = GAP) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


# ----------------------------------------------------------------------------- rendering


def _background_array(background: Mapping[str, Any], side: int) -> np.ndarray:
    """Render a background description to a ``side × side × 3`` uint8 array."""
    kind = background.get("kind", "solid")
    colours = [np.asarray(c, dtype=np.float32) for c in background.get("colours", [(128, 128, 128)])]
    c0 = colours[0]
    c1 = colours[1] if len(colours) > 1 else c0
    u0, u1 = (np.clip(np.round(c), 0, 255).astype(np.uint8) for c in (c0, c1))
    t = (np.arange(side, dtype=np.float32) + 0.5) / side
    if kind == "solid":
        return np.broadcast_to(u0, (side, side, 3))
    if kind in ("vertical_gradient", "horizontal_gradient"):
        ramp = np.round(c0 * (1 - t[:, None]) + c1 * t[:, None]).astype(np.uint8)  # side × 3
        shape = (side, side, 3)
        return np.broadcast_to(ramp[:, None, :] if kind == "vertical_gradient" else ramp[None, :, :], shape)
    if kind in ("stripes", "checker"):
        period = float(background.get("period", 0.125))
        if kind == "checker":
            cells = np.floor(t / period).astype(np.int64)
            mask = (cells[:, None] + cells[None, :]) % 2 == 1
        else:
            orientation = background.get("orientation", "vertical")
            band = np.floor(t / (period / 2)).astype(np.int64) % 2 == 1
            if orientation == "vertical":
                mask = np.broadcast_to(band[None, :], (side, side))
            elif orientation == "horizontal":
                mask = np.broadcast_to(band[:, None], (side, side))
            else:
                diag = (t[:, None] + t[None, :]) / math.sqrt(2)
                mask = np.floor(diag / (period / 2)).astype(np.int64) % 2 == 1
        return np.where(mask[..., None], u1, u0)
    if kind == "noise":
        grid = int(background.get("grid", 8))
        amplitude = float(background.get("amplitude", 18.0))
        rng = np.random.default_rng(int(background.get("noise_seed", 0)))
        coarse = rng.uniform(0, 255, size=(grid, grid)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC))
        offset = (smooth.astype(np.float32) * (2 * amplitude / 255.0) - amplitude)[..., None]
        return np.clip(np.round(c0 + offset), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUND_KINDS}")


def default_supersample(resolution: int) -> int:
    """Drawing scale for anti-aliasing: 4× for small images, less where pixels are cheap to spare."""
    return 4 if resolution <= 64 else 3 if resolution <= 128 else 2


def render_scene(
    objects: Sequence[SceneObject | Mapping[str, Any]],
    background: Mapping[str, Any] | None = None,
    resolution: int = 64,
    supersample: int | None = None,
) -> Image.Image:
    """Draw ``objects`` on ``background`` at ``resolution`` (anti-aliased by supersampling).

    ``objects`` are ``SceneObject``s or dicts with shape, colour, size and centre (as in a
    scene's attributes). ``background`` is a dict like ``{"kind": "solid", "colours": [[r, g, b]]}``
    (default: plain mid grey). ``supersample`` defaults to ``default_supersample(resolution)``.
    """
    if supersample is None:
        supersample = default_supersample(resolution)
    if resolution <= 0 or supersample <= 0:
        raise ValueError("resolution and supersample must be positive")
    background = background or {"kind": "solid", "colours": [(128, 128, 128)]}
    side = resolution * supersample
    canvas = Image.fromarray(np.ascontiguousarray(_background_array(background, side)))
    draw = ImageDraw.Draw(canvas)
    for raw in objects:
        obj = SceneObject.from_any(raw)
        fill = COLOURS[obj.colour]
        cx, cy = obj.centre[0] * side, obj.centre[1] * side
        e = obj.extent * side
        if obj.shape == "circle":
            draw.ellipse((cx - e / 2, cy - e / 2, cx + e / 2, cy + e / 2), fill=fill)
        else:
            draw.polygon([(cx + u * e, cy + v * e) for u, v in _unit_outline(obj.shape)], fill=fill)
    if supersample > 1:
        canvas = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    return canvas


# ----------------------------------------------------------------------------- sampling


def _muted_colour(rng: np.random.Generator, value: float | None = None) -> tuple[int, int, int]:
    hue = rng.uniform(0, 1)
    sat = rng.uniform(0.08, 0.3)
    val = rng.uniform(0.45, 0.68) if value is None else value
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


def _sample_background(rng: np.random.Generator) -> dict[str, Any]:
    kind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
    base = _muted_colour(rng)
    bg: dict[str, Any] = {"kind": kind, "colours": [list(base)]}
    if kind in ("vertical_gradient", "horizontal_gradient", "stripes", "checker"):
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in base))
        delta = rng.uniform(0.1, 0.18) if "gradient" in kind else rng.uniform(0.05, 0.09)
        v2 = v + delta if v + delta <= 0.72 else v - delta
        r, g, b = colorsys.hsv_to_rgb(h, s, v2)
        bg["colours"].append([round(r * 255), round(g * 255), round(b * 255)])
    if kind in ("stripes", "checker"):
        bg["period"] = float(rng.choice([0.125, 0.1667, 0.25]))
    if kind == "stripes":
        bg["orientation"] = str(rng.choice(["vertical", "horizontal", "diagonal"]))
    if kind == "noise":
        bg["noise_seed"] = int(rng.integers(2**31))
        bg["grid"] = int(rng.choice([6, 8, 12]))
        bg["amplitude"] = 18.0
    return bg


def _place(
    rng: np.random.Generator,
    specs: list[tuple[str, str, str]],
    relation: str | None = None,
) -> tuple[SceneObject, ...]:
    """Place objects without overlap (rejection sampling); optionally with ``relation`` between
    the first two. Large objects are shrunk to small if they cannot be placed."""
    specs = list(specs)
    for _shrink in range(len(specs) + 1):
        for _attempt in range(60):
            placed: list[SceneObject] = []
            for k, (colour, shape, size) in enumerate(specs):
                lo = MARGIN + SIZES[size] / 2
                hi = 1 - lo
                for _try in range(30):
                    x, y = rng.uniform(lo, hi, size=2)
                    if k == 1 and relation is not None:
                        # Propose along the relation's axis, near the first object on the other.
                        ax, ay = placed[0].centre
                        if relation in ("left of", "right of"):
                            y = float(np.clip(ay + rng.uniform(-0.1, 0.1), lo, hi))
                        else:
                            x = float(np.clip(ax + rng.uniform(-0.1, 0.1), lo, hi))
                    cand = SceneObject(shape, colour, size, (float(x), float(y)))
                    if all(_boxes_apart(cand, p) for p in placed):
                        placed.append(cand)
                        break
                else:
                    break
            if len(placed) == len(specs) and (
                relation is None or describe_relation(placed[0], placed[1]) == relation
            ):
                return tuple(placed)
        large = [k for k, s in enumerate(specs) if s[2] == "large"]
        if not large:
            break
        k = large[0]
        specs[k] = (specs[k][0], specs[k][1], "small")
    raise RuntimeError(f"could not place objects {specs} (relation {relation!r})")


class SceneWorld:
    """An effectively infinite, deterministic world of rendered scenes: ``world[i] -> Sample``.

    Args:
        resolution: side of the rendered image in pixels.
        seed: changes every scene; the same ``(seed, split, i)`` always gives the same scene.
        split: "train" (never uses ``HELDOUT_PAIRS``) or "heldout" (uses only them).
        length: the reported ``len`` (indices must be below it).
        scene_weights: sampling weights of the scene types (default ``SCENE_TYPES``).
        supersample: drawing is done this many times larger, then averaged down (anti-aliasing);
            default ``default_supersample(resolution)``.
    """

    source_name = "scenes"

    def __init__(
        self,
        resolution: int = 64,
        seed: int = 0,
        split: str = "train",
        length: int = 10**9,
        scene_weights: Mapping[str, float] | None = None,
        supersample: int | None = None,
    ) -> None:
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.split = validate_split(split)
        self.length = int(length)
        self.supersample = default_supersample(resolution) if supersample is None else int(supersample)
        weights = dict(SCENE_TYPES if scene_weights is None else scene_weights)
        unknown = set(weights) - set(SCENE_TYPES)
        if unknown:
            raise ValueError(f"unknown scene types {sorted(unknown)}; expected {tuple(SCENE_TYPES)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"scene weights must be non-negative and not all zero, got {weights}")
        self._types = [t for t, w in weights.items() if w > 0]
        p = np.array([weights[t] for t in self._types], dtype=np.float64)
        self._type_cdf = np.cumsum(p / p.sum())
        self.pairs = _SPLIT_PAIRS[self.split]

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.length):
            yield self[i]

    def __repr__(self) -> str:
        return f"SceneWorld(resolution={self.resolution}, seed={self.seed}, split={self.split!r})"

    # ---- structure

    def scene(self, index: int) -> Scene:
        """The structure of scene ``index`` (objects, background, type) without rendering it."""
        i = check_index(index, self.length)
        rng = item_rng(self.seed, i, _SPLIT_STREAM[self.split])
        k = int(np.searchsorted(self._type_cdf, rng.uniform(), side="right"))
        scene_type = self._types[min(k, len(self._types) - 1)]
        background = _sample_background(rng)
        relation = None
        if scene_type == "single_object":
            objects = _place(rng, [self._spec(rng)])
        elif scene_type == "two_objects":
            a = self._spec(rng)
            b = self._spec(rng, differ_shape=a[1])
            objects = _place(rng, [a, b])
        elif scene_type == "colour_attribution":
            a = self._spec(rng)
            b = self._spec(rng, differ_shape=a[1], differ_colour=a[0])
            objects = _place(rng, [a, b])
        elif scene_type == "position":
            a = self._spec(rng)
            b = self._spec(rng, differ_pair=(a[0], a[1]))
            rel = str(rng.choice(list(RELATIONS)))
            objects = _place(rng, [a, b], relation=rel)
            relation = (0, rel, 1)
        elif scene_type == "counting":
            n = int(rng.integers(2, 5))
            colour, shape, size = self._spec(rng)
            if n >= 3 and rng.uniform() < 0.6:
                size = "small"
            specs = [(colour, shape, size)] * n
            if n <= 3 and rng.uniform() < 0.4:
                specs.append(self._spec(rng, differ_shape=shape))
            objects = _place(rng, specs)
        else:  # pragma: no cover - guarded in __init__
            raise ValueError(scene_type)
        return Scene(scene_type, objects, background, relation)

    def _spec(
        self,
        rng: np.random.Generator,
        differ_shape: str | None = None,
        differ_colour: str | None = None,
        differ_pair: tuple[str, str] | None = None,
    ) -> tuple[str, str, str]:
        pool = [
            p
            for p in self.pairs
            if p[1] != differ_shape and p[0] != differ_colour and p != differ_pair
        ]
        colour, shape = pool[int(rng.integers(len(pool)))]
        size = "small" if rng.uniform() < 0.5 else "large"
        return colour, shape, size

    # ---- rendering and text

    def __getitem__(self, index: int) -> Sample:
        i = check_index(index, self.length)
        scene = self.scene(i)
        rng = item_rng(self.seed, i, _SPLIT_STREAM[self.split], 1)  # text randomness
        image = render_scene(scene.objects, scene.background, self.resolution, self.supersample)
        caption = _caption(scene, rng)
        qa_items = _questions(scene, rng, self.pairs)
        relations = []
        for a, oa in enumerate(scene.objects):
            for b, ob in enumerate(scene.objects):
                rel = describe_relation(oa, ob) if a != b else None
                if rel is not None:
                    relations.append({"subject": a, "relation": rel, "object": b})
        attributes = {
            "scene_type": scene.scene_type,
            "split": self.split,
            "index": i,
            "objects": [o.to_dict() for o in scene.objects],
            "background": scene.background,
            "relations": relations,
            "qa_categories": [c for c, _, _ in qa_items],
        }
        return Sample(
            image=image,
            caption=caption,
            source=self.source_name,
            label=scene.scene_type,
            attributes=attributes,
            qa=[(q, a) for _, q, a in qa_items],
        )


# ----------------------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _caption(scene: Scene, rng: np.random.Generator) -> str:
    objs = scene.objects
    bg = BACKGROUND_WORDS[scene.background.get("kind", "solid")]
    templates = CAPTION_TEMPLATES[scene.scene_type]
    template = _pick(rng, templates)
    fields: dict[str, str] = {"bg": bg}
    if scene.scene_type == "single_object":
        fields["a"] = _article(objs[0].phrase(with_size=rng.uniform() < 0.5))
    elif scene.scene_type in ("two_objects", "colour_attribution"):
        first, second = (objs[0], objs[1]) if rng.uniform() < 0.5 else (objs[1], objs[0])
        with_size = rng.uniform() < 0.3
        fields.update(
            a=_article(first.phrase(with_size)),
            b=_article(second.phrase(with_size)),
            colour_a=first.colour,
            shape_a=first.shape,
            colour_b=second.colour,
            shape_b=second.shape,
        )
    elif scene.scene_type == "position":
        assert scene.relation is not None
        ia, rel, ib = scene.relation
        if rng.uniform() < 0.5:  # say it the other way round
            ia, rel, ib = ib, RELATIONS[rel], ia
        fields.update(
            a=_article(objs[ia].phrase()),
            b=_article(objs[ib].phrase()),
            rel=_pick(rng, RELATION_PHRASES[rel]),
        )
    elif scene.scene_type == "counting":
        main = objs[0]
        n = sum(1 for o in objs if (o.colour, o.shape) == (main.colour, main.shape))
        count = f"{COUNT_WORDS[n]} {main.colour} {PLURALS[main.shape]}"
        extras = [o for o in objs if (o.colour, o.shape) != (main.colour, main.shape)]
        if extras:
            count += " and " + _article(extras[0].phrase())
        fields["count"] = count
    return template.format(**fields)


# ----------------------------------------------------------------------------- questions


def _reference(obj: SceneObject, objects: Sequence[SceneObject], rng: np.random.Generator) -> str | None:
    """A referring expression that picks out ``obj`` alone ("the circle", "the red circle")."""
    same_shape = sum(o.shape == obj.shape for o in objects)
    same_pair = sum((o.shape, o.colour) == (obj.shape, obj.colour) for o in objects)
    if same_pair > 1:
        return None
    if same_shape == 1 and rng.uniform() < 0.5:
        return f"the {obj.shape}"
    return f"the {obj.colour} {obj.shape}"


def question_candidates(
    objects: Sequence[SceneObject], rng: np.random.Generator, pairs: Sequence[tuple[str, str]]
) -> dict[str, list[tuple[str, str]]]:
    """Every question the scene world can ask about ``objects``, by category: ``{category: [(question,
    answer), ...]}``. Wording and the absent shape or pair asked about are drawn from ``rng``;
    existence negatives are drawn from ``pairs`` (the split's colour-shape pairs)."""
    objs = tuple(objects)
    cands: dict[str, list[tuple[str, str]]] = {k: [] for k in ("shape", "colour", "count", "position", "existence", "size")}
    q = QUESTION_TEMPLATES
    if len(objs) == 1:
        cands["shape"].append((_pick(rng, q["shape_only"]), objs[0].shape))
    for obj in objs:
        ref = _reference(obj, objs, rng)
        if ref is None:
            continue
        if sum(o.colour == obj.colour for o in objs) == 1:
            cands["shape"].append((_pick(rng, q["shape"]).format(x=f"the {obj.colour} object"), obj.shape))
        if sum(o.shape == obj.shape for o in objs) == 1:
            cands["colour"].append((_pick(rng, q["colour"]).format(x=f"the {obj.shape}"), obj.colour))
        cands["size"].append((_pick(rng, q["size"]).format(x=ref), obj.size))
    shapes_present = sorted({o.shape for o in objs})
    for shape in shapes_present:
        n = sum(o.shape == shape for o in objs)
        cands["count"].append((_pick(rng, q["count_shape"]).format(shapes=PLURALS[shape]), COUNT_WORDS[n]))
    absent = [s for s in SHAPES if s not in shapes_present]
    if absent and rng.uniform() < 0.3:
        shape = _pick(rng, absent)
        cands["count"].append((_pick(rng, q["count_shape"]).format(shapes=PLURALS[shape]), COUNT_WORDS[0]))
    colours_present = sorted({o.colour for o in objs})
    colour = _pick(rng, colours_present)
    cands["count"].append(
        (_pick(rng, q["count_colour"]).format(colour=colour), COUNT_WORDS[sum(o.colour == colour for o in objs)])
    )
    if len(objs) > 1:
        cands["count"].append((_pick(rng, q["count_all"]), COUNT_WORDS[len(objs)]))
    for a, oa in enumerate(objs):
        for b, ob in enumerate(objs):
            if a == b:
                continue
            rel = describe_relation(oa, ob)
            ra, rb = _reference(oa, objs, rng), _reference(ob, objs, rng)
            if rel is None or ra is None or rb is None:
                continue
            axis = "position_lr" if rel in ("left of", "right of") else "position_ab"
            answer = rel.split()[0]
            cands["position"].append((_pick(rng, q[axis]).format(x=ra, y=rb), answer))
            asked = rel if rng.uniform() < 0.5 else RELATIONS[rel]
            cands["position"].append(
                (q["position_yes_no"][0].format(x=ra, y=rb, rel=asked), "yes" if asked == rel else "no")
            )
    present_pairs = {(o.colour, o.shape) for o in objs}
    pos = sorted(present_pairs)[int(rng.integers(len(present_pairs)))]
    cands["existence"].append((_pick(rng, q["existence"]).format(a=_article(f"{pos[0]} {pos[1]}")), "yes"))
    negatives = [p for p in pairs if p not in present_pairs]
    if negatives:
        neg = negatives[int(rng.integers(len(negatives)))]
        cands["existence"].append((_pick(rng, q["existence"]).format(a=_article(f"{neg[0]} {neg[1]}")), "no"))
    return cands


def place_questions(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs about where single objects are in the image: the position questions'
    wording with ``IMAGE_MIDDLE`` as the reference ("Is the red star left or right of the middle of the
    image?" -> "left"), for every object a referring expression picks out and every axis on which
    :func:`image_side` gives it a side. They need one object found, not two compared, so they are a
    stepping stone to the relations. Kept apart from :func:`question_candidates`, whose draws (and so
    the questions every ``SceneWorld`` sample keeps) they leave unchanged."""
    objs = tuple(objects)
    out: list[tuple[str, str]] = []
    for obj in objs:
        ref = _reference(obj, objs, rng)
        if ref is None:
            continue
        horizontal, vertical = image_side(obj)
        if horizontal:
            out.append((_pick(rng, QUESTION_TEMPLATES["position_lr"]).format(x=ref, y=IMAGE_MIDDLE), horizontal))
        if vertical:
            out.append((_pick(rng, QUESTION_TEMPLATES["position_ab"]).format(x=ref, y=IMAGE_MIDDLE), vertical))
    return out


def is_place_question(question: str) -> bool:
    """Whether ``question`` asks for a side of the image's middle (:func:`place_questions`)."""
    return IMAGE_MIDDLE in question


def _questions(
    scene: Scene, rng: np.random.Generator, pool: Sequence[tuple[str, str]]
) -> list[tuple[str, str, str]]:
    """(category, question, answer) triples; up to ``QA_PER_SCENE``, every category first."""
    cands = question_candidates(scene.objects, rng, pool)
    chosen: list[tuple[str, str, str]] = []
    leftovers: list[tuple[str, str, str]] = []
    for category, items in cands.items():
        order = rng.permutation(len(items)) if items else []
        for rank, k in enumerate(order):
            (chosen if rank == 0 else leftovers).append((category, *items[int(k)]))
    if len(chosen) < QA_PER_SCENE and leftovers:
        extra = rng.permutation(len(leftovers))[: QA_PER_SCENE - len(chosen)]
        chosen.extend(leftovers[int(k)] for k in sorted(extra))
    return chosen[:QA_PER_SCENE]


# ----------------------------------------------------------------------------- vocabulary


def vocabulary() -> list[str]:
    """Every word that can appear in a scene caption, question or answer (lower case, sorted)."""
    texts: list[str] = []
    for group in (CAPTION_TEMPLATES, QUESTION_TEMPLATES, RELATION_PHRASES):
        for options in group.values():
            texts.extend(options)
    texts += list(SHAPES) + list(PLURALS.values()) + list(COLOURS) + list(SIZES)
    texts += list(COUNT_WORDS) + list(BACKGROUND_WORDS.values()) + list(ANSWER_WORDS)
    texts += ["a", "an", "the", "object", IMAGE_MIDDLE]
    words: set[str] = set()
    for text in texts:
        text = re.sub(r"\{[a-z_]+\}", " ", text.lower())
        words.update(w for w in re.findall(r"[a-z]+", text))
    return sorted(words)


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """A JSON-friendly description of a scene's structure."""
    data = asdict(scene)
    data["objects"] = [o.to_dict() for o in scene.objects]
    return data
