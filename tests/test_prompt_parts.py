"""One-attribute prompts (evotok.mllm.prompt_parts) and the captions that train them."""
from __future__ import annotations

import re

import numpy as np
import pytest

from evotok.data.scenes import COLOURS, PLURALS, SHAPES, SceneWorld
from evotok.mllm.data import ChatDataset, ImagePool, corpus_texts
from evotok.mllm.prompt_parts import attribute_parts, colours_only, shapes_only
from evotok.mllm.text_tokenizer import TextTokenizer
from evotok.oracle import GENEVAL_CATEGORIES, geneval_prompts

SHAPE_WORDS = re.compile(r"\b(" + "|".join([*SHAPES, *PLURALS.values()]) + r")\b")
COLOUR_WORDS = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


@pytest.mark.parametrize("prompt, shapes, colours", [
    ("a red star", "a star", "a red object"),
    ("an orange hexagon and a yellow circle on a striped background",
     "a hexagon and a circle on a striped background", "an orange object and a yellow object on a striped background"),
    ("an image with four white hexagons", "an image with four hexagons", "an image with four white objects"),
    ("three red stars and a blue cross", "three stars and a cross", "three red objects and a blue object"),
    ("a small black circle above a large green square", "a small circle above a large square",
     "a small black object above a large green object"),
    ("a triangle that is purple and a square that is green", "a triangle and a square",
     "a purple object and a green object"),
])
def test_parts_keep_everything_but_the_left_out_attribute(prompt, shapes, colours):
    assert shapes_only(prompt) == shapes
    assert colours_only(prompt) == colours
    assert attribute_parts(prompt) == (shapes, colours)


def test_every_geneval_and_caption_phrasing_splits_cleanly():
    prompts = [s.prompt for s in geneval_prompts(20)] + [SceneWorld(64, seed=5)[i].caption for i in range(200)]
    for prompt in prompts:
        shapes, colours = attribute_parts(prompt)
        assert not COLOUR_WORDS.search(shapes), (prompt, shapes)
        assert not SHAPE_WORDS.search(colours), (prompt, colours)
        assert SHAPE_WORDS.findall(shapes) == SHAPE_WORDS.findall(prompt.replace(" that is ", " "))
        assert sorted(COLOUR_WORDS.findall(colours)) == sorted(COLOUR_WORDS.findall(prompt))
        for part in (shapes, colours):
            assert not re.search(r"\ban [^aeiou]|\ba [aeiou]", part), part  # articles follow the new words
    assert {s.category for s in geneval_prompts(20)} == set(GENEVAL_CATEGORIES)


def test_prompts_without_a_coloured_shape_are_left_alone():
    for prompt in ("a cat", "a photo of a dress", "", "red", "two stars"):
        assert attribute_parts(prompt) is None
        assert shapes_only(prompt) == prompt and colours_only(prompt) == prompt


def _prompt_of(item: dict, tok: TextTokenizer) -> str:
    """The prompt of a text-to-image item: the tokens between the user token and the first end token."""
    ids = item["input_ids"]
    return tok.decode(ids[1:ids.index(tok.ids["end"])]).strip()


def test_attribute_dropout_rewrites_that_share_of_scene_drawing_captions():
    caption = "a red star and a blue cross"
    pool = ImagePool("scenes", np.zeros((1, 4, 4, 4), np.int16), [{"caption": caption, "label": None, "qa": []}], {})
    tok = TextTokenizer.train(corpus_texts({"scenes": pool}) + ["a red object", "a star"], vocab_size=300,
                              min_frequency=1)
    n = 2000
    ds = ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, tok, num_cells=16, pixel_depth=2, cfg_dropout=0.1,
                     attribute_dropout=0.4)
    prompts = [_prompt_of(ds[i], tok) for i in range(n)]
    assert set(prompts) == {"", caption, shapes_only(caption), colours_only(caption)}
    assert abs(prompts.count("") / n - 0.1) < 0.03
    for part in (shapes_only(caption), colours_only(caption)):  # 0.9 × 0.4 / 2 each
        assert abs(prompts.count(part) / n - 0.18) < 0.035
    plain = ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, tok, num_cells=16, pixel_depth=2)
    assert {_prompt_of(plain[i], tok) for i in range(300)} == {"", caption}
    with pytest.raises(ValueError, match="attribute_dropout"):
        ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, tok, num_cells=16, pixel_depth=2, attribute_dropout=1.5)
