"""Layout plans (evotok.mllm.layout_plan): the plan of a scene, its place in the template and the
dataset, and a model that writes one before it draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evotok.mllm.generate as generate_module
from evotok.data.scenes import HELDOUT_PAIRS, SceneObject
from evotok.mllm import EvoTokMLLM, encode_generation
from evotok.mllm.chat import IGNORE
from evotok.mllm.data import ChatDataset, ImagePool, collate
from evotok.mllm.generate import generate_image_codes
from evotok.mllm.layout_plan import PlannedObject, centre_cell, parse_plan, plan_of, plan_text
from test_mllm import build, image_tok, tensors  # noqa: F401 (fixtures)
from test_scene_conversations import BUNDLED_TEXT, scene_pool

from evotok.mllm import TextTokenizer


def pieces(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text)]


@pytest.fixture(scope="module")
def bundled_text():
    return TextTokenizer.load(BUNDLED_TEXT)


# ---------------------------------------------------------------------------- the plan
def test_plan_lists_objects_in_the_order_the_caption_names_them():
    star = SceneObject("star", "red", "small", (0.9, 0.1))
    square = SceneObject("square", "blue", "large", (0.1, 0.8))
    plan = plan_of([star, square], "a large blue square below a red star", grid=8)
    assert plan == [PlannedObject("large", "blue", "square", 6, 0), PlannedObject("small", "red", "star", 0, 7)]
    assert plan_text(plan) == "large blue square 6 0, small red star 0 7"
    assert plan_text([]) == ""


def test_copies_of_a_counted_object_go_top_to_bottom_and_plurals_count_as_named():
    copies = [SceneObject("circle", "green", "small", (x, y)) for x, y in [(0.7, 0.6), (0.2, 0.6), (0.5, 0.1)]]
    extra = SceneObject("cross", "white", "large", (0.5, 0.9))
    plan = plan_of([extra, *copies], "three green circles and a white cross", grid=4)
    assert [(p.shape, p.row, p.col) for p in plan] == [("circle", 0, 2), ("circle", 2, 0), ("circle", 2, 2),
                                                       ("cross", 3, 2)]


def test_centre_cells_stay_on_the_grid():
    assert centre_cell(SceneObject("star", "red", "small", (1.0, 0.0)), 8) == (0, 7)
    assert centre_cell(SceneObject("star", "red", "small", (0.49, 0.51)), 8) == (4, 3)


def test_written_plans_parse_back_and_malformed_ones_are_refused():
    plan = [PlannedObject("small", "red", "star", 3, 1), PlannedObject("large", "blue", "cross", 4, 6)]
    assert parse_plan(plan_text(plan), grid=8) == plan
    assert parse_plan("", grid=8) == [] and parse_plan("  ", grid=8) == []
    for bad in ("small red star 3", "small red dragon 3 1", "huge red star 3 1", "small red star 8 1",
                "small red star 3 1,, large blue cross 4 6", "hellohello"):
        assert parse_plan(bad, grid=8) is None, bad


# ---------------------------------------------------------------------------- template and data
def test_the_plan_and_boi_are_supervised_between_the_prompt_and_the_grid(bundled_text):
    tok = bundled_text
    enc = encode_generation(tok, "a red star", 64, plan="small red star 3 1")
    plan_ids = tok.encode("small red star 3 1")
    start = enc.answer_starts[0]
    assert enc.input_ids[start - 1] == tok.ids["assistant"]
    assert enc.input_ids[start:start + len(plan_ids) + 1] == plan_ids + [tok.ids["boi"]]
    assert [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE] == plan_ids + [tok.ids["boi"]]
    assert sum(enc.gen_mask) == 64 and enc.gen_mask.index(True) == start + len(plan_ids) + 1
    empty = encode_generation(tok, "a cat", 64, plan="")
    assert [t for t, lab in zip(empty.input_ids, empty.labels) if lab != IGNORE] == [tok.ids["boi"]]


def test_scene_drawings_write_their_plan_and_other_drawings_an_empty_one(bundled_text):
    tok = bundled_text
    pool = scene_pool(8)
    clipart = ImagePool("clipart", np.zeros((4, 8, 8, 4), np.int16),
                        [{"caption": "a cat", "label": "cat", "qa": []}] * 4, {})
    data = ChatDataset({"scenes": pool, "clipart": clipart}, {"scene_t2i": 1.0, "clipart_t2i": 0.5}, tok, 64, 4,
                       seed=1, cfg_dropout=0.2, layout_plan=True)
    seen = {"scene": 0, "clipart": 0, "dropped": 0}
    for i in range(40):
        item = data[i]
        ids, labels = item["input_ids"], item["labels"]
        supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE]
        prompt_end = ids.index(tok.ids["assistant"])
        if prompt_end == 2:  # <|user|><|end|><|assistant|>: the dropped prompt writes no plan
            assert supervised == []
            seen["dropped"] += 1
        elif item["task"] == "clipart_t2i":
            assert supervised == [tok.ids["boi"]]
            seen["clipart"] += 1
        else:
            prompt = tok.decode(ids[1:prompt_end - 1])
            record = next(r for r in pool.records if r["caption"] == prompt)
            objects = [SceneObject.from_any(o) for o in record["objects"]]
            assert supervised == tok.encode(plan_text(plan_of(objects, prompt, 8))) + [tok.ids["boi"]]
            seen["scene"] += 1
    assert min(seen.values()) > 0


def test_plan_shape_words_are_gap_masked_and_the_model_accepts_the_masks(image_tok, bundled_text):  # noqa: F811
    tok = bundled_text
    red_gaps = {s for c, s in HELDOUT_PAIRS if c == "red"}
    records = [{"caption": "a small red circle", "label": None, "qa": [],
                "objects": [SceneObject("circle", "red", "small", (0.4, 0.6)).to_dict()]}]
    pool = ImagePool("scenes", np.zeros((1, 4, 4, 4), np.int16), records, {"split": "train"})
    data = ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, tok, 16, 2, cfg_dropout=0.0, layout_plan=True,
                       mask_answer_gaps=True)
    item = data[0]
    circle = item["input_ids"].index(tok.encode(" circle")[0], item["input_ids"].index(tok.ids["assistant"]))
    assert {tok.decode([t]).strip() for p, t in item["exclusions"] if p == circle} == red_gaps
    assert {p for p, _ in item["exclusions"]} == {circle}

    model = build(image_tok, tok, layout_plan=True)
    batch = collate([item], tok.ids["pad"])
    out = model(**tensors(batch))  # an exclusion off a supervised plan token would raise
    assert torch.isfinite(out.loss) and out.lm_tokens == len(tok.encode(plan_text(plan_of(
        [SceneObject.from_any(records[0]["objects"][0])], records[0]["caption"], 4)))) + 1


# ---------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def planner(image_tok, bundled_text):  # noqa: F811
    return build(image_tok, bundled_text, layout_plan=True, max_plan_tokens=6)


def test_a_planning_model_writes_one_plan_per_prompt_and_none_for_the_empty_prompt(planner):
    trace = []
    codes = planner.generate_image(["a red star", ""], seed=0, plan_trace=trace)
    assert codes.shape[0] == 2 and len(trace) == 2
    # an untrained planner never writes <boi>: it stops at the cap (re-encoding the text may split
    # its tokens differently, so count words, at most one per written token)
    assert trace[1] == "" and 0 < len(trace[0].split()) <= planner.config.max_plan_tokens
    again = []
    assert torch.equal(planner.generate_image(["a red star", ""], seed=0, plan_trace=again), codes)
    assert again == trace
    assert torch.equal(planner.generate_image(["a red star", ""], seed=0, use_cache=False), codes)


def test_the_drawing_follows_the_written_plan_and_guidance_one_is_the_conditional_branch(planner, monkeypatch):
    tok = planner.text
    plans = {"a": tok.encode("small red star 0 0"), "b": tok.encode("large blue cross 3 3")}
    monkeypatch.setattr(generate_module, "write_plans", lambda model, prompts, use_cache=True: [plans["a"]])
    first = generate_image_codes(planner, ["a red star"], guidance_scale=None, seed=5)
    trace_one, trace_cond = [], []
    guided = generate_image_codes(planner, ["a red star"], guidance_scale=1.0, seed=5, logits_trace=trace_one)
    generate_image_codes(planner, ["a red star"], guidance_scale=None, seed=5, logits_trace=trace_cond)
    assert torch.equal(guided, first)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(trace_one, trace_cond))
    monkeypatch.setattr(generate_module, "write_plans", lambda model, prompts, use_cache=True: [plans["b"]])
    trace_other = []
    generate_image_codes(planner, ["a red star"], guidance_scale=None, seed=5, logits_trace=trace_other)
    assert not torch.allclose(trace_other[0], trace_cond[0], atol=1e-5)


def test_attribute_guidance_is_refused_for_a_planning_model(planner):
    with pytest.raises(ValueError, match="layout plans"):
        planner.generate_image("a red star", guidance_scale=3.0, attribute_guidance=1.0)


def test_the_plan_setting_survives_saving(planner, tmp_path, image_tok):  # noqa: F811
    planner.save_pretrained(tmp_path / "m")
    loaded = EvoTokMLLM.from_pretrained(tmp_path / "m", image_tokenizer=image_tok)
    assert loaded.config.layout_plan and loaded.config.max_plan_tokens == 6


# ---------------------------------------------------------------------------- anchors
def test_only_the_token_that_closes_an_entry_is_anchored_to_its_cell(bundled_text):
    from evotok.mllm.layout_plan import closed_entry_cell, plan_anchors

    ids = bundled_text.encode("small red star 3 1, large blue cross 6 5")
    anchors = plan_anchors([bundled_text.decode([i]) for i in ids], grid=8)
    assert [a for a in anchors if a >= 0] == [3 * 8 + 1, 6 * 8 + 5]
    assert bundled_text.decode([ids[anchors.index(25)]]).strip() == "1"
    assert closed_entry_cell("small red star 3", 8) == -1 and closed_entry_cell("small red star 3 9", 8) == -1
    assert closed_entry_cell("small red star 3 1, large blue", 8) == -1


def test_anchored_drawings_carry_their_cells_and_the_model_adds_them(image_tok, bundled_text):  # noqa: F811
    tok = bundled_text
    pool = scene_pool(4)
    data = ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, tok, 64, 4, cfg_dropout=0.0, layout_plan=True,
                       plan_anchors=True)
    item = data[0]
    anchors = item["anchor_cells"]
    assert len(anchors) == len(item["input_ids"])
    prompt_end = item["input_ids"].index(tok.ids["assistant"])
    record = next(r for r in pool.records if tok.decode(item["input_ids"][1:prompt_end - 1]) == r["caption"])
    plan = plan_of([SceneObject.from_any(o) for o in record["objects"]], record["caption"], 8)
    assert [a for a in anchors if a >= 0] == [p.row * 8 + p.col for p in plan]
    with pytest.raises(ValueError, match="layout_plan"):
        ChatDataset({"scenes": pool}, {"scene_t2i": 1.0}, tok, 64, 4, plan_anchors=True)

    batch = collate([item, ChatDataset({"scenes": pool}, {"scene_qa": 1.0}, tok, 64, 4)[0]], tok.ids["pad"])
    assert batch["anchor_cells"].shape == batch["input_ids"].shape and (batch["anchor_cells"][1] == -1).all()

    from evotok.mllm.layout_plan import anchor_row

    model = build(image_tok, tok, layout_plan=True, plan_anchors=True)  # a 4×4 grid
    plan = "small red star 1 2, large blue cross 3 0"
    encoded = encode_generation(tok, "a red star and a blue cross", 16, plan=plan)
    ids = torch.tensor([encoded.input_ids])
    cells = torch.tensor([anchor_row(pieces(tok, plan), encoded.answer_starts[0], len(encoded), 4)])
    assert sorted(cells[cells >= 0].tolist()) == [6, 12]
    with torch.no_grad():
        plain, anchored = model.embed_inputs(ids), model.embed_inputs(ids, anchor_cells=cells)
    at = cells[0] >= 0
    assert torch.allclose(anchored[0, at] - plain[0, at], model.cell_positions()[cells[0, at]])
    assert torch.equal(anchored[0, ~at], plain[0, ~at])


def test_an_anchored_planner_draws_as_the_training_sequence_reads(image_tok, bundled_text, monkeypatch):  # noqa: F811
    from evotok.mllm.layout_plan import anchor_row

    tok = bundled_text
    model = build(image_tok, tok, layout_plan=True, plan_anchors=True)
    g = model.config.grid_size
    with torch.no_grad():  # position vectors big enough to matter
        model.grid_pos.normal_(0, 1.0)
    plan = f"small red star 1 {g - 1}"
    monkeypatch.setattr(generate_module, "write_plans", lambda model, prompts, use_cache=True: [tok.encode(plan)])
    trace = []
    generate_image_codes(model, ["a red star"], guidance_scale=None, seed=1, logits_trace=trace)
    encoded = encode_generation(tok, "a red star", model.config.num_cells, plan=plan, include_grid=False)
    ids = torch.tensor([encoded.input_ids])
    cells = torch.tensor([anchor_row(pieces(tok, plan), encoded.answer_starts[0], len(encoded), g)])
    assert int((cells >= 0).sum()) == 1
    with torch.no_grad():
        for anchors, same in ((cells, True), (None, False)):
            hidden, _ = model.backbone(model.embed_inputs(ids, anchor_cells=anchors))
            first = model.depth.next_logits(hidden[:, -1], torch.zeros(1, dtype=torch.long),
                                            torch.zeros(1, 0, dtype=torch.long))
            assert torch.allclose(first.float(), trace[0], atol=1e-5) == same
    assert torch.equal(generate_image_codes(model, ["a red star"], guidance_scale=None, seed=1, use_cache=False),
                       generate_image_codes(model, ["a red star"], guidance_scale=None, seed=1))
