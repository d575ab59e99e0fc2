"""evotok.data: scenes say exactly what they draw, sources are deterministic, mixtures mix."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from evotok.data import (
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    TRAIN_PAIRS,
    ClipArtSource,
    FashionMNISTSource,
    ImageFolderSource,
    MissingDataError,
    MixtureDataset,
    PhotoCropSource,
    Sample,
    SceneObject,
    SceneWorld,
    build_mixture,
    build_sources,
    collate,
    describe_relation,
    render_scene,
    vocabulary,
)
from evotok.data.scenes import COUNT_WORDS, PLURALS, RELATION_PHRASES
from evotok.data.sources import CLIPART_ROOT, FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, PHOTO_DESCRIPTIONS

N_SCENES = 300
HAS_CLIPART = Path(CLIPART_ROOT).is_dir()
HAS_FASHION = Path(FASHION_MNIST_ROOT).is_dir()


@pytest.fixture(scope="module")
def train_samples() -> list[Sample]:
    world = SceneWorld(resolution=64, seed=0, split="train")
    return [world[i] for i in range(N_SCENES)]


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# ----------------------------------------------------------------------------- scenes: determinism


def test_scenes_are_deterministic_per_seed_and_index():
    a, b = SceneWorld(64, seed=3), SceneWorld(64, seed=3)
    for i in (0, 7, 123456):
        sa, sb = a[i], b[i]
        np.testing.assert_array_equal(_pixels(sa.image), _pixels(sb.image))
        assert sa.caption == sb.caption and sa.qa == sb.qa and sa.attributes == sb.attributes
    assert not np.array_equal(_pixels(a[0].image), _pixels(a[1].image))
    assert not np.array_equal(_pixels(a[0].image), _pixels(SceneWorld(64, seed=4)[0].image))
    assert a[np.int64(5)].caption == a[5].caption
    with pytest.raises(IndexError):
        a[len(a)]
    with pytest.raises(TypeError):
        a[1.5]


def test_scene_images_have_requested_size_and_mode(train_samples):
    for s in train_samples[:20]:
        assert s.image.mode == "RGB" and s.image.size == (64, 64)
        assert s.source == "scenes" and isinstance(s.caption, str) and s.caption
        assert all(isinstance(q, str) and isinstance(a, str) for q, a in s.qa)
        assert len(s.attributes["qa_categories"]) == len(s.qa)
    assert SceneWorld(32, seed=0)[0].image.size == (32, 32)


# ----------------------------------------------------------------------------- scenes: truthfulness


def test_render_scene_draws_each_object_in_its_colour():
    background = {"kind": "solid", "colours": [[128, 128, 128]]}
    xs = [0.2, 0.5, 0.8]
    for colour_offset in range(2):
        objects = [
            SceneObject(shape, list(COLOURS)[(k + 3 * colour_offset) % len(COLOURS)], "small",
                        (xs[k % 3], 0.25 if k < 3 else 0.75))
            for k, shape in enumerate(SHAPES)
        ]
        img = render_scene(objects, background, resolution=64)
        for obj in objects:
            x, y = (int(v * 64) for v in obj.centre)
            assert tuple(img.getpixel((x, y))) == COLOURS[obj.colour], obj
        # far from every object the background is untouched
        assert img.getpixel((0, 32)) == (128, 128, 128)


def test_attributes_describe_the_pixels(train_samples):
    for s in train_samples:
        attrs = s.attributes
        again = render_scene(attrs["objects"], attrs["background"], resolution=64)
        np.testing.assert_array_equal(_pixels(again), _pixels(s.image))
        for obj in attrs["objects"]:
            x, y = (min(63, int(v * 64)) for v in obj["centre"])
            got = s.image.getpixel((x, y))
            assert all(abs(g - c) <= 2 for g, c in zip(got, COLOURS[obj["colour"]])), (s.caption, obj)
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_objects_never_overlap(train_samples):
    for s in train_samples:
        objs = [SceneObject.from_any(o) for o in s.attributes["objects"]]
        assert 1 <= len(objs) <= 4
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                ax0, ay0, ax1, ay1 = a.box
                bx0, by0, bx1, by1 = b.box
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, s.caption


def _count_in_caption(caption: str) -> tuple[int, str, str]:
    m = re.search(rf"\b({'|'.join(COUNT_WORDS)}) ({'|'.join(COLOURS)}) ({'|'.join(PLURALS.values())})\b", caption)
    assert m, caption
    shape = next(s for s, p in PLURALS.items() if p == m.group(3))
    return COUNT_WORDS.index(m.group(1)), m.group(2), shape


def test_captions_match_objects(train_samples):
    seen_types = set()
    for s in train_samples:
        t = s.attributes["scene_type"]
        seen_types.add(t)
        objs = s.attributes["objects"]
        if t == "counting":
            n, colour, shape = _count_in_caption(s.caption)
            assert n == sum((o["colour"], o["shape"]) == (colour, shape) for o in objs) >= 2
        elif t in ("single_object", "two_objects", "colour_attribution"):
            assert len(objs) == (1 if t == "single_object" else 2)
            for o in objs:
                assert o["colour"] in s.caption and o["shape"] in s.caption
            if t == "colour_attribution":
                assert objs[0]["colour"] != objs[1]["colour"] and objs[0]["shape"] != objs[1]["shape"]
        elif t == "position":
            phrases = sorted({p for ps in RELATION_PHRASES.values() for p in ps}, key=len, reverse=True)
            alt = "|".join(re.escape(p) for p in phrases)
            m = re.search(rf"(\w+) (\w+) ({alt}) an? (\w+) (\w+)$", s.caption)
            assert m, s.caption
            rel = next(r for r, ps in RELATION_PHRASES.items() if m.group(3) in ps)
            find = lambda c, sh: next(SceneObject.from_any(o) for o in objs if (o["colour"], o["shape"]) == (c, sh))
            a, b = find(m.group(1), m.group(2)), find(m.group(4), m.group(5))
            assert describe_relation(a, b) == rel
            dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
            expected = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[rel]
            assert expected, (s.caption, a, b)
    assert seen_types == {"single_object", "two_objects", "counting", "position", "colour_attribution"}


def test_answers_are_true(train_samples):
    checked = {"count": 0, "existence": 0, "colour": 0, "position": 0, "shape": 0}
    for s in train_samples:
        objs = [SceneObject.from_any(o) for o in s.attributes["objects"]]
        pairs = {(o.colour, o.shape) for o in objs}
        for (q, a), cat in zip(s.qa, s.attributes["qa_categories"]):
            if m := re.match(rf"How many ({'|'.join(PLURALS.values())}) are", q):
                shape = next(sh for sh, p in PLURALS.items() if p == m.group(1))
                assert a == COUNT_WORDS[sum(o.shape == shape for o in objs)], (q, a)
                checked["count"] += 1
            elif m := re.match(r"How many (\w+) objects", q):
                assert a == COUNT_WORDS[sum(o.colour == m.group(1) for o in objs)], (q, a)
            elif re.match(r"How many (objects|shapes) ", q):
                assert a == COUNT_WORDS[len(objs)], (q, a)
            elif m := re.match(r"(?:Is there|Does the image contain) an? (\w+) (\w+)", q):
                assert a == ("yes" if (m.group(1), m.group(2)) in pairs else "no"), (q, a)
                checked["existence"] += 1
            elif m := re.match(r"(?:What|Which) colou?r is the (\w+)\?", q):
                assert [o.colour for o in objs if o.shape == m.group(1)] == [a]
                checked["colour"] += 1
            elif m := re.match(r"Is the (\w+) (\w+) (?:to the )?left or (?:to the )?right of the (\w+) (\w+)\?", q):
                a_obj = next(o for o in objs if (o.colour, o.shape) == m.group(1, 2))
                b_obj = next(o for o in objs if (o.colour, o.shape) == m.group(3, 4))
                assert a == ("left" if a_obj.centre[0] < b_obj.centre[0] else "right")
                checked["position"] += 1
            elif cat == "shape":
                assert a in {o.shape for o in objs}
                checked["shape"] += 1
    assert all(v > 0 for v in checked.values()), checked


def test_vocabulary_covers_all_text(train_samples):
    vocab = set(vocabulary())
    assert set(SHAPES) | set(COLOURS) | set(SIZES) <= vocab
    for s in train_samples:
        words = re.findall(r"[a-z]+", (s.caption + " " + " ".join(q + " " + a for q, a in s.qa)).lower())
        assert set(words) <= vocab, set(words) - vocab


# ----------------------------------------------------------------------------- scenes: held-out pairs


def test_heldout_pairs_leave_every_word_in_training():
    all_pairs = len(COLOURS) * len(SHAPES)
    assert 0.1 <= len(HELDOUT_PAIRS) / all_pairs <= 0.2
    assert {c for c, _ in TRAIN_PAIRS} == set(COLOURS)
    assert {s for _, s in TRAIN_PAIRS} == set(SHAPES)
    assert not HELDOUT_PAIRS & set(TRAIN_PAIRS)


def test_train_never_shows_heldout_pairs_and_heldout_only_does(train_samples):
    world = SceneWorld(64, seed=0, split="train")
    extra = [world.scene(i) for i in range(N_SCENES, 500)]
    train_pairs = [(o["colour"], o["shape"]) for s in train_samples for o in s.attributes["objects"]]
    train_pairs += [(o.colour, o.shape) for sc in extra for o in sc.objects]
    assert not set(train_pairs) & HELDOUT_PAIRS
    heldout = SceneWorld(64, seed=0, split="heldout")
    for i in range(100):
        s = heldout[i]
        assert all((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in s.attributes["objects"])
    with pytest.raises(ValueError):
        SceneWorld(64, split="test")


# ----------------------------------------------------------------------------- Debian sources


@pytest.mark.skipif(not HAS_CLIPART, reason="Debian package openclipart-png not installed")
def test_clipart_source():
    train, held = ClipArtSource(seed=0), ClipArtSource(seed=0, split="heldout")
    assert len(train) > 0 and len(held) > 0
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
    assert not {r for r, _ in train.files} & {r for r, _ in held.files}
    cats = set(train.categories)
    assert "signs and symbols" in cats and "animals" in cats
    for i in range(12):
        s = train[i]
        assert s.image.mode == "RGB" and s.image.size[0] == s.image.size[1]
        assert s.source == "clipart" and s.label in cats and s.caption
        assert "_" not in s.caption and not re.search(r"\.png", s.caption)
    assert train[3].attributes["path"] == ClipArtSource(seed=0)[3].attributes["path"]
    assert train[3 + len(train)].attributes["path"] == train[3].attributes["path"]
    other = ClipArtSource(seed=1)
    assert [other[i].attributes["path"] for i in range(5)] != [train[i].attributes["path"] for i in range(5)]
    assert ClipArtSource(resolution=48)[0].image.size == (48, 48)


@pytest.mark.skipif(not HAS_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_source():
    train, held = FashionMNISTSource(split="train"), FashionMNISTSource(split="heldout")
    assert len(train) == 60000 and len(held) == 10000
    labels = set()
    for i in range(40):
        s = train[i]
        assert s.image.mode == "RGB" and s.image.size == (28, 28)
        assert s.label in FASHION_MNIST_CLASSES and s.source == "fashion_mnist"
        assert s.label.split()[-1] in s.caption or s.label == "trouser"
        labels.add(s.label)
    assert len(labels) >= 5
    big = FashionMNISTSource(split="heldout", resolution=64)[0]
    assert big.image.size == (64, 64)
    assert train[5].caption == FashionMNISTSource()[5].caption


def test_missing_debian_packages_raise_named_error(tmp_path):
    with pytest.raises(MissingDataError, match="openclipart-png") as err:
        ClipArtSource(root=tmp_path / "nope")
    assert "install_system_deps.sh" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingDataError, match="openclipart-png"):
        ClipArtSource(root=empty)
    with pytest.raises(MissingDataError, match="dataset-fashion-mnist") as err:
        FashionMNISTSource(root=empty)
    assert "install_system_deps.sh" in str(err.value)
    assert isinstance(err.value, ValueError)


# ----------------------------------------------------------------------------- photos and folders


def test_photo_crops_are_deterministic_squares():
    photos = PhotoCropSource(seed=0, crop_fraction=(0.4, 0.8))
    assert len(photos.names) >= 8
    s = photos[11]
    again = PhotoCropSource(seed=0, crop_fraction=(0.4, 0.8))[11]
    np.testing.assert_array_equal(_pixels(s.image), _pixels(again.image))
    for i in range(10):
        s = photos[i]
        assert s.image.mode == "RGB" and s.image.size[0] == s.image.size[1] >= 8
        assert s.label in PHOTO_DESCRIPTIONS and PHOTO_DESCRIPTIONS[s.label] in s.caption
    assert PhotoCropSource(resolution=40)[0].image.size == (40, 40)
    with pytest.raises(ValueError):
        PhotoCropSource(crop_fraction=(0.0, 0.5))


def _make_folder(root: Path) -> None:
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.new("RGB", (30, 20), (200, 100, 50)).save(root / "cats" / "tabby_cat_01.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(root / "dogs" / "happy-dog.png")
    Image.new("L", (25, 25), 90).save(root / "lone_wolf.jpg")
    (root / "readme.txt").write_text("not an image")


def test_image_folder_source_with_captions(tmp_path):
    _make_folder(tmp_path)
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"file": "cats/tabby_cat_01.png", "caption": "my cat Tom"}) + "\n")
    src = ImageFolderSource(tmp_path, captions_file=captions)
    assert len(src) == 3
    by_path = {src[i].attributes["path"]: src[i] for i in range(len(src))}
    assert set(by_path) == {"cats/tabby_cat_01.png", "dogs/happy-dog.png", "lone_wolf.jpg"}
    assert by_path["cats/tabby_cat_01.png"].caption == "my cat Tom"
    assert by_path["cats/tabby_cat_01.png"].label == "cats"
    assert by_path["dogs/happy-dog.png"].caption == "a picture of happy dog"
    assert by_path["dogs/happy-dog.png"].image.getpixel((5, 5)) == (255, 255, 255)
    assert by_path["lone_wolf.jpg"].label is None
    assert all(s.image.mode == "RGB" for s in by_path.values())

    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("file,caption\nhappy-dog.png,\"a dog, very happy\"\n")
    src = ImageFolderSource(tmp_path, captions_file=csv_file)
    assert src.caption_for("dogs/happy-dog.png") == "a dog, very happy"


def test_image_folder_skips_broken_files_and_rejects_empty_folders(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = ImageFolderSource(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = {src[i].attributes["path"] for i in range(len(src))}
    assert "cats/broken.png" not in paths and any("broken.png" in str(w.message) for w in caught)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSource(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        ImageFolderSource(tmp_path / "absent")


# ----------------------------------------------------------------------------- mixture


class _ConstSource:
    """A tiny in-memory source: item i is a flat image whose grey level encodes i."""

    def __init__(self, name: str, n: int = 50):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return Sample(Image.new("RGB", (20, 10), (i % 256,) * 3), f"{self.name} {i}", self.name, label=None)


def test_mixture_respects_weights_and_is_deterministic():
    sources = {"a": _ConstSource("a"), "b": _ConstSource("b"), "c": _ConstSource("c")}
    mix = MixtureDataset(sources, {"a": 0.7, "b": 0.3, "c": 0.0}, resolution=16, seed=1)
    names = [mix.locate(i)[0] for i in range(4000)]
    frac_a = names.count("a") / len(names)
    assert abs(frac_a - 0.7) < 0.04 and "c" not in names
    item = mix[17]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["label"] == "" and item["source"] in ("a", "b")
    again = MixtureDataset(sources, {"a": 0.7, "b": 0.3}, resolution=16, seed=1)
    assert [again.locate(i) for i in range(50)] == [mix.locate(i) for i in range(50)]
    other = MixtureDataset(sources, {"a": 0.7, "b": 0.3}, resolution=16, seed=2)
    assert [other.locate(i) for i in range(50)] != [mix.locate(i) for i in range(50)]
    for bad in ({"a": -1.0}, {"zzz": 1.0}, {"a": 0.0}):
        with pytest.raises(ValueError):
            MixtureDataset(sources, bad, resolution=16)


def test_build_mixture_from_config_and_dataloader():
    cfg = {"resolution": 32, "seed": 0, "split": "train", "weights": {"scenes": 0.6, "photos": 0.4}}
    mix = build_mixture(cfg)
    again = build_mixture(dict(cfg))
    for i in range(6):
        a, b = mix[i], again[i]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    batch = next(iter(DataLoader(mix, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])
    with pytest.raises(ValueError, match="unknown mixture config"):
        build_mixture({"resolutoin": 64})
    with pytest.raises(ValueError, match="unknown source"):
        build_sources(["imagenet"])


def test_build_mixture_can_skip_missing_packages(tmp_path):
    cfg = {
        "resolution": 16,
        "weights": {"scenes": 1.0, "clipart": 1.0},
        "roots": {"clipart": str(tmp_path / "none")},
    }
    with pytest.raises(MissingDataError):
        build_mixture(cfg)
    with pytest.warns(UserWarning, match="clipart"):
        mix = build_mixture({**cfg, "skip_missing": True})
    assert mix.names == ["scenes"]


def test_folder_source_in_mixture(tmp_path):
    _make_folder(tmp_path)
    mix = build_mixture({"resolution": 16, "weights": {"folder": 1.0}, "folder": {"root": str(tmp_path)}})
    item = mix[0]
    assert item["source"] == "folder" and item["image"].shape == (3, 16, 16)
