"""Offline image sources: clip art, Fashion-MNIST, photo crops and any folder of images.

Every source is indexable and deterministic (see ``evotok.data.base``). Finite sources report
their size with ``len`` but accept any non-negative index (it wraps around), so a mixture can
draw from them forever; the order of their items is a fixed shuffle chosen by ``seed``.
"""
from __future__ import annotations

import csv
import gzip
import json
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..images import ImageError, load_image_safely, resize_and_center_crop
from .base import Sample, check_index, in_heldout_split, item_rng, validate_split

__all__ = [
    "MissingDataError",
    "INSTALL_SCRIPT",
    "CLIPART_ROOT",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "PHOTO_DESCRIPTIONS",
    "ClipArtSource",
    "FashionMNISTSource",
    "PhotoCropSource",
    "ImageFolderSource",
    "clean_words",
]

INSTALL_SCRIPT = "scripts/install_system_deps.sh"
_SKIPPED: set[str] = set()
CLIPART_ROOT = "/usr/share/openclipart/png"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class MissingDataError(ValueError):
    """A data set that comes from a Debian package (or another install step) is not there."""

    def __init__(self, what: str, location: str | Path, package: str | None = None, hint: str = "") -> None:
        self.package = package
        self.location = str(location)
        if package:
            message = (
                f"{what} not found at {location}. It comes from the Debian package '{package}': "
                f"run `bash {INSTALL_SCRIPT}` (or `sudo apt-get install -y {package}`)."
            )
        else:
            message = f"{what} not found at {location}."
        super().__init__(message + (f" {hint}" if hint else ""))


class _IndexedSource:
    """Shared behaviour of finite sources: wrap-around indices and a seeded shuffle."""

    source_name = "source"

    def __init__(self, n: int, seed: int) -> None:
        self.seed = int(seed)
        self._n = int(n)
        self._order = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x5EED]).permutation(self._n)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self._n):
            yield self[i]

    def _position(self, index: int) -> tuple[int, int]:
        """(checked index, position in the underlying collection)."""
        negative = isinstance(index, (int, np.integer)) and index < 0
        i = check_index(index, self._n) if negative else check_index(index)
        return i, int(self._order[i % self._n])

    def __getitem__(self, index: int) -> Sample:  # pragma: no cover - overridden
        raise NotImplementedError


def _fit_resolution(img: Image.Image, resolution: int | None) -> Image.Image:
    return img if resolution is None else resize_and_center_crop(img, resolution)


def _pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


_CONSONANT_SOUNDING = ("uni", "usa", "use", "user", "uk", "euro", "one", "ufo", "u.s")


def _article(phrase: str) -> str:
    low = phrase.lower()
    vowel = low[:1] in "aeiou" and not low.startswith(_CONSONANT_SOUNDING)
    return ("an " if vowel else "a ") + phrase


# ----------------------------------------------------------------------------- clip art

# Name fragments of openclipart authors that file names carry after the subject
# ("acquila_architetto_franc_01"): not part of what the picture shows.
_AUTHOR_TOKENS = frozenset(
    """
    architetto architett architet archite archit archi arch arc ar francesco francesc frances
    franc fran fra fr france rollandin ro ganson benji park nicu buculei bucu buc jean victor
    vic balin bali jarno vasamaa vasama vasa juliane krug gerald geral gera ger gerhard gerhards
    jon jonathan phillips dan daniel linda kim peterm luiz lumen design desig sergio nicolas nic
    yves mo aj ge mimooh omic michael fudriot joel enrique matthew marcelo dave stefan meza
    jonadab susan mike frouke petri cedric bosdon montes costea pena martin anthony lieberman
    ashton christoph patricia celso alex mauro charles brill liekens jakob cheng olivier bogdan
    dietrich nurbldoff james olivo jo meijer mitchell steele boitel guillaume shandy fco mccolm
    gino anton tom van johnny kuehne rory mccann orlando karam lie oliv studio studi stu webb
    hung kra grond jasper
    """.split()
)
_SHORT_WORDS = frozenset("cd tv up no on in of ok pc uk us dj ox ax el".split())


def clean_words(text: str, drop: frozenset[str] = frozenset()) -> list[str]:
    """Split a file or folder name into words: no digits, extensions, separators or ``drop``."""
    stem = re.sub(r"\.(png|jpe?g|gif|bmp|webp|tiff?|svg)$", "", text, flags=re.IGNORECASE)
    stem = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)  # camelCase -> camel Case
    words = []
    for token in re.split(r"[\s_\-.,+()\[\]\d]+", stem.lower()):
        if not token or token in drop:
            continue
        if len(token) <= 2 and token not in _SHORT_WORDS:
            continue
        words.append(token)
    return words


@lru_cache(maxsize=8)
def _scan_clipart(root: str) -> tuple[tuple[str, str], ...]:
    """All distinct clip-art files under ``root``: (relative path of the real file, real path).

    The package links some images into several folders; each picture is kept once, under
    the folder that holds the real file.
    """
    base = Path(root)
    real_root = base.resolve()
    seen: dict[str, str] = {}
    for path in sorted(base.rglob("*.png")):
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            continue  # dangling link
        try:
            rel = real.relative_to(real_root).as_posix()
        except ValueError:
            rel = path.relative_to(base).as_posix()
        seen.setdefault(rel, str(real))
    return tuple(sorted(seen.items()))


class ClipArtSource(_IndexedSource):
    """The public-domain clip art of Debian's ``openclipart-png`` (22 category folders).

    Label: the top-level category ("signs and symbols"). Caption: the file name's words
    (author names dropped) with the category, e.g. "a clip art of an apple (food, fruit)".
    Transparent areas are composited onto white and every image is padded to a square.
    ``split`` holds out a fixed 10% of the pictures (by a hash of their path).
    """

    source_name = "clipart"
    package = "openclipart-png"
    CAPTION_TEMPLATES = (
        "a clip art of {thing} ({context})",
        "a clip art image of {thing}, {context}",
        "an illustration of {thing} ({context})",
        "a drawing of {thing}, from the {label} category",
        "{thing}, clip art ({context})",
    )
    FALLBACK_TEMPLATES = (
        "a clip art from the {label} category",
        "a clip art image ({context})",
    )

    def __init__(
        self,
        root: str | Path = CLIPART_ROOT,
        resolution: int | None = None,
        seed: int = 0,
        split: str = "train",
        max_side: int = 512,
    ) -> None:
        self.root = Path(root)
        self.resolution = resolution
        self.split = validate_split(split)
        self.max_side = max_side
        if not self.root.is_dir():
            raise MissingDataError("the clip-art folder", self.root, self.package)
        files = _scan_clipart(str(self.root))
        if not files:
            raise MissingDataError("clip-art PNG files", self.root, self.package)
        want_heldout = self.split == "heldout"
        self.files = [(rel, real) for rel, real in files if in_heldout_split(rel) == want_heldout]
        super().__init__(len(self.files), seed)

    @property
    def categories(self) -> list[str]:
        return sorted({self._describe(rel)[0] for rel, _ in self.files})

    @staticmethod
    def _describe(rel: str) -> tuple[str, list[str], list[str]]:
        """(label, sub-folder words, subject words) of a relative path."""
        parts = rel.split("/")
        label = " ".join(clean_words(parts[0])) if len(parts) > 1 else "clip art"
        sub = clean_words(parts[-2]) if len(parts) > 2 else []
        star = re.match(r"star_(\d+)pt", parts[-1])
        if star:  # shapes/stars/star_56pt27step.png: a star with 56 points
            return label, sub, ["star", "with", star.group(1), "points"]
        words = clean_words(parts[-1], drop=_AUTHOR_TOKENS)
        if "flags" in parts[:-1] and words:
            words = ["flag", "of"] + [w for w in words if w != "flag"]
        return label, sub, words

    def __getitem__(self, index: int) -> Sample:
        i, pos = self._position(index)
        for offset in range(len(self.files)):  # a few package files exceed the pixel guard: skip them
            rel, real = self.files[(pos + offset) % len(self.files)]
            try:
                image, note = load_image_safely(real, max_side=self.max_side)
                break
            except ImageError as exc:
                if rel not in _SKIPPED:
                    _SKIPPED.add(rel)
                    warnings.warn(f"skipping unreadable clip-art file {real}: {exc}", stacklevel=2)
        else:
            raise ImageError(f"none of the {len(self.files)} clip-art files under {self.root} could be read")
        image = _fit_resolution(_pad_to_square(image), self.resolution)
        label, sub, words = self._describe(rel)
        context = label if not sub or " ".join(sub) == label else f"{label}, {' '.join(sub)}"
        rng = item_rng(self.seed, i, 11)
        fields = {"label": label, "context": context}
        if words:
            fields["thing"] = _article(" ".join(words))
            template = self.CAPTION_TEMPLATES[int(rng.integers(len(self.CAPTION_TEMPLATES)))]
        else:
            template = self.FALLBACK_TEMPLATES[int(rng.integers(len(self.FALLBACK_TEMPLATES)))]
        return Sample(
            image=image,
            caption=template.format(**fields),
            source=self.source_name,
            label=label,
            attributes={"path": rel, "subject_words": words, "subfolder": " ".join(sub), "load_note": note},
        )


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "heldout": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian header, then a dense array."""
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype = dtypes.get(data[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if arr.size != count:
        raise ValueError(f"{path}: IDX header promises {count} values, file holds fewer")
    return arr.reshape(dims).astype(np.dtype(dtype).newbyteorder("="))


@lru_cache(maxsize=4)
def _load_fashion(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = _FASHION_FILES[split]
    found = []
    for name in (images_name, labels_name):
        for candidate in (Path(root) / (name + ".gz"), Path(root) / name):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            raise MissingDataError(
                f"the Fashion-MNIST file {name}(.gz)", root, FashionMNISTSource.package
            )
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} / {labels.shape} in {root}")
    return images, labels


class FashionMNISTSource(_IndexedSource):
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist``: 28×28 greyscale clothes, as RGB.

    ``split="train"`` is the 60,000-image training file, ``"heldout"`` the 10,000 test images.
    With ``resolution`` the image is upsampled (bicubic) to that size.
    """

    source_name = "fashion_mnist"
    package = "dataset-fashion-mnist"
    CAPTION_TEMPLATES = (
        "a photo of {a}",
        "a greyscale photo of {a}",
        "a small black and white picture of {a}",
        "{a}, a fashion product",
        "a product photo of {a}",
    )

    def __init__(
        self,
        root: str | Path = FASHION_MNIST_ROOT,
        split: str = "train",
        resolution: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.split = validate_split(split)
        self.resolution = resolution
        if not self.root.is_dir():
            raise MissingDataError("the Fashion-MNIST folder", self.root, self.package)
        self.images, self.labels = _load_fashion(str(self.root), self.split)
        super().__init__(len(self.labels), seed)

    def __getitem__(self, index: int) -> Sample:
        i, pos = self._position(index)
        grey = Image.fromarray(np.ascontiguousarray(self.images[pos], dtype=np.uint8))
        image = grey.convert("RGB")
        if self.resolution is not None and self.resolution != image.size[0]:
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        class_id = int(self.labels[pos])
        label = FASHION_MNIST_CLASSES[class_id]
        rng = item_rng(self.seed, i, 12)
        template = self.CAPTION_TEMPLATES[int(rng.integers(len(self.CAPTION_TEMPLATES)))]
        thing = "a pair of trousers" if label == "trouser" and rng.uniform() < 0.5 else _article(label)
        return Sample(
            image=image,
            caption=template.format(a=thing),
            source=self.source_name,
            label=label,
            attributes={"class_id": class_id, "file_index": pos},
        )


# ----------------------------------------------------------------------------- photos


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data as skdata  # imported lazily: scikit-image is slow to import

        out = getattr(skdata, name)()
        return out[0] if isinstance(out, tuple) else out  # stereo_motorcycle: (left, right, disp)

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook

        path = cbook.get_sample_data(name, asfileobj=False)
        return np.asarray(load_image_safely(path)[0])

    return load


# photo name -> what it shows (used in captions); the loaders are below
PHOTO_DESCRIPTIONS: dict[str, str] = {
    "astronaut": "an astronaut in a spacesuit in front of a flag",
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on a launch pad",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained tissue under a microscope",
    "retina": "the retina of a human eye",
    "stereo_motorcycle": "a motorcycle in a workshop",
    "china": "a chinese temple among trees",
    "flower": "a pink flower",
    "grace_hopper": "a portrait of a woman in a naval uniform",
}
_PHOTO_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "stereo_motorcycle": _skimage("stereo_motorcycle"),
    "china": _sklearn("china"),
    "flower": _sklearn("flower"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
}


@lru_cache(maxsize=1)
def _load_photos() -> tuple[tuple[tuple[str, Image.Image], ...], tuple[str, ...]]:
    """Every bundled photograph that loads offline, and the names of those that did not."""
    loaded, failed = [], []
    for name, loader in _PHOTO_LOADERS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = loader()
            image, _ = load_image_safely(np.asarray(arr), max_side=1024)
            loaded.append((name, image))
        except Exception:  # missing package, a file that needs a download, ...
            failed.append(name)
    return tuple(loaded), tuple(failed)


class PhotoCropSource:
    """Random square crops (and flips) of the colour photographs shipped inside pip packages.

    Uses scikit-image's, scikit-learn's and matplotlib's sample photographs, skipping any that
    do not load offline. ``crop_fraction`` bounds the crop side as a fraction of the photo's
    shorter side. ``split="heldout"`` draws a different stream of crops of the same photos.
    """

    source_name = "photos"
    CAPTION_TEMPLATES = (
        "a photo of {thing}",
        "a photograph of {thing}",
        "a cropped photo of {thing}",
        "a close-up photo of {thing}",
    )

    def __init__(
        self,
        seed: int = 0,
        crop_fraction: tuple[float, float] = (0.35, 1.0),
        resolution: int | None = None,
        split: str = "train",
        names: Sequence[str] | None = None,
        length: int = 10**9,
    ) -> None:
        lo, hi = crop_fraction
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_fraction must satisfy 0 < low <= high <= 1, got {crop_fraction}")
        self.seed = int(seed)
        self.crop_fraction = (float(lo), float(hi))
        self.resolution = resolution
        self.split = validate_split(split)
        self.length = int(length)
        photos, self.unavailable = _load_photos()
        if names is not None:
            unknown = set(names) - set(PHOTO_DESCRIPTIONS)
            if unknown:
                raise ValueError(f"unknown photo names {sorted(unknown)}; known: {sorted(PHOTO_DESCRIPTIONS)}")
            photos = tuple(p for p in photos if p[0] in set(names))
        if not photos:
            raise MissingDataError(
                "the sample photographs of scikit-image / scikit-learn / matplotlib",
                "the installed pip packages",
                hint="Install scikit-image, scikit-learn and matplotlib (see requirements.txt).",
            )
        self.photos = photos

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.photos]

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.length):
            yield self[i]

    def __getitem__(self, index: int) -> Sample:
        i = check_index(index, self.length)
        rng = item_rng(self.seed, i, 13, 0 if self.split == "train" else 1)
        name, photo = self.photos[int(rng.integers(len(self.photos)))]
        w, h = photo.size
        frac = rng.uniform(*self.crop_fraction)
        side = max(8, int(round(frac * min(w, h))))
        left = int(rng.integers(0, w - side + 1))
        top = int(rng.integers(0, h - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        flipped = bool(rng.uniform() < 0.5)
        if flipped:
            crop = ImageOps.mirror(crop)
        if self.resolution is not None:
            crop = crop.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        template = self.CAPTION_TEMPLATES[int(rng.integers(len(self.CAPTION_TEMPLATES)))]
        return Sample(
            image=crop,
            caption=template.format(thing=PHOTO_DESCRIPTIONS[name]),
            source=self.source_name,
            label=name,
            attributes={"photo": name, "crop_box": [left, top, left + side, top + side], "flipped": flipped},
        )


# ----------------------------------------------------------------------------- any folder


def _read_captions(path: Path) -> dict[str, str]:
    """Captions keyed by file name: JSONL ({"file", "caption"}) or CSV (file,caption)."""
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    captions: dict[str, str] = {}
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[str(row["file"])] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{n}: expected a JSON object with 'file' and 'caption' ({exc})"
                ) from None
    else:
        reader = csv.reader(text.splitlines())
        for n, row in enumerate(reader, 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{n}: expected 'file,caption', got {row!r}")
            if n == 1 and [c.strip().lower() for c in row[:2]] == ["file", "caption"]:
                continue  # header
            captions[row[0].strip()] = ",".join(row[1:]).strip()
    return captions


class ImageFolderSource(_IndexedSource):
    """Every image under ``root`` (recursively), with captions from an optional file.

    Captions file: JSONL lines ``{"file": "cats/tom.jpg", "caption": "..."}`` or CSV rows
    ``file,caption``; ``file`` is relative to ``root`` (a bare file name also matches).
    Images without a caption get one from their file name. Label: the parent folder's name
    (``None`` for images directly in ``root``). ``split=None`` uses every image; "train" or
    "heldout" keep a fixed 90% / 10% by a hash of the relative path. An unreadable image is
    skipped with a warning (the next image in order is returned instead).
    """

    source_name = "folder"

    def __init__(
        self,
        root: str | Path,
        captions_file: str | Path | None = None,
        resolution: int | None = None,
        seed: int = 0,
        split: str | None = None,
        max_side: int = 1024,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.resolution = resolution
        self.max_side = max_side
        self.split = None if split is None else validate_split(split)
        files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if self.split is not None:
            files = [f for f in files if in_heldout_split(f) == (self.split == "heldout")]
        if not files:
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}"
                + (f" in split {self.split!r}" if self.split else "")
            )
        self.files = files
        self.captions = _read_captions(Path(captions_file)) if captions_file is not None else {}
        self._warned: set[str] = set()
        super().__init__(len(files), seed)

    def caption_for(self, rel: str) -> str:
        if rel in self.captions:
            return self.captions[rel]
        name = rel.rsplit("/", 1)[-1]
        if name in self.captions:
            return self.captions[name]
        words = clean_words(name)
        return f"a picture of {' '.join(words)}" if words else "a picture"

    def __getitem__(self, index: int) -> Sample:
        i, pos = self._position(index)
        for step in range(self._n):
            rel = self.files[(pos + step) % self._n]
            try:
                image, note = load_image_safely(self.root / rel, max_side=self.max_side)
                break
            except ImageError as exc:
                if rel not in self._warned:
                    self._warned.add(rel)
                    warnings.warn(f"skipping unreadable image {self.root / rel}: {exc}", stacklevel=2)
        else:
            raise ImageError(f"none of the {self._n} images under {self.root} could be read")
        parts = rel.split("/")
        return Sample(
            image=_fit_resolution(image, self.resolution),
            caption=self.caption_for(rel),
            source=self.source_name,
            label=parts[-2] if len(parts) > 1 else None,
            attributes={"path": rel, "load_note": note},
        )
