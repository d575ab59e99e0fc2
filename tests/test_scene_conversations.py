"""Scene conversations drawn afresh from a record's objects (``resample_scene_questions``)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from evotok.data.scenes import (IMAGE_MIDDLE, SceneObject, SceneWorld, image_side, is_place_question, place_questions,
                                vocabulary)
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


def test_an_object_has_a_side_of_the_middle_only_when_its_box_clears_it():
    def sides(x: float, y: float, size: str = "small") -> tuple:
        return image_side(SceneObject("star", "red", size, (x, y)))

    assert sides(0.2, 0.8) == ("left", "below")
    assert sides(0.8, 0.2) == ("right", "above")
    assert sides(0.5, 0.5) == (None, None)  # across both midlines
    half = SceneObject("star", "red", "small", (0.0, 0.0)).extent / 2
    assert sides(0.5 - half - 0.02, 0.2)[0] is None  # clears the midline by less than the gap
    assert sides(0.5 - half - 0.04, 0.2)[0] == "left"


def test_place_questions_ask_where_each_nameable_object_is_in_the_positions_wording():
    objects = [SceneObject("cross", "purple", "large", (0.2, 0.75)),
               SceneObject("square", "orange", "small", (0.8, 0.5)),     # on the vertical midline: one question
               SceneObject("circle", "blue", "small", (0.2, 0.2)),
               SceneObject("circle", "blue", "small", (0.6, 0.2))]       # two blue circles: neither is nameable
    asked = place_questions(objects, np.random.default_rng(0))
    assert len(asked) == 3 and all(is_place_question(q) and q.endswith(f"{IMAGE_MIDDLE}?") for q, _ in asked)
    for question, answer in asked:
        name = re.search(r"Is the (\w+(?: \w+)?) (?:to the |above|left)", question)[1]
        obj = next(o for o in objects if name in (o.shape, f"{o.colour} {o.shape}"))
        assert answer in image_side(obj) and (answer in ("left", "right")) == ("left" in question)
    assert not is_place_question("Is the red star left or right of the blue square?")
    assert "middle" in vocabulary()


def test_place_questions_join_the_fresh_conversations_and_neither_tell_nor_are_told(text_tok):
    with pytest.raises(ValueError, match="resample_scene_questions"):
        ChatDataset({"scenes": scene_pool(2)}, {"scene_qa": 1.0}, text_tok, 64, 4, place_questions=True)
    pool = scene_pool(40)
    kwargs = dict(max_turns=12, describe_prob=0.0, resample_scene_questions=True)
    plain = ChatDataset({"scenes": pool}, {"scene_qa": 1.0}, text_tok, 64, 4, **kwargs)
    placed = ChatDataset({"scenes": pool}, {"scene_qa": 1.0}, text_tok, 64, 4, place_questions=True, **kwargs)
    count = 0
    for i, record in enumerate(pool.records):
        with_place = placed.fresh_scene_questions(record, np.random.default_rng(i))
        without = plain.fresh_scene_questions(record, np.random.default_rng(i))
        assert sorted(without) == sorted(q for q in with_place if not is_place_question(q[0]))  # same draws
        count += sum(is_place_question(q) for q, _ in with_place)
    assert count >= 20
    assert placed.texts_beyond_records() == [IMAGE_MIDDLE] and plain.texts_beyond_records() == []
    turns = [("Is the red star left or right of the blue square?", "left"),
             ("Is the red star left or right of the middle of the image?", "left"),   # kept though "left" was said
             ("Is the blue square left or right of the middle of the image?", "right"),
             ("Is the blue square left or right of the green circle?", "right")]      # "right" said only by a place turn
    assert without_told_answers(turns, independent=is_place_question) == turns
    assert without_told_answers(turns) == [turns[0], turns[2]]  # the plain rule would drop two of them
