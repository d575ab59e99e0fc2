"""The plan canvas (evotok.mllm.plan_canvas): which entries cover each cell, the dataset's canvases,
the model's tables, and that sampling adds each cell's vector where training does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evotok.mllm.generate as generate_module
from evotok.data.scenes import COLOURS, SHAPES, SceneObject
from evotok.mllm import EvoTokMLLM
from evotok.mllm.chat import encode_generation
from evotok.mllm.config import MLLMConfig
from evotok.mllm.data import ChatDataset, collate
from evotok.mllm.generate import encoded_anchor_row, generate_image_codes
from evotok.mllm.layout_plan import PlannedObject, plan_of
from evotok.mllm.plan_canvas import OFFSET_REACH, PlanCanvas, canvas_ids, stack_canvases
from evotok.mllm.plan_guidance import planned_cells
from test_layout_plan import bundled_text  # noqa: F401 (fixture)
from test_mllm import build, image_tok, text_tok  # noqa: F401 (fixtures)
from test_scene_conversations import scene_pool

STAR = PlannedObject("small", "red", "star", 1, 1)
CROSS = PlannedObject("large", "orange", "cross", 2, 2)
CENTRE = OFFSET_REACH * (2 * OFFSET_REACH + 1) + OFFSET_REACH  # the offset index of (0, 0)


def test_each_covered_cell_names_its_entry_and_its_offset_from_the_entrys_cell():
    ids = canvas_ids([CROSS], 8)
    covered = planned_cells(CROSS, 8)
    assert ids.shape == (64, 1, 4) and covered.sum() > 1
    assert (ids[covered, 0, 0] == list(COLOURS).index("orange")).all()
    assert (ids[covered, 0, 1] == list(SHAPES).index("cross")).all()
    assert (ids[~covered] == -1).all()
    assert ids[2 * 8 + 2, 0, 3] == CENTRE
    span = 2 * OFFSET_REACH + 1
    assert ids[1 * 8 + 3, 0, 3] == CENTRE - span + 1  # one row up, one column right


def test_overlapping_entries_fill_slots_and_an_empty_plan_has_none():
    both = canvas_ids([STAR, CROSS], 8)
    shared = planned_cells(STAR, 8) & planned_cells(CROSS, 8)
    assert shared.any() and both.shape[1] == 2
    assert (both[shared, 1, 0] >= 0).all() and (both[~shared, 1] == -1).all()
    assert canvas_ids([], 8).shape == (64, 0, 4)
    stacked = stack_canvases([both, None, canvas_ids([], 8)], 64)
    assert stacked.shape == (3, 64, 2, 4) and (stacked[1:] == -1).all()
    assert torch.equal(stacked[0], torch.from_numpy(both))


def test_the_tables_start_at_zero_and_sum_over_the_entries_of_a_cell():
    canvas = PlanCanvas(16)
    ids = stack_canvases([canvas_ids([STAR, CROSS], 8)], 64)
    assert torch.equal(canvas(ids), torch.zeros(1, 64, 16))
    for table in (canvas.colour, canvas.shape, canvas.size, canvas.offset):
        torch.nn.init.normal_(table.weight)
    out = canvas(ids)[0]
    cell = int(np.flatnonzero(planned_cells(STAR, 8) & planned_cells(CROSS, 8))[0])
    alone = [canvas(torch.from_numpy(canvas_ids([p], 8))[cell][None])[0] for p in (STAR, CROSS)]
    assert torch.allclose(out[cell], alone[0] + alone[1], atol=1e-5)
    uncovered = torch.from_numpy(~(planned_cells(STAR, 8) | planned_cells(CROSS, 8)))
    assert uncovered.any() and float(out[uncovered].detach().abs().max()) == 0.0


def test_prompted_scene_drawings_carry_the_canvas_of_their_plan(text_tok):  # noqa: F811
    pool = scene_pool(6)
    data = ChatDataset({"scenes": pool}, {"scene_t2i": 1.0, "scene_qa": 0.5}, text_tok, 64, 4, seed=3,
                       cfg_dropout=0.3, layout_plan=True, plan_canvas=True)
    items = [data[i] for i in range(40)]
    drawings = [it for it in items if it["gen_codes"] is not None]
    with_canvas = [it for it in drawings if it["canvas_ids"] is not None]
    assert with_canvas and len(with_canvas) < len(drawings), "a dropped prompt draws without a canvas"
    captions = {r["caption"]: r for r in pool.records}
    for it in with_canvas:
        text = text_tok.decode(it["input_ids"])
        record = captions[max((c for c in captions if c in text), key=len)]
        objects = [SceneObject.from_any(o) for o in record["objects"]]
        assert np.array_equal(it["canvas_ids"], canvas_ids(plan_of(objects, record["caption"], 8), 8))
    batch = collate(items, text_tok.ids["pad"])
    assert batch["canvas_ids"].shape[:2] == (len(drawings), 64)
    with pytest.raises(ValueError, match="set layout_plan too"):
        ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, text_tok, 64, 4, plan_canvas=True)


def test_a_canvas_needs_plans_and_is_saved(image_tok, bundled_text, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="set layout_plan too"):
        MLLMConfig(lm_config={"model_type": "qwen2"}, plan_canvas=True)
    with pytest.raises(ValueError, match="must write plans"):
        build(image_tok, bundled_text).add_plan_canvas()
    model = build(image_tok, bundled_text, layout_plan=True)
    model.add_plan_canvas()
    with pytest.raises(ValueError, match="already has"):
        model.add_plan_canvas()
    torch.nn.init.normal_(model.plan_canvas.shape.weight)
    model.save_pretrained(tmp_path / "m")
    loaded = EvoTokMLLM.from_pretrained(tmp_path / "m", image_tokenizer=image_tok)
    assert loaded.config.plan_canvas and torch.equal(loaded.plan_canvas.shape.weight, model.plan_canvas.shape.weight)


def test_sampling_adds_each_cells_vector_where_training_does(image_tok, bundled_text, monkeypatch):  # noqa: F811
    model = build(image_tok, bundled_text, layout_plan=True, plan_anchors=True, plan_canvas=True)
    tok, grid, n = model.text, model.config.grid_size, model.config.num_cells
    plan = "small red star 0 0, large orange cross 2 2"
    written = tok.encode(plan)
    monkeypatch.setattr(generate_module, "write_plans", lambda m, prompts, use_cache=True: [written] * len(prompts))
    prompt = "a red star and an orange cross"
    untouched = []
    generate_image_codes(model, [prompt], None, seed=5, logits_trace=untouched)
    for table in (model.plan_canvas.colour, model.plan_canvas.shape, model.plan_canvas.offset):
        torch.nn.init.normal_(table.weight, std=2.0)
    trace = []
    codes = generate_image_codes(model, [prompt], None, seed=5, logits_trace=trace)
    assert not torch.allclose(trace[0], untouched[0], atol=1e-2)  # the star's cell (0 0) is drawn otherwise
    encoded = encode_generation(tok, prompt, n, model.config.max_prompt_tokens, plan=plan)
    ids, gen = torch.tensor([encoded.input_ids]), torch.tensor([encoded.gen_mask])
    anchors = torch.tensor([encoded_anchor_row(model, encoded, plan)])
    canvas = stack_canvases([canvas_ids([PlannedObject("small", "red", "star", 0, 0), PlannedObject(
        "large", "orange", "cross", 2, 2)], grid)], n)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, gen_mask=gen, gen_codes=codes, anchor_cells=anchors, canvas_ids=canvas)
        hidden, _ = model.backbone(embeds, torch.ones_like(ids), cell_index=model.cell_index(None, gen))
        logits, _ = model.code_logits(model.drawing_states(hidden, gen), codes)
    sampled = torch.stack(trace).view(n, model.config.pixel_depth, -1)
    assert torch.allclose(logits, sampled, atol=1e-3)
