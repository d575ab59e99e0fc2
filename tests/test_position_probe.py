"""training/bench_position_probe.py: the questions it asks and the hidden states it probes."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from evotok.data.scenes import SceneWorld
from evotok.mllm import encode_chat
from evotok.mllm.generate import left_pad, positions_of
from test_mllm import build, tiny_text_tokenizer, tiny_tokenizer
from training.bench_position_probe import AXES, answer_states, position_questions


def test_position_questions_are_two_way_and_balanced_on_each_axis():
    items = position_questions(SceneWorld(64, seed=7, split="train"), 300, seed=7)
    counts = collections.Counter((axis, answer) for _, axis, _, answer in items)
    for axis in AXES:
        # every clear pair is asked both ways round, so each axis has as many of either answer
        assert counts[(axis, 0)] == counts[(axis, 1)] > 5
    for _, axis, question, _ in items:
        assert question.startswith("Is ") and question.endswith("?")
        other = next(a for a in AXES if a != axis)
        assert other not in question


def test_place_questions_are_two_way_and_name_the_middle():
    items = position_questions(SceneWorld(64, seed=7, split="train"), 300, seed=7, kind="place")
    counts = collections.Counter((axis, answer) for _, axis, _, answer in items)
    assert all(counts[(axis, k)] > 10 for axis in AXES for k in (0, 1))
    assert all("the middle of the image" in question for *_, question, _ in items)
    with pytest.raises(ValueError, match="kind"):
        position_questions(SceneWorld(64, seed=7, split="train"), 3, seed=7, kind="colour")


@pytest.mark.parametrize("grid_rope", [False, True])
def test_answer_states_are_the_states_the_model_answers_from(grid_rope):
    model = build(tiny_tokenizer(), tiny_text_tokenizer(), grid_rope=grid_rope)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    questions = ["Is the circle left or right of the square?", "Is the star above or below the cross?", "Is it?"]
    states, logits = answer_states(model, images, questions)
    layers = model.config.lm_config["num_hidden_layers"]
    assert states.shape == (layers + 1, 3, model.config.hidden_size) and logits.shape[0] == 3

    # the same last state and logits as the answering path (left padding, image splice, backbone)
    encoded = [encode_chat(model.text, [(q, None)], model.config.num_cells, model.config.max_prompt_tokens)
               for q in questions]
    ids, mask = left_pad([e.input_ids for e in encoded], model.text.ids["pad"], model.device)
    image_mask, _ = left_pad([e.image_mask for e in encoded], False, model.device, torch.bool)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, image_mask, model.image_features(model.encode_images(images)))
        hidden, _ = model.backbone(embeds, mask, positions_of(mask), cell_index=model.cell_index(image_mask))
        expected = model.text_logits(hidden[:, -1])
        unmarked, _ = model.backbone(embeds, mask, positions_of(mask))  # cells read as text
    assert torch.allclose(unmarked[:, -1], hidden[:, -1]) != grid_rope
    assert np.allclose(states[-1], hidden[:, -1].numpy(), atol=1e-5)
    assert np.allclose(logits, expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("grid_rope", [False, True])
def test_cell_states_are_the_image_cells_in_raster_order(grid_rope):
    from training.bench_cell_position_probe import cell_states

    model = build(tiny_tokenizer(), tiny_text_tokenizer(), grid_rope=grid_rope)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    states = cell_states(model, images, "What colour is the star?")
    n, layers = model.config.num_cells, model.config.lm_config["num_hidden_layers"]
    assert states.shape == (layers + 1, 2, n, model.config.hidden_size)
    with torch.no_grad():  # after the embedding: the projected features plus each cell's position
        expected = model.project_image(model.image_features(model.encode_images(images))) + model.cell_positions()
    assert np.allclose(states[0], expected.numpy(), atol=1e-5)
