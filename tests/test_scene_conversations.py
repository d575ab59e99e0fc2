"""Scene conversations drawn afresh from a record's objects (``resample_scene_questions``)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from evotok.data.scenes import SceneWorld
from evotok.mllm import TextTokenizer
from evotok.mllm.chat import IGNORE
from evotok.mllm.data import (LEADING_CATEGORIES, ChatDataset, ImagePool, _record, attach_scene_objects,
                              without_told_answers)

BUNDLED_TEXT = Path(__file__).resolve().parents[1] / "assets" / "mllm" / "text_tokenizer"


def scene_pool(count: int, seed: int = 0, objects: bool = True) -> ImagePool:
    world = SceneWorld(32, seed, "train")
    records = [_record(world[i]) for i in range(count)]
    if not objects:
        for record in records:
            del record["objects"]
    return ImagePool("scenes", np.zeros((count, 8, 8, 4), np.int16), records, {"split": "train", "seed": seed})


def true_answer(question: str, objects: list[dict]) -> str | None:
    """What the objects say for shape, colour and existence questions (None: another kind)."""
    if m := re.search(r"shape (?:is|of) the (\w+) object", question):
        return next(o["shape"] for o in objects if o["colour"] == m[1])
    if m := re.search(r"colou?r is the (\w+)\?", question):
        return next(o["colour"] for o in objects if o["shape"] == m[1])
    if m := re.search(r"(?:Is there|contain) an? (\w+) (\w+)", question):
        return "yes" if any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
    return None


@pytest.fixture(scope="module")
def text_tok():
    return TextTokenizer.load(BUNDLED_TEXT)


def test_records_keep_their_objects_and_old_pools_get_them_from_the_world():
    world = SceneWorld(32, 0, "train")
    old = scene_pool(6, objects=False)
    attach_scene_objects(old, world)
    assert [r["objects"] for r in old.records] == [r["objects"] for r in scene_pool(6).records]
    assert [o["shape"] for o in old.records[2]["objects"]] == [o.shape for o in world.scene(2).objects]
    with pytest.raises(ValueError, match="does not match"):
        attach_scene_objects(scene_pool(6, objects=False), SceneWorld(32, 1, "train"))


def test_resampling_needs_the_objects(text_tok):
    with pytest.raises(ValueError, match="attach_scene_objects"):
        ChatDataset({"scenes": scene_pool(2, objects=False)}, {"scene_qa": 1.0}, text_tok, 64, 4,
                    resample_scene_questions=True)


def test_fresh_conversations_are_true_of_the_objects_and_never_give_an_answer_away(text_tok):
    pool = scene_pool(40)
    data = ChatDataset({"scenes": pool}, {"scene_qa": 1.0}, text_tok, 64, 4, max_turns=12, describe_prob=0.0,
                       resample_scene_questions=True)
    checked, turns = 0, 0
    for i in range(40):
        record = pool.records[i]
        conversation = data.conversation("scenes", record, np.random.default_rng(i))
        assert conversation == without_told_answers(conversation)
        turns += len(conversation)
        for question, answer in conversation:
            expected = true_answer(question, record["objects"])
            if expected is not None:
                assert answer == expected, (question, answer, record["objects"])
                checked += 1
    assert checked >= 40 and turns > 2 * 40
    item = data[0]
    assert item["image_codes"] is not None and sum(label != IGNORE for label in item["labels"]) > 1


def test_each_round_asks_shape_colour_and_position_first(text_tok):
    data = ChatDataset({"scenes": scene_pool(1)}, {"scene_qa": 1.0}, text_tok, 64, 4, resample_scene_questions=True)
    record = {"objects": [{"shape": "cross", "colour": "purple", "size": "large", "centre": [0.7, 0.2]},
                          {"shape": "square", "colour": "orange", "size": "large", "centre": [0.7, 0.7]}]}
    asked = data.fresh_scene_questions(record, np.random.default_rng(0))
    first_round = [q for q, _ in asked[:6]]
    kinds = ["shape" if "shape" in q else "colour" if re.search("colou?r is", q) else
             "position" if re.search("left|right|above|below", q) else "other" for q in first_round]
    assert set(kinds[:len(LEADING_CATEGORIES)]) == set(LEADING_CATEGORIES)
    assert "other" not in kinds[:3] and kinds[3:] == ["other"] * 3
    assert len(asked) > 6


def test_told_answers_are_dropped_but_offered_options_and_numbers_are_not_told():
    turns = [("Is there an orange square?", "yes"),
             ("What shape is the orange object?", "square"),    # the first question said "square"
             ("Is the cross small or large?", "large"),
             ("Is the square small or large?", "large"),        # said by the answer before
             ("How many crosses are there?", "one"),
             ("How many squares are there?", "one"),            # numbers and yes/no are never told
             ("What colour is the cross?", "purple")]
    assert without_told_answers(turns) == [turns[k] for k in (0, 2, 4, 5, 6)]
    options = [("Is the cross small or large?", "small"), ("What size is the square?", "large")]
    assert without_told_answers(options) == options  # "small or large?" offers both, tells neither
