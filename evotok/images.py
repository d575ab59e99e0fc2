"""Conversions between PIL images and EvoTok's image tensors, and safe loading of user images.

Images cross module boundaries as float32 tensors ``3 H W`` (or ``b 3 H W``) in ``[-1, 1]``.
``load_image_safely`` turns anything PIL can read (paths, bytes, file objects, PIL images,
numpy arrays) into a plain RGB ``PIL.Image`` and says in words what it had to do to get there.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageError",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "pil_to_tensor",
    "tensor_to_pil",
    "load_image_safely",
]

# An image whose header claims more pixels than this is refused before decoding: a small file
# can declare a gigantic canvas ("decompression bomb") and exhaust memory when decoded.
DEFAULT_MAX_PIXELS = 64_000_000
# Accepted images larger than this on their long side are downscaled right after loading.
DEFAULT_MAX_SIDE = 2048
# Images smaller than this on their short side are upscaled (bicubic) so later crops make sense.
DEFAULT_MIN_SIDE = 16

ImageInput = Union[str, os.PathLike, bytes, bytearray, IO[bytes], Image.Image, np.ndarray]


class ImageError(ValueError):
    """An input could not be turned into an image (empty, not an image, truncated, a bomb...)."""


def pil_to_tensor(img: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL image -> float32 tensor ``3 size size`` in ``[-1, 1]``.

    The shorter side is resized to ``size`` (bicubic) and the centre square is cropped.
    With ``size=None`` the image keeps its own size (and aspect ratio).
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"pil_to_tensor expects a PIL image, got {type(img).__name__}")
    if img.mode != "RGB":
        img = _to_rgb(img, [])
    if size is not None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        img = resize_and_center_crop(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0


def resize_and_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then crop the centre ``size × size``."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w = max(size, round(w * scale))
        new_h = max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left = (new_w - size) // 2
        top = (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Tensor ``3 H W`` (or ``1 3 H W``) in ``[-1, 1]`` -> RGB PIL image (values are clamped)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor_to_pil expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim == 4:
        if tensor.shape[0] != 1:
            raise ValueError(
                f"tensor_to_pil converts one image; got a batch of {tensor.shape[0]} "
                "(convert each with [tensor_to_pil(t) for t in batch])"
            )
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected a tensor shaped 3×H×W in [-1, 1], got {tuple(tensor.shape)}")
    t = tensor.detach().to("cpu", torch.float32)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    arr = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())


# --------------------------------------------------------------------------- safe loading


def load_image_safely(
    source: ImageInput,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    min_side: int = DEFAULT_MIN_SIDE,
) -> tuple[Image.Image, str]:
    """Load any image PIL reads and normalise it to RGB; return ``(image, note)``.

    Handles transparency (composited onto white), palette, greyscale, 16/32-bit integer and
    float images, CMYK and other colour spaces, EXIF orientation, animations (first frame),
    huge images (downscaled to ``max_side``) and tiny ones (upscaled to ``min_side``).
    Raises ``ImageError`` for empty input, files that are not images, truncated files and
    images declaring more than ``max_pixels`` pixels.
    """
    notes: list[str] = []
    if isinstance(source, Image.Image):
        img = source
        _check_size(img.size, max_pixels)
        try:
            img.load()
        except Exception as exc:  # a lazily opened image can still fail here
            raise ImageError(f"could not decode the image: {exc}") from exc
        desc = f"{img.size[0]}×{img.size[1]} {img.mode} image"
        img = _normalise(img, notes, max_side, min_side)
    elif isinstance(source, np.ndarray):
        img = _array_to_pil(source, notes)
        desc = f"{source.shape} {source.dtype} array"
        _check_size(img.size, max_pixels)
        img = _normalise(img, notes, max_side, min_side)
    else:
        data = _read_bytes(source)
        img, desc = _decode(data, max_pixels, notes, max_side, min_side)
    note = desc + (": " + "; ".join(notes) if notes else ": loaded as is")
    return img, note


def _read_bytes(source: ImageInput) -> bytes:
    if source is None:
        raise ImageError("no image given (got None)")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if str(source) == "":
            raise ImageError("no image given (empty path)")
        if not path.exists():
            raise ImageError(f"no such file: {path}")
        if path.is_dir():
            raise ImageError(f"expected an image file, got a directory: {path}")
        data = path.read_bytes()
    elif hasattr(source, "read"):
        data = source.read()
        if isinstance(data, str):
            raise ImageError("the file object is in text mode; open image files with 'rb'")
    else:
        raise ImageError(
            f"cannot load an image from {type(source).__name__}; pass a path, bytes, "
            "a binary file object, a PIL image or a numpy array"
        )
    if len(data) == 0:
        raise ImageError("the image input is empty (0 bytes)")
    return data


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"the image has no pixels ({w}×{h})")
    if w * h > max_pixels:
        raise ImageError(
            f"the image declares {w}×{h} = {w * h:,} pixels, more than the limit of "
            f"{max_pixels:,}; refusing to decode it (possible decompression bomb)"
        )


def _decode(
    data: bytes, max_pixels: int, notes: list[str], max_side: int, min_side: int
) -> tuple[Image.Image, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refusing to decode a possible decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"the input ({len(data):,} bytes) is not an image format PIL can read"
        ) from exc
    except Exception as exc:
        raise ImageError(f"could not open the image: {exc}") from exc
    _check_size(img.size, max_pixels)
    desc = f"{img.format or 'image'} {img.size[0]}×{img.size[1]} {img.mode}"
    n_frames = getattr(img, "n_frames", 1)
    if n_frames > 1:
        notes.append(f"used the first of {n_frames} frames")
    if img.format == "JPEG" and max(img.size) > 2 * max_side:
        # Let libjpeg decode at a reduced scale: much cheaper than decoding full size.
        scale = max_side / max(img.size)
        img.draft("RGB", (int(img.size[0] * scale) + 1, int(img.size[1] * scale) + 1))
    try:
        img.load()
    except Exception as exc:  # truncated data surfaces here as OSError
        raise ImageError(f"the image data is truncated or corrupt: {exc}") from exc
    return _normalise(img, notes, max_side, min_side), desc


def _normalise(img: Image.Image, notes: list[str], max_side: int, min_side: int) -> Image.Image:
    img = _apply_exif_orientation(img, notes)
    img = _to_rgb(img, notes)
    img = _fit_size(img, notes, max_side, min_side)
    return img


def _apply_exif_orientation(img: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return img
    if orientation in (None, 1):
        return img
    rotated = ImageOps.exif_transpose(img)
    if rotated is None:  # older Pillow with in_place semantics
        return img
    notes.append(f"rotated/flipped upright from EXIF orientation {orientation}")
    return rotated


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode == "P":
        has_alpha = "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"
        img = img.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette image expanded to RGB")
        mode = img.mode
        if mode == "RGB" and "transparency" not in img.info:
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(white, rgba).convert("RGB")
        if alpha.min() < 255:
            notes.append("transparent areas composited onto white")
        else:
            notes.append("fully opaque alpha channel dropped")
        return out
    if mode in ("1", "L"):
        notes.append("black-and-white image expanded to RGB" if mode == "1" else "greyscale expanded to RGB")
        return img.convert("RGB")
    if mode.startswith("I") or mode.startswith("F"):
        arr = np.asarray(img).astype(np.float64)
        grey = _high_depth_to_uint8(arr, mode, notes)
        return Image.fromarray(grey).convert("RGB")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
        return img.convert("RGB")
    # YCbCr, LAB, HSV, RGBX, ...: PIL knows how to get to RGB.
    try:
        out = img.convert("RGB")
    except Exception as exc:
        raise ImageError(f"cannot convert an image in mode {mode!r} to RGB: {exc}") from exc
    notes.append(f"{mode} converted to RGB")
    return out


def _high_depth_to_uint8(arr: np.ndarray, mode: str, notes: list[str]) -> np.ndarray:
    """Map 16/32-bit integer or float greyscale to 8 bits without clipping bright values."""
    finite = arr[np.isfinite(arr)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if mode.startswith("F"):
        if lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
            notes.append("float greyscale in [0, 1] scaled to 8 bits")
        else:
            scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
            notes.append(f"float greyscale rescaled from [{lo:g}, {hi:g}] to 8 bits")
    elif lo >= 0 and hi <= 255:
        scaled = arr
        notes.append("integer greyscale with 8-bit values stored as 8 bits")
    elif lo >= 0 and hi <= 65535:
        scaled = arr / 257.0
        notes.append("16-bit greyscale reduced to 8 bits")
    else:
        scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        notes.append(f"32-bit greyscale rescaled from [{lo:g}, {hi:g}] to 8 bits")
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _fit_size(img: Image.Image, notes: list[str], max_side: int, min_side: int) -> Image.Image:
    w, h = img.size
    if max(w, h) > max_side:
        scale = max_side / max(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(new, Image.Resampling.LANCZOS)
        notes.append(f"downscaled from {w}×{h} to {new[0]}×{new[1]}")
    elif min(w, h) < min_side:
        scale = min(min_side / min(w, h), max_side / max(w, h))
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        if new != (w, h):
            img = img.resize(new, Image.Resampling.BICUBIC)
            notes.append(f"tiny image upscaled from {w}×{h} to {new[0]}×{new[1]}")
    w, h = img.size
    if max(w, h) > 4 * min(w, h):
        notes.append(f"very elongated ({w}×{h}): a centre square crop keeps only part of it")
    return img


def _array_to_pil(arr: np.ndarray, notes: list[str]) -> Image.Image:
    if arr.size == 0:
        raise ImageError(f"the image array is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(f"expected an H×W, H×W×3 or H×W×4 array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float64))
        if a.min() >= 0.0 and a.max() <= 1.0:
            arr = np.round(a * 255.0).astype(np.uint8)
            notes.append("float array in [0, 1] scaled to 8 bits")
        else:
            arr = np.clip(np.round(a), 0, 255).astype(np.uint8)
            notes.append("float array clipped to [0, 255]")
    elif arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        if a.min() >= 0 and a.max() <= 255:
            arr = a.astype(np.uint8)
        elif a.min() >= 0 and a.max() <= 65535:
            arr = np.round(a / 257.0).astype(np.uint8)
            notes.append("16-bit array reduced to 8 bits")
        else:
            lo, hi = a.min(), a.max()
            arr = np.round((a - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
            notes.append("integer array rescaled to 8 bits")
    return Image.fromarray(np.ascontiguousarray(arr))  # mode inferred: L, RGB or RGBA
