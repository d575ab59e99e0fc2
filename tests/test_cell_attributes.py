"""The cell-attribute loss (evotok.mllm.cell_attributes): its targets, its gap-masked softmax, the
dataset's per-drawing targets and the model's loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evotok.data.scenes import COLOURS, HELDOUT_PAIRS, SHAPES, SceneObject
from evotok.mllm.cell_attributes import (COLOUR_BACKGROUND, IGNORE_CELL, SHAPE_BACKGROUND, CellAttributeHead,
                                         cell_attribute_targets, gap_class_mask)
from evotok.mllm.data import ChatDataset, ImagePool, collate
from test_mllm import build, image_tok, tensors, text_tok  # noqa: F401 (fixtures)
from test_scene_conversations import scene_pool

RED, STAR, SQUARE = list(COLOURS).index("red"), list(SHAPES).index("star"), list(SHAPES).index("square")


def test_targets_name_the_object_over_each_cell_and_background_elsewhere():
    square = SceneObject("square", "red", "large", (0.5, 0.5))
    colour, shape = cell_attribute_targets([square], grid=8)
    on = shape == SQUARE
    assert 0 < on.sum() < 64 and (colour[on] == RED).all()
    assert (colour[~on] == COLOUR_BACKGROUND).all() and (shape[~on] == SHAPE_BACKGROUND).all()
    assert shape[0] == SHAPE_BACKGROUND  # a corner cell


def test_an_object_too_small_for_any_cell_centre_labels_the_cell_holding_its_centre():
    tiny = SceneObject("star", "red", "small", (0.26, 0.26))  # between cell centres of a 2×2 grid
    colour, shape = cell_attribute_targets([tiny], grid=2)
    assert shape.tolist() == [STAR, SHAPE_BACKGROUND, SHAPE_BACKGROUND, SHAPE_BACKGROUND]
    assert colour[0] == RED


def test_gap_masks_leave_out_exactly_the_pairs_never_seen():
    colour_gaps, shape_gaps = gap_class_mask()
    for c, s in HELDOUT_PAIRS:
        ci, si = list(COLOURS).index(c), list(SHAPES).index(s)
        assert shape_gaps[ci, si] and colour_gaps[si, ci]
    assert not shape_gaps[:, SHAPE_BACKGROUND].any() and not colour_gaps[:, COLOUR_BACKGROUND].any()
    assert int(shape_gaps.sum()) == len(HELDOUT_PAIRS) == int(colour_gaps.sum())


def test_loss_ignores_gap_classes_and_cells_without_targets():
    head = CellAttributeHead(4)
    states = torch.randn(3, 4)
    red_gap = next(list(SHAPES).index(s) for c, s in HELDOUT_PAIRS if c == "red")
    red_seen = next(i for i, s in enumerate(SHAPES) if ("red", s) not in HELDOUT_PAIRS)
    targets = torch.tensor([[RED, red_seen], [COLOUR_BACKGROUND, SHAPE_BACKGROUND], [IGNORE_CELL, IGNORE_CELL]])
    base = head.loss(states, targets)
    # zero read-outs: each softmax is uniform over the classes left in
    allowed_shapes = len(SHAPES) + 1 - int(gap_class_mask()[1][RED].sum())
    allowed_colours = len(COLOURS) + 1 - int(gap_class_mask()[0][red_seen].sum())
    expected = (math.log(allowed_colours) + math.log(len(COLOURS) + 1)) / 4 + \
        (math.log(allowed_shapes) + math.log(len(SHAPES) + 1)) / 4
    assert base.item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # a huge logit on a red object's gap shape changes nothing
        head.shape.bias[red_gap] = 50.0
    first_only = head.loss(states[:1], targets[:1])
    with torch.no_grad():
        head.shape.bias[red_gap] = 0.0
    assert first_only.item() == pytest.approx(head.loss(states[:1], targets[:1]).item(), rel=1e-6)
    with torch.no_grad():  # ...while one on the background class, never left out, does
        head.shape.bias[SHAPE_BACKGROUND] = 50.0
    assert head.loss(states[:1], targets[:1]).item() > first_only.item() + 10
    nothing = head.loss(states, torch.full((3, 2), IGNORE_CELL))
    assert nothing.item() == 0.0


def test_scene_drawings_carry_cell_targets_in_the_order_of_their_codes(text_tok):  # noqa: F811
    pool = scene_pool(6)
    clipart = ImagePool("clipart", np.zeros((4, 8, 8, 4), np.int16),
                        [{"caption": "a cat", "label": "cat", "qa": []}] * 4, {})
    data = ChatDataset({"scenes": pool, "clipart": clipart}, {"scene_t2i": 1.0, "clipart_t2i": 1.0, "scene_qa": 0.5},
                       text_tok, 64, 4, seed=3, cell_attributes=True)
    items = [data[i] for i in range(24)]
    batch = collate(items, text_tok.ids["pad"])
    drawings = [it for it in items if it["gen_codes"] is not None]
    assert batch["cell_targets"].shape == (len(drawings), 2, 64) == (batch["gen_codes"].shape[0], 2, 64)
    for row, it in zip(batch["cell_targets"], drawings):
        if it["task"] == "scene_t2i":
            assert (row >= 0).all() and (row[1] < SHAPE_BACKGROUND).any()
        else:
            assert (row == IGNORE_CELL).all()
    assert {it["task"] for it in drawings} == {"scene_t2i", "clipart_t2i"}
    plain = ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, text_tok, 64, 4)
    assert collate([plain[0]], text_tok.ids["pad"])["cell_targets"] is None
    with pytest.raises(ValueError, match="cell_attributes needs the scene pool's objects"):
        ChatDataset({"scenes": scene_pool(2, objects=False)}, {"scene_t2i": 1.0}, text_tok, 64, 4,
                    cell_attributes=True)


def test_the_model_adds_the_weighted_cell_loss_and_keeps_its_head(image_tok, text_tok, tmp_path):  # noqa: F811
    model = build(image_tok, text_tok)
    records = [{"caption": "a red square", "label": None, "qa": [],
                "objects": [{"shape": "square", "colour": "red", "size": "large", "centre": [0.5, 0.5]}]}] * 4
    codes = np.random.default_rng(0).integers(0, model.config.codebook_size, (4, 4, 4, 4)).astype(np.int16)
    data = ChatDataset({"scenes": ImagePool("scenes", codes, records, {})}, {"scene_t2i": 1.0}, model.text,
                       model.config.num_cells, model.config.pixel_depth, cfg_dropout=0.0, cell_attributes=True)
    batch = tensors(collate([data[i] for i in range(3)], model.text.ids["pad"]))
    with pytest.raises(ValueError, match="cell-attribute head"):
        model(**batch, cell_attribute_weight=0.5)
    plain = model(**batch)
    assert plain.cell_attribute_loss is None

    model.add_cell_attribute_head()
    with pytest.raises(ValueError, match="already"):
        model.add_cell_attribute_head()
    out = model(**batch, cell_attribute_weight=0.5)
    assert torch.allclose(out.loss, out.lm_loss + out.depth_loss + 0.5 * out.cell_attribute_loss)
    assert torch.allclose(out.depth_loss, plain.depth_loss)  # sampling and the code loss are untouched
    states = model.drawing_states(model.backbone(model.embed_inputs(batch["input_ids"], gen_mask=batch["gen_mask"],
                                                                    gen_codes=batch["gen_codes"]),
                                                 batch["attention_mask"],
                                                 cell_index=model.cell_index(None, batch["gen_mask"]))[0],
                                  batch["gen_mask"])
    assert states.shape == (3 * model.config.num_cells, model.config.hidden_size)

    with torch.no_grad():
        model.cell_attributes.shape.bias.fill_(0.25)
    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m", image_tokenizer=image_tok)
    assert loaded.config.cell_attribute_head and torch.equal(loaded.cell_attributes.shape.bias,
                                                             model.cell_attributes.shape.bias)
