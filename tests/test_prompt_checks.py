"""evotok.mllm.prompt_checks: the questions a prompt settles, worded as the model was trained to
answer, and only those whose answer the prompt fixes."""
from __future__ import annotations

import numpy as np

from evotok.data.scenes import SceneObject, TRAIN_PAIRS, question_candidates
from evotok.mllm.prompt_checks import Mention, mentions, prompt_checks
from evotok.oracle import GENEVAL_CATEGORIES, geneval_prompts


def test_mentions_read_colour_count_and_the_colour_last_phrasing():
    assert [(m.colour, m.shape, m.count) for m in mentions("Three small RED stars and a cross that is blue")] == [
        ("red", "star", 3), ("blue", "cross", 1)]
    assert [(m.colour, m.count) for m in mentions("some crosses")] == [(None, None)]  # a plural with no count
    assert mentions("a cat on a mat") == []
    assert isinstance(mentions("a red star")[0], Mention)


def test_one_coloured_shape_is_asked_for_and_its_colour_asked():
    assert prompt_checks("a photo of an orange hexagon") == [
        ("Is there an orange hexagon?", "yes"), ("What colour is the hexagon?", "orange")]
    assert prompt_checks("a hexagon that is orange") == prompt_checks("an orange hexagon")


def test_counts_are_asked_by_shape_and_by_colour():
    assert prompt_checks("an image with four yellow circles on a striped background") == [
        ("How many circles are there?", "four"), ("How many yellow objects are there?", "four")]


def test_relations_ask_the_first_objects_side_on_the_relations_axis():
    checks = prompt_checks("a purple triangle on the right of a yellow circle")
    assert checks[-1] == ("Is the purple triangle left or right of the yellow circle?", "right")
    assert prompt_checks("a red star underneath a blue cross")[-1] == (
        "Is the red star above or below the blue cross?", "below")
    assert ("Is there a yellow circle?", "yes") in checks


def test_questions_the_prompt_leaves_open_are_not_asked():
    # two stars: "What colour is the star?" has no single answer; neither does "How many stars?"
    checks = prompt_checks("a red star left of a blue star")
    assert not any(q.startswith("What colour") for q, _ in checks)
    assert checks[-1] == ("Is the red star left or right of the blue star?", "left")
    assert prompt_checks("some crosses") == [] and prompt_checks("a cat on a mat") == []
    assert prompt_checks("a star") == []  # no colour: nothing the scene world's questions can check


def test_every_geneval_prompt_has_checks_and_its_true_scene_answers_them():
    """Each check is one the scene world itself asks with that answer about a scene true to the prompt."""
    specs = geneval_prompts(10, seed=4, pairs=TRAIN_PAIRS)
    assert {s.category for s in specs} == set(GENEVAL_CATEGORIES)
    for spec in specs:
        checks = prompt_checks(spec.prompt)
        assert checks, spec.prompt
        objects = _true_scene(spec)
        asked = {}
        for seed in range(200):  # the scene world draws its wordings: collect them over many draws
            for pairs in question_candidates(objects, np.random.default_rng(seed), TRAIN_PAIRS).values():
                asked.update(pairs)
        for question, answer in checks:
            assert asked.get(question) == answer, (spec.prompt, question, answer)


def _true_scene(spec) -> list[SceneObject]:
    """Objects that make ``spec`` true, laid out so its relation holds."""
    step = {"left of": (-0.3, 0), "right of": (0.3, 0), "above": (0, -0.3), "below": (0, 0.3)}
    (colour, shape), *rest = spec.objects
    if spec.category == "counting":
        return [SceneObject(shape, colour, "small", (0.2 + 0.2 * k, 0.5)) for k in range(spec.count)]
    dx, dy = step.get(spec.relation, (-0.3, 0))
    objects = [SceneObject(shape, colour, "small", (0.5 + dx, 0.5 + dy))]
    objects += [SceneObject(s, c, "small", (0.5, 0.5)) for c, s in rest]
    return objects
