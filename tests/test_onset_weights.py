"""Onset weights (evotok.mllm.onset_weights): which cells they mark, the dataset's per-drawing
weights and the model's weighted code loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evotok.data.scenes import SceneObject
from evotok.mllm.cell_attributes import object_cells
from evotok.mllm.data import ChatDataset, ImagePool, collate
from evotok.mllm.onset_weights import onset_cells, onset_weights
from test_mllm import build, image_tok, tensors, text_tok  # noqa: F401 (fixtures)
from test_scene_conversations import scene_pool


def test_the_onset_is_the_top_row_of_an_objects_cells():
    large = SceneObject("square", "red", "large", (0.5, 0.5))
    cells = object_cells(large, 8).reshape(8, 8)
    onset = onset_cells([large], 8).reshape(8, 8)
    top = int(np.argmax(cells.any(1)))
    assert cells[top + 1:].any(), "a large object spans more than one row"
    assert np.array_equal(onset[top], cells[top]) and not onset[top + 1:].any() and not onset[:top].any()


def test_a_tiny_object_begins_at_the_cell_holding_its_centre_and_objects_add_up():
    tiny = SceneObject("star", "red", "small", (0.26, 0.26))  # between the cell centres of a 2×2 grid
    assert onset_cells([tiny], 2).tolist() == [True, False, False, False]
    low = SceneObject("circle", "blue", "small", (0.8, 0.8))
    both = onset_cells([tiny, low], 2)
    assert both.tolist() == (onset_cells([tiny], 2) | onset_cells([low], 2)).tolist() == [True, False, False, True]


def test_weights_are_the_weight_on_onsets_and_one_elsewhere():
    large = SceneObject("square", "red", "large", (0.5, 0.5))
    weights = onset_weights([large], 8, 8.0)
    assert weights.dtype == np.float32 and weights.shape == (64,)
    assert set(weights[onset_cells([large], 8)].tolist()) == {8.0}
    assert set(weights[~onset_cells([large], 8)].tolist()) == {1.0}
    assert onset_weights([], 8, 8.0).tolist() == [1.0] * 64  # no object: a plain mean
    with pytest.raises(ValueError, match="positive"):
        onset_weights([large], 8, 0.0)


def test_prompted_scene_drawings_carry_their_onset_weights(text_tok):  # noqa: F811
    pool = scene_pool(6)
    clipart = ImagePool("clipart", np.zeros((4, 8, 8, 4), np.int16),
                        [{"caption": "a cat", "label": "cat", "qa": []}] * 4, {})
    data = ChatDataset({"scenes": pool, "clipart": clipart}, {"scene_t2i": 1.0, "clipart_t2i": 1.0, "scene_qa": 0.5},
                       text_tok, 64, 4, seed=3, cfg_dropout=0.3, onset_weight=8.0)
    items = [data[i] for i in range(40)]
    drawings = [it for it in items if it["gen_codes"] is not None]
    prompted = [it for it in drawings if it["task"] == "scene_t2i" and it["cell_weights"] is not None]
    assert prompted and any(it["task"] == "scene_t2i" and it["cell_weights"] is None for it in drawings), \
        "a dropped prompt (the unconditional branch) is not weighted"
    captions = {r["caption"]: r for r in pool.records}
    for it in prompted:
        caption = text_tok.decode(it["input_ids"])
        record = captions[max((c for c in captions if c in caption), key=len)]
        objects = [SceneObject.from_any(o) for o in record["objects"]]
        assert np.array_equal(it["cell_weights"], onset_weights(objects, 8, 8.0))
    assert all(it["cell_weights"] is None for it in drawings if it["task"] == "clipart_t2i")
    batch = collate(items, text_tok.ids["pad"])
    assert batch["cell_weights"].shape == (len(drawings), 64) == (batch["gen_codes"].shape[0], 64)
    for row, it in zip(batch["cell_weights"], drawings):
        expected = np.ones(64, np.float32) if it["cell_weights"] is None else it["cell_weights"]
        assert np.array_equal(row.numpy(), expected)
    plain = ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, text_tok, 64, 4)
    assert collate([plain[0]], text_tok.ids["pad"])["cell_weights"] is None
    with pytest.raises(ValueError, match="onset_weight needs the scene pool's objects"):
        ChatDataset({"scenes": scene_pool(2, objects=False)}, {"scene_t2i": 1.0}, text_tok, 64, 4, onset_weight=8.0)
    with pytest.raises(ValueError, match="positive"):
        ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, text_tok, 64, 4, onset_weight=-1.0)


def square_batch(model, **dataset_options) -> dict:
    """A batch of three drawings of one large red square (random codes on the model's grid)."""
    records = [{"caption": "a red square", "label": None, "qa": [],
                "objects": [{"shape": "square", "colour": "red", "size": "large", "centre": [0.5, 0.5]}]}] * 4
    g = model.config.grid_size
    codes = np.random.default_rng(0).integers(0, model.config.codebook_size, (4, g, g, 4)).astype(np.int16)
    data = ChatDataset({"scenes": ImagePool("scenes", codes, records, {})}, {"scene_t2i": 1.0}, model.text,
                       model.config.num_cells, model.config.pixel_depth, cfg_dropout=0.0, **dataset_options)
    return tensors(collate([data[i] for i in range(3)], model.text.ids["pad"]))


def test_the_code_objective_is_the_weighted_mean_and_the_reported_loss_stays_plain(image_tok, text_tok):  # noqa: F811
    torch.manual_seed(0)
    model = build(image_tok, text_tok)
    batch = square_batch(model, onset_weight=8.0)
    weights = batch.pop("cell_weights")
    assert weights.shape == (3, model.config.num_cells) and (weights > 1).any()
    with torch.no_grad():
        plain = model(**batch)
        ones = model(**batch, cell_weights=torch.ones_like(weights))
        weighted = model(**batch, cell_weights=weights)
        hidden, _ = model.backbone(model.embed_inputs(batch["input_ids"], gen_mask=batch["gen_mask"],
                                                      gen_codes=batch["gen_codes"]),
                                   batch["attention_mask"], cell_index=model.cell_index(None, batch["gen_mask"]))
        logits, targets = model.code_logits(model.drawing_states(hidden, batch["gen_mask"]), batch["gen_codes"])
    per_cell = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    by_hand = (per_cell.mean(1) * weights.reshape(-1)).sum() / weights.sum()
    assert torch.allclose(ones.loss, plain.loss)
    assert torch.allclose(weighted.depth_loss, plain.depth_loss)  # the logged code loss stays comparable
    assert torch.allclose(weighted.loss, weighted.lm_loss + by_hand, atol=1e-5)
    assert not torch.allclose(weighted.loss, plain.loss)


def test_swapped_input_cells_are_whole_real_cells_and_the_targets_stay_true(image_tok, text_tok):  # noqa: F811
    from evotok.mllm.input_noise import swap_cells

    codes = torch.arange(2 * 4 * 4 * 3).view(2, 4, 4, 3)
    generator = torch.Generator().manual_seed(0)
    swapped = swap_cells(codes, 0.5, generator)
    cells, originals = swapped.reshape(-1, 3), codes.reshape(-1, 3)
    changed = (cells != originals).any(1)
    assert 0 < int(changed.sum()) < 32
    assert all(any(torch.equal(c, o) for o in originals) for c in cells)  # every input is some real cell
    assert torch.equal(swap_cells(codes, 0.0), codes) and torch.equal(codes.reshape(-1, 3), originals)
    with pytest.raises(ValueError, match="noise rate"):
        swap_cells(codes, 1.5)

    torch.manual_seed(0)
    model = build(image_tok, text_tok)
    batch = square_batch(model)
    with torch.no_grad():
        plain = model(**batch)
        noisy = model(**batch, input_code_noise=1.0)
    assert torch.allclose(noisy.lm_loss, plain.lm_loss) and not torch.allclose(noisy.depth_loss, plain.depth_loss)
