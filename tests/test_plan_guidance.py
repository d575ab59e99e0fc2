"""Guidance from the layout plan (evotok.mllm.plan_guidance): the moved plan and the place mix,
which cells each planned object guides, the object branches, and both while sampling."""
from __future__ import annotations

import pytest
import torch

import evotok.mllm.generate as generate_module
from evotok.mllm.generate import LogitMix, generate_image_codes, object_branches
from evotok.mllm.layout_plan import PlannedObject, parse_plan
from evotok.mllm.plan_guidance import PlaceMix, RegionMix, moved_plan, object_prompt, planned_cells, region_weights
from test_layout_plan import bundled_text  # noqa: F401 (fixture)
from test_mllm import build, image_tok  # noqa: F401 (fixture)

STAR = PlannedObject("small", "red", "star", 0, 0)
CROSS = PlannedObject("large", "orange", "cross", 2, 2)


def test_the_moved_plan_keeps_the_objects_and_moves_each_half_the_grid():
    assert moved_plan([STAR, CROSS], 4) == [PlannedObject("small", "red", "star", 2, 2),
                                            PlannedObject("large", "orange", "cross", 0, 0)]
    assert moved_plan([], 4) == []


def test_the_place_mix_amplifies_the_plan_against_the_moved_plan():
    cond, moved, uncond = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    mixed = PlaceMix(2, 3.0, 2.0)(torch.cat([cond, moved, uncond]), 7)
    assert torch.allclose(mixed, uncond + 3.0 * (cond - uncond) + 2.0 * (cond - moved))
    assert PlaceMix.branches == 3


def test_each_planned_object_guides_the_cells_its_size_covers_at_its_cell():
    assert object_prompt(STAR) == "a red star" and object_prompt(CROSS) == "an orange cross"
    assert planned_cells(STAR, 4).nonzero()[0].tolist() == [0]  # small: the cell holding its centre
    assert planned_cells(CROSS, 4).nonzero()[0].tolist() == [2 * 4 + 2]
    large = planned_cells(PlannedObject("large", "orange", "cross", 4, 4), 8).reshape(8, 8)
    assert large[4, 4] and large.sum() > 1 and large[3:6, 3:6].sum() == large.sum()  # around its cell
    weights = region_weights([[STAR, CROSS], [CROSS], []], 4)
    assert weights.shape == (3, 16, 2)
    assert weights[0, 0].tolist() == [1.0, 0.0] and weights[0, 10].tolist() == [0.0, 1.0]
    assert torch.equal(weights[1, :, 0], weights[0, :, 1]) and not weights[1, :, 1].any()
    assert not weights[2].any()  # no plan (or one that did not parse): plain guidance everywhere
    assert (weights.sum(-1) <= 1).all()  # one entry per cell: where two overlap, the later one
    overlap = region_weights([[CROSS, PlannedObject("small", "red", "star", 2, 2)]], 4)
    assert overlap[0, 10].tolist() == [0.0, 1.0]


def test_the_mix_adds_each_object_branch_on_its_own_cells_only():
    weights = region_weights([[STAR], []], 2)  # two images, a 2×2 grid
    mix = RegionMix(2, 3.0, 2.0, weights)
    assert mix.branches == 3
    cond, obj, uncond = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    logits = torch.cat([cond, obj, uncond])
    plain = uncond + 3.0 * (cond - uncond)
    inside = mix(logits, 0)
    assert torch.allclose(inside[0], plain[0] + 2.0 * (obj[0] - uncond[0]))
    assert torch.allclose(inside[1], plain[1])  # the second image has no plan
    assert torch.allclose(mix(logits, 3), plain)  # a cell no entry covers
    assert torch.allclose(LogitMix(2, 3.0)(torch.cat([cond, uncond]), 3), plain)
    with pytest.raises(ValueError, match="region weights for 1 images"):
        RegionMix(2, 3.0, 2.0, weights[:1])


def test_object_branches_hold_each_entry_after_its_own_prompt(image_tok, bundled_text):  # noqa: F811
    model = build(image_tok, bundled_text, layout_plan=True, plan_anchors=True)
    tok = model.text
    unconditional = [1, 2, 3]
    seqs, anchors, entries = zip(*object_branches(model, [[STAR, CROSS], [CROSS]], 2, unconditional))
    assert len(seqs) == 4  # branch-major: entry 0 of both plans, then entry 1
    assert tok.decode(seqs[0]).count("a red star") == 1 and "small red star 0 0" in tok.decode(seqs[0])
    assert "large orange cross 2 2" in tok.decode(seqs[1]) and "large orange cross 2 2" in tok.decode(seqs[2])
    assert seqs[0][-1] == tok.ids["boi"]
    assert [a for a in anchors[0] if a >= 0] == [0] and [a for a in anchors[1] if a >= 0] == [2 * 4 + 2]
    assert seqs[3] == unconditional and anchors[3] == [-1] * 3  # the second plan has one entry


def test_sampling_with_region_guidance(image_tok, bundled_text, monkeypatch):  # noqa: F811
    model = build(image_tok, bundled_text, layout_plan=True, plan_anchors=True)
    tok, grid = model.text, model.config.grid_size
    written = tok.encode("small red star 0 0, large orange cross 2 2")
    monkeypatch.setattr(generate_module, "write_plans", lambda model, prompts, use_cache=True: [written] * len(prompts))
    plain_trace, none_trace, region_trace = [], [], []
    plain = generate_image_codes(model, ["a red star and an orange cross"], 3.0, seed=2, logits_trace=plain_trace)
    zero = generate_image_codes(model, ["a red star and an orange cross"], 3.0, seed=2, region_guidance=0.0,
                                logits_trace=none_trace)
    assert torch.equal(zero, plain)  # region guidance 0 is plain guidance
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(plain_trace, none_trace))
    plans = []
    generate_image_codes(model, ["a red star and an orange cross"], 3.0, seed=2, region_guidance=4.0,
                         logits_trace=region_trace, plan_trace=plans)
    assert plans == ["small red star 0 0, large orange cross 2 2"]
    guided = region_weights([parse_plan(plans[0], grid)], grid)[0].sum(-1) > 0
    assert guided[0] and not guided.all() and len(region_trace) == len(plain_trace)
    # cell 0 is drawn from the same (empty) grid in both runs: the star's branch moves its logits
    assert not torch.allclose(region_trace[0], plain_trace[0], atol=1e-4)
    place_trace = []
    placed = generate_image_codes(model, ["a red star and an orange cross"], 3.0, seed=2, place_guidance=0.0,
                                  logits_trace=place_trace)
    assert torch.equal(placed, plain) and all(torch.allclose(x, y, atol=1e-4) for x, y in zip(plain_trace, place_trace))
    place_trace = []
    generate_image_codes(model, ["a red star and an orange cross"], 3.0, seed=2, place_guidance=2.0,
                         logits_trace=place_trace)
    assert not torch.allclose(place_trace[0], plain_trace[0], atol=1e-4)  # the plan's place, amplified
    with pytest.raises(ValueError, match="needs a model that writes layout plans"):
        generate_image_codes(build(image_tok, bundled_text), ["a red star"], 3.0, region_guidance=1.0)
    with pytest.raises(ValueError, match="needs a model that writes layout plans"):
        generate_image_codes(build(image_tok, bundled_text), ["a red star"], 3.0, place_guidance=1.0)
    with pytest.raises(ValueError, match="not both"):
        generate_image_codes(model, ["a red star"], 3.0, place_guidance=1.0, region_guidance=1.0)
    with pytest.raises(ValueError, match="give a guidance_scale"):
        generate_image_codes(model, ["a red star"], None, region_guidance=1.0)
    with pytest.raises(ValueError, match="≥ 0"):
        generate_image_codes(model, ["a red star"], 3.0, region_guidance=-1.0)
