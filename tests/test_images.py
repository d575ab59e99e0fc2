"""evotok.images: tensor conversions and load_image_safely on every kind of awkward input."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from evotok.images import (
    ImageError,
    load_image_safely,
    pil_to_tensor,
    resize_and_center_crop,
    tensor_to_pil,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)


def _close(pixel, colour, tol=12):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


# ----------------------------------------------------------------------------- tensors


def test_pil_to_tensor_shape_range_and_round_trip():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    t = pil_to_tensor(img)
    assert t.shape == (3, 24, 24) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0
    back = tensor_to_pil(t)
    assert back.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(back), arr)
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(t[None])), arr)


def test_pil_to_tensor_resizes_shorter_side_then_crops_centre():
    # 300×100: red | green | blue thirds. The centre square crop is the green third.
    img = Image.new("RGB", (300, 100), RED)
    img.paste(Image.new("RGB", (100, 100), GREEN), (100, 0))
    img.paste(Image.new("RGB", (100, 100), BLUE), (200, 0))
    t = pil_to_tensor(img, 32)
    assert t.shape == (3, 32, 32)
    centre = tensor_to_pil(t).getpixel((16, 16))
    assert _close(centre, GREEN)
    tall = resize_and_center_crop(Image.new("RGB", (40, 90)), 20)
    assert tall.size == (20, 20)


def test_pil_to_tensor_accepts_other_modes_and_rejects_bad_size():
    grey = Image.new("L", (10, 10), 200)
    t = pil_to_tensor(grey, 8)
    assert t.shape == (3, 8, 8)
    assert torch.allclose(t[0], t[1]) and torch.allclose(t[1], t[2])
    with pytest.raises(ValueError):
        pil_to_tensor(grey, 0)
    with pytest.raises(TypeError):
        pil_to_tensor(np.zeros((4, 4, 3)), 4)


def test_tensor_to_pil_clamps_and_rejects_batches():
    t = torch.full((3, 4, 4), 5.0)
    assert tensor_to_pil(t).getpixel((0, 0)) == (255, 255, 255)
    assert tensor_to_pil(-t).getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ValueError, match="batch"):
        tensor_to_pil(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(4, 4))


# ----------------------------------------------------------------------------- good but awkward inputs


def _save(img: Image.Image, path, fmt: str | None = None, **kw) -> str:
    img.save(path, fmt, **kw)
    return str(path)


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (20, 20), (255, 0, 0, 255)), (10, 10))
    out, note = load_image_safely(_save(img, tmp_path / "a.png"))
    assert out.mode == "RGB" and out.size == (40, 40)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((20, 20)) == RED
    assert "white" in note


def test_palette_images_with_and_without_transparency(tmp_path):
    base = Image.new("RGB", (32, 32), BLUE)
    base.paste(Image.new("RGB", (16, 32), RED), (0, 0))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    out, note = load_image_safely(_save(pal, tmp_path / "p.png"))
    assert out.mode == "RGB"
    assert _close(out.getpixel((2, 2)), RED) and _close(out.getpixel((30, 2)), BLUE)
    assert "palette" in note

    transparent_index = pal.getpixel((2, 2))
    out, note = load_image_safely(_save(pal, tmp_path / "pt.png", transparency=transparent_index))
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert _close(out.getpixel((30, 2)), BLUE)
    assert "white" in note


def test_greyscale_and_16_bit(tmp_path):
    grey = Image.new("L", (20, 20), 77)
    out, note = load_image_safely(_save(grey, tmp_path / "g.png"))
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (77, 77, 77)
    assert "greyscale" in note

    arr16 = np.zeros((20, 30), dtype=np.uint16)
    arr16[:, 15:] = 65535
    arr16[:10, :15] = 32896  # 128 * 257
    img16 = Image.fromarray(arr16)
    assert img16.mode.startswith("I")
    path = _save(img16, tmp_path / "g16.png")
    out, note = load_image_safely(path)
    assert out.size == (30, 20)
    assert out.getpixel((20, 5)) == (255, 255, 255)
    assert out.getpixel((5, 5)) == (128, 128, 128)
    assert out.getpixel((5, 15)) == (0, 0, 0)
    assert "16-bit" in note

    wide = Image.fromarray(np.array([[0, 100000], [50000, 25000]], dtype=np.int32))
    out, note = load_image_safely(wide, min_side=1)
    assert out.getpixel((1, 0)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)
    assert "32-bit" in note

    floats = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32))
    out, note = load_image_safely(floats, min_side=1)
    assert out.getpixel((1, 0)) == (255, 255, 255) and out.getpixel((0, 1))[0] in (127, 128)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    out, note = load_image_safely(_save(cmyk, tmp_path / "c.jpg", "JPEG", quality=95))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60
    assert "CMYK" in note


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(Image.new("RGB", (20, 20), RED), (0, 0))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90° clockwise
    path = _save(img, tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    out, note = load_image_safely(path)
    assert out.size == (20, 40)
    assert _close(out.getpixel((10, 5)), RED, tol=40)  # left side ends on top
    assert _close(out.getpixel((10, 35)), BLUE, tol=40)
    assert "EXIF" in note


def test_non_square_tiny_and_huge(tmp_path):
    out, note = load_image_safely(Image.new("RGB", (120, 45), GREEN))
    assert out.size == (120, 45) and note.endswith("loaded as is")

    out, note = load_image_safely(_save(Image.new("RGB", (3, 2), RED), tmp_path / "tiny.png"))
    assert min(out.size) >= 16 and out.getpixel((out.size[0] // 2, out.size[1] // 2)) == RED
    assert "upscaled" in note

    big = Image.new("RGB", (3000, 1000), BLUE)
    out, note = load_image_safely(_save(big, tmp_path / "big.png"), max_side=512)
    assert out.size == (512, 171)
    assert "downscaled" in note


def test_first_frame_of_animation(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out, note = load_image_safely(str(path))
    assert _close(out.getpixel((8, 8)), RED) and "3 frames" in note


def test_other_input_kinds(tmp_path):
    path = _save(Image.new("RGB", (20, 20), RED), tmp_path / "r.png")
    with open(path, "rb") as fh:
        data = fh.read()
    assert load_image_safely(data)[0].getpixel((1, 1)) == RED
    assert load_image_safely(io.BytesIO(data))[0].getpixel((1, 1)) == RED
    arr = np.zeros((20, 20, 3), dtype=np.float32)
    arr[..., 2] = 1.0
    assert load_image_safely(arr)[0].getpixel((1, 1)) == BLUE
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    assert load_image_safely(rgba)[0].getpixel((1, 1)) == (255, 255, 255)


# ----------------------------------------------------------------------------- bad inputs


def test_decompression_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 Mpx canvas in a ~20 kB file
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageError, match="bomb"):
        load_image_safely(str(bomb))
    with pytest.raises(ImageError, match="limit"):
        load_image_safely(_save(Image.new("RGB", (200, 200)), tmp_path / "s.png"), max_pixels=10_000)


def test_empty_missing_and_non_image_inputs(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (str(empty), b"", None, str(tmp_path / "missing.png"), str(tmp_path)):
        with pytest.raises(ImageError):
            load_image_safely(bad)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image at all\n" * 20)
    with pytest.raises(ImageError, match="not an image"):
        load_image_safely(str(text))
    with pytest.raises(ImageError):
        load_image_safely(np.zeros((0, 5, 3), dtype=np.uint8))
    assert issubclass(ImageError, ValueError)


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_files_are_refused(tmp_path, fmt, suffix):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt|open"):
        load_image_safely(str(path))
