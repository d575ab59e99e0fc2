"""The zero-shot probe: ranking through a teacher's text side, from images or from features."""
from __future__ import annotations

import pytest
import torch

from evotok.probe import DEFAULT_LABELS, LABEL_GROUPS, ProbeResult, fill_template, top_labels, zero_shot
from helpers import ColourTeacher


def solid(rgb: tuple[float, float, float], size: int = 8) -> torch.Tensor:
    return torch.tensor(rgb).view(3, 1, 1).expand(3, size, size)


def test_ranks_the_right_label_from_images_and_from_features():
    teacher = ColourTeacher()
    labels = ["red", "green", "blue"]
    images = torch.stack([solid(teacher.COLOURS[c]) for c in ("blue", "red", "green")])
    by_image = zero_shot(teacher, images, labels, template="a {} thing")
    assert isinstance(by_image, ProbeResult)
    assert by_image.ranking[:, 0].tolist() == [2, 0, 1]
    assert by_image.texts == ["a red thing", "a green thing", "a blue thing"]
    assert by_image.scores.shape == (3, 3)
    assert ((by_image.scores > 0) & (by_image.scores < 1)).all()
    # sigmoid of scale * cos + bias: a perfect match gets sigmoid(10 - 5)
    assert by_image.scores[1, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), rel=1e-5)

    by_features = zero_shot(teacher, teacher.image_features(images), labels, template="a {} thing")
    torch.testing.assert_close(by_features.logits, by_image.logits)


def test_images_are_resized_to_the_teacher_resolution():
    teacher = ColourTeacher()
    result = zero_shot(teacher, solid(teacher.COLOURS["green"], size=20)[None], ["red", "green", "blue"], "{}")
    assert result.ranking[0, 0].item() == 1


def test_top_labels_are_sorted_and_truncated():
    teacher = ColourTeacher()
    images = torch.stack([solid((1.0, 0.2, -1.0))])  # red, a bit of green, no blue
    result = zero_shot(teacher, images, ["blue", "green", "red"], template=None)
    best = top_labels(result, k=2)[0]
    assert [label for label, _ in best] == ["red", "green"]
    assert best[0][1] > best[1][1]
    assert len(result.top_labels(k=10)[0]) == 3


def test_bad_inputs_get_clear_errors():
    teacher = ColourTeacher()
    images = torch.stack([solid(teacher.COLOURS["red"])])
    with pytest.raises(ValueError, match="non-empty list"):
        zero_shot(teacher, images, [])
    with pytest.raises(ValueError, match="unique"):
        zero_shot(teacher, images, ["red", "red"])
    with pytest.raises(ValueError, match="b×4×3"):
        zero_shot(teacher, torch.zeros(1, 5, 3), ["red"])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        zero_shot(teacher, images * 255, ["red"])
    with pytest.raises(ValueError, match="template"):
        zero_shot(teacher, images, ["red"], template="no slot")
    with pytest.raises(ValueError, match="k must be"):
        top_labels(zero_shot(teacher, images, ["red"]), k=0)


def test_templates_and_default_labels():
    assert fill_template("a photo of {}", "ankle boot") == "a photo of an ankle boot"
    assert fill_template("a photo of {}", "trouser") == "a photo of a trouser"
    assert fill_template("a photo of {}", "2 circles") == "a photo of 2 circles"
    assert fill_template("{} on a table", "cup") == "cup on a table"
    assert len(DEFAULT_LABELS) == len(set(DEFAULT_LABELS))
    assert all(label in DEFAULT_LABELS for group in LABEL_GROUPS.values() for label in group)
