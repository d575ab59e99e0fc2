"""evotok.mllm.near_miss: each near miss changes exactly one thing the prompt asks for."""
from __future__ import annotations

from evotok.data.scenes import COLOURS, SHAPES
from evotok.mllm.near_miss import near_misses


def _changed_words(a: str, b: str) -> list[tuple[str, str]]:
    return [(x, y) for x, y in zip(a.split(), b.split()) if x != y]


def test_one_object_prompts_change_one_colour_or_one_shape():
    misses = near_misses("a photo of a red star")
    assert len(misses) == (len(COLOURS) - 1) + (len(SHAPES) - 1) == len(set(misses))
    assert "a photo of a green star" in misses and "a photo of a red cross" in misses
    assert "a photo of an orange star" in misses  # the article follows the new word
    for miss in misses:
        (old, new), = _changed_words("a photo of a red star", miss.replace("an orange", "a orange"))
        assert (old in COLOURS and new in COLOURS) or (old in SHAPES and new in SHAPES)


def test_counts_move_by_one_and_shapes_keep_their_number():
    misses = near_misses("three green crosses")
    assert "two green crosses" in misses and "four green crosses" in misses
    assert "three green stars" in misses and "three green star" not in misses
    assert not any(m.startswith(("one ", "zero ")) for m in misses)
    assert "two green crosses" not in near_misses("two green cross")  # a count needs a plural after it


def test_relations_flip_in_the_same_wording_and_two_colours_swap():
    misses = near_misses("a red star to the left of a blue cross")
    assert "a red star to the right of a blue cross" in misses
    assert "a blue star to the left of a red cross" in misses
    assert "a white hexagon above an orange square" in near_misses("a white hexagon underneath an orange square")
    assert "a star that is green and a square that is red" in near_misses("a star that is red and a square that is green")


def test_a_prompt_without_scene_words_has_no_near_misses():
    assert near_misses("a cat on a mat") == []
    assert near_misses("") == []
    assert "a red circle" not in near_misses("a red circle")
