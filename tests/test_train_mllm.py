"""training/train_mllm.py end to end on the tiny config: losses fall, resume is exact, stage 1
freezes the LM and stage 2 continues from stage 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evotok.mllm import EvoTokMLLM
from test_mllm import tiny_tokenizer
from training.train_mllm import main, param_groups

CONFIG = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "mllm_tiny_test.yaml")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mllm_train")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    return folder


def run(root: Path, name: str, *overrides: str, resume: bool = False) -> dict:
    argv = ["--config", CONFIG, "--set", f"model.image_tokenizer={root / 'tokenizer'}", f"data.cache_dir={root / 'cache'}",
            f"train.output_dir={root / name}", *overrides]
    threads = torch.get_num_threads()
    try:
        return main(argv + (["--resume"] if resume else []))
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_joint_training_lowers_both_losses(root):
    summary = run(root, "joint", "train.steps=30", "train.eval_every=30", "train.save_every=100")
    first, last = summary["eval"][0], summary["eval"][-1]
    assert (first["step"], last["step"]) == (0, 30)
    assert last["lm_loss"] < first["lm_loss"]
    assert last["depth_loss"] < first["depth_loss"]
    assert 0.0 <= last["answer_accuracy"] <= 1.0 and any(k.startswith("accuracy_") for k in last)
    logged = summary["history"][-1]
    assert {"lm_loss", "depth_loss", "depth_loss_stage1", "depth_loss_stage2"} <= set(logged)
    lines = (root / "joint" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 30]

    model = EvoTokMLLM.from_pretrained(root / "joint" / "final")
    codes = model.generate_image("a red circle", seed=0)
    assert codes.shape == (1, 4, 4, 2)
    assert isinstance(model.answer(torch.zeros(3, 32, 32), "What colour is the circle?", stream=False), str)
    assert "circle" in model.known_words()


def test_resume_continues_exactly(root):
    run(root, "straight", "train.steps=6")
    run(root, "resumed", "train.steps=3")
    run(root, "resumed", "train.steps=6", resume=True)
    a, b = weights(root / "straight" / "final"), weights(root / "resumed" / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(root / "straight" / "training_state.pt", weights_only=False)
    state_b = torch.load(root / "resumed" / "training_state.pt", weights_only=False)
    assert state_a["step"] == state_b["step"] == 6
    assert state_a["scheduler"] == state_b["scheduler"]


def test_stage_one_freezes_the_lm_and_stage_two_trains_it(root):
    run(root, "init", "train.steps=0", "train.train_lm=false")
    run(root, "stage1", "train.steps=3", "train.train_lm=false")
    run(root, "stage2", "train.steps=2", "train.train_lm=true", f"model.init_from={root / 'stage1' / 'final'}")
    init, stage1, stage2 = (weights(root / name / "final") for name in ("init", "stage1", "stage2"))
    layer = "lm.model.layers.0.mlp.up_proj.weight"
    assert torch.equal(init[layer], stage1[layer]) and not torch.equal(stage1[layer], stage2[layer])
    for name in ("projector.1.weight", "depth.head_weight", "lm.model.embed_tokens.weight"):
        assert not torch.equal(init[name], stage1[name]), name
    config = json.loads((root / "stage2" / "final" / "config.json").read_text())
    assert config["image_tokenizer"] == str(root / "tokenizer")


def test_a_later_stage_can_add_the_projector_context_and_a_refitted_tokenizer(root):
    from evotok.model import EvoTok

    run(root, "base", "train.steps=1")
    # the same tokenizer with its semantic decoder changed (as after training/tune_semantic.py)
    tokenizer = EvoTok.from_pretrained(root / "tokenizer")
    with torch.no_grad():
        for p in tokenizer.semantic_decoder.parameters():
            p.add_(0.01)
    tokenizer.save_pretrained(root / "tokenizer_refit")
    overrides = (f"model.init_from={root / 'base' / 'final'}", f"model.image_tokenizer={root / 'tokenizer_refit'}",
                 f"data.cache_dir={root / 'cache_refit'}", "train.steps=2")
    with pytest.raises(Exception, match="differ from the ones this model was trained with"):
        run(root, "refit_refused", *overrides)
    run(root, "refit", *overrides, "model.new_image_tokenizer=true", "model.projector_context_layers=1")
    model = EvoTokMLLM.from_pretrained(root / "refit" / "final")  # pins (and finds) the new tokenizer
    assert model.config.image_tokenizer == str(root / "tokenizer_refit")
    assert model.config.projector_context_layers == 1
    assert "projector_context.out.weight" in weights(root / "refit" / "final")


def test_a_later_stage_can_add_grid_axes_with_their_own_learning_rate(root):
    run(root, "axes_base", "train.steps=1")
    run(root, "axes", f"model.init_from={root / 'axes_base' / 'final'}", "model.grid_axis_embeddings=true",
        "train.position_lr_scale=10", "train.steps=2")
    model = EvoTokMLLM.from_pretrained(root / "axes" / "final")
    assert model.config.grid_axis_embeddings
    learned = weights(root / "axes" / "final")
    assert float(learned["grid_rows"].abs().sum()) > 0 and float(learned["grid_cols"].abs().sum()) > 0  # from zero

    groups = param_groups(model, 1e-3, 10.0)
    assert [g.get("lr") for g in groups] == [None, pytest.approx(1e-2)]
    assert {id(p) for p in groups[1]["params"]} == {id(model.grid_pos), id(model.grid_rows), id(model.grid_cols)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert [id(p) for p in param_groups(model, 1e-3, 1.0)[0]["params"]] == [id(p) for p in trainable]  # old order


def test_a_later_stage_with_place_questions_learns_their_words(root):
    run(root, "place_base", "train.steps=1")
    question = "Is the star left or right of the middle of the image?"
    assert "middle" in EvoTokMLLM.from_pretrained(root / "place_base" / "final").unknown_words(question)
    run(root, "place", f"model.init_from={root / 'place_base' / 'final'}", "data.resample_scene_questions=true",
        "data.place_questions=true", "train.steps=1")
    assert EvoTokMLLM.from_pretrained(root / "place" / "final").unknown_words(question) == []


def test_a_later_stage_can_switch_on_grid_rotary_positions(root):
    run(root, "rope_base", "train.steps=1")
    run(root, "rope", f"model.init_from={root / 'rope_base' / 'final'}", "model.grid_rope=true", "train.steps=1")
    assert not EvoTokMLLM.from_pretrained(root / "rope_base" / "final").config.grid_rope
    model = EvoTokMLLM.from_pretrained(root / "rope" / "final")
    assert model.config.grid_rope
    assert set(weights(root / "rope" / "final")) == set(weights(root / "rope_base" / "final"))  # no new weights
    run(root, "rope_wide", f"model.init_from={root / 'rope' / 'final'}", "model.grid_rope_stride=4", "train.steps=1")
    assert EvoTokMLLM.from_pretrained(root / "rope_wide" / "final").config.grid_rope_stride == 4


def test_a_later_stage_can_switch_to_the_codebook_head(root):
    run(root, "head_base", "train.steps=1")
    run(root, "head", f"model.init_from={root / 'head_base' / 'final'}", "model.depth_head=codebook",
        "model.depth_head_width=16", "train.steps=2")
    model = EvoTokMLLM.from_pretrained(root / "head" / "final")
    assert (model.config.depth_head, model.config.depth_head_width) == ("codebook", 16)
    before, after = weights(root / "head_base" / "final"), weights(root / "head" / "final")
    assert {"depth.head_weight", "depth.head_bias"} <= set(before) - set(after)
    assert {k for k in set(after) - set(before)} == {k for k in after if k.startswith("depth.code_head.")}
    assert after["depth.code_head.query"].shape[-1] == 16


def test_a_later_stage_can_add_the_cell_attribute_loss(root):
    run(root, "cells_base", "train.steps=1")
    summary = run(root, "cells", f"model.init_from={root / 'cells_base' / 'final'}", "train.cell_attribute_weight=0.5",
                  "train.steps=2")
    assert all(h["cell_attribute_loss"] > 0 for h in summary["history"])
    assert EvoTokMLLM.from_pretrained(root / "cells" / "final").config.cell_attribute_head
    added = set(weights(root / "cells" / "final")) - set(weights(root / "cells_base" / "final"))
    assert added == {f"cell_attributes.{a}.{p}" for a in ("colour", "shape") for p in ("weight", "bias")}
    scratch = run(root, "cells_scratch", "train.cell_attribute_weight=0.5", "train.steps=2")
    assert "cell_attribute_loss" in scratch["history"][-1]


def test_loader_workers_give_the_same_run(root):
    run(root, "serial_batches", "train.steps=4")
    run(root, "worker_batches", "train.steps=4", "train.num_workers=2")
    a, b = weights(root / "serial_batches" / "final"), weights(root / "worker_batches" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_refits_the_total_from_the_speed_since_the_last_fit(monkeypatch):
    from training import train_mllm

    clock = [1000.0]
    monkeypatch.setattr(train_mllm.time, "time", lambda: clock[0])
    budget = train_mllm.TimeBudget(10.0, start_step=10, max_steps=100_000)  # 600 s from now
    skip, (first, second, third) = budget.SKIP, budget.FIT_AT
    fits = {}
    for done in range(1, third + 6):
        clock[0] += 2.0 if done <= skip else (0.5 if done <= first else 0.25)  # slow start, then faster
        fitted = budget.fit(10 + done)
        if fitted is not None:
            fits[done] = fitted
    assert sorted(fits) == [first, second, third]  # and no fit between the points
    elapsed_first = 2.0 * skip + 0.5 * (first - skip)
    assert fits[first] == 10 + first + int((600 - elapsed_first) / 0.5)
    elapsed_second = elapsed_first + 0.25 * (second - first)
    assert fits[second] == 10 + second + int((600 - elapsed_second) / 0.25)
    assert fits[second] > fits[first]  # a later fit may lengthen the run, not only shorten it
    capped = train_mllm.TimeBudget(10.0, start_step=0, max_steps=300)
    for done in range(1, first + 1):
        clock[0] += 0.1
        fitted = capped.fit(done)
    assert fitted == 300  # never beyond train.steps
    assert train_mllm.TimeBudget(None, 0, 500).fit(25) is None


def test_a_time_budget_ends_the_run_early_with_the_schedule_decayed(root):
    summary = run(root, "budget", "train.steps=100000", "train.time_budget_minutes=0.02", "train.eval_every=100000",
                  "train.log_every=1", "train.lr=0.003", "train.min_lr=0.0003")
    state = torch.load(root / "budget" / "training_state.pt", weights_only=False)
    assert 26 <= summary["steps"] < 100000 and state["fitted_total_steps"] == state["step"] == summary["steps"]
    assert summary["history"][-1]["lr"] == pytest.approx(0.0003)  # the cosine ran its whole course


def test_finished_pools_load_without_their_image_sources(root, monkeypatch):
    from training import train_mllm

    run(root, "pools_built", "train.steps=0", "eval.at_start=false")

    def no_sources(*args, **kwargs):
        raise AssertionError("a finished pool asked for its image source")

    monkeypatch.setattr(train_mllm, "build_sources", no_sources)
    summary = run(root, "pools_cached", "train.steps=1")
    assert summary["steps"] == 1


def test_a_later_stage_refuses_a_grid_rope_stride_below_one(root):
    run(root, "stride_base", "train.steps=0", "eval.at_start=false", "model.grid_rope=true")
    with pytest.raises(ValueError, match="grid_rope_stride must be a positive integer"):
        run(root, "stride_zero", f"model.init_from={root / 'stride_base' / 'final'}", "model.grid_rope_stride=0",
            "train.steps=1")


def test_a_later_stage_can_start_writing_layout_plans(root):
    run(root, "plan_base", "train.steps=1")
    summary = run(root, "plan", f"model.init_from={root / 'plan_base' / 'final'}", "data.layout_plan=true",
                  "train.steps=2")
    assert all(h["lm_loss"] > 0 for h in summary["history"])
    model = EvoTokMLLM.from_pretrained(root / "plan" / "final")
    assert model.config.layout_plan
    assert set(weights(root / "plan" / "final")) == set(weights(root / "plan_base" / "final"))  # no new weights
    trace = []
    model.generate_image("a red circle", seed=0, plan_trace=trace)
    assert len(trace) == 1
    run(root, "plan_anchored", f"model.init_from={root / 'plan_base' / 'final'}", "data.layout_plan=true",
        "model.plan_anchors=true", "train.steps=2")
    assert EvoTokMLLM.from_pretrained(root / "plan_anchored" / "final").config.plan_anchors


def test_a_later_stage_can_add_the_plan_canvas_at_the_position_learning_rate(root):
    run(root, "canvas_base", "data.layout_plan=true", "train.steps=1")
    run(root, "canvas", f"model.init_from={root / 'canvas_base' / 'final'}", "data.layout_plan=true",
        "model.plan_canvas=true", "train.position_lr_scale=10", "train.steps=2")
    model = EvoTokMLLM.from_pretrained(root / "canvas" / "final")
    assert model.config.plan_canvas
    learned = weights(root / "canvas" / "final")
    tables = {k for k in learned if k.startswith("plan_canvas.")}
    assert tables == set(learned) - set(weights(root / "canvas_base" / "final"))  # the only new weights
    assert float(learned["plan_canvas.colour.weight"].abs().sum()) > 0  # they learn from zero
    groups = param_groups(model, 1e-3, 10.0)
    assert {id(p) for p in model.plan_canvas.parameters()} <= {id(p) for p in groups[1]["params"]}
    trace = []
    model.generate_image("a red circle", seed=0, plan_trace=trace)
    assert len(trace) == 1


def test_onset_weights_change_the_objective_and_not_the_logged_code_loss(root):
    summary = run(root, "onset", "data.onset_weight=8", "train.steps=2", "train.log_every=1")
    # scene drawings in every batch: the weighted code objective differs from the logged plain mean
    assert all(abs(h["loss"] - (h["lm_loss"] + h["depth_loss"])) > 1e-4 for h in summary["history"])
    plain = run(root, "no_onset", "train.steps=2", "train.log_every=1")
    assert all(abs(h["loss"] - (h["lm_loss"] + h["depth_loss"])) < 1e-4 for h in plain["history"])


def test_read_back_images_change_what_the_understanding_loss_sees_and_not_the_drawing(root):
    plain = run(root, "no_read_back", "train.steps=1", "train.log_every=1")
    read = run(root, "read_back", "train.read_back_rate=1.0", "train.steps=1", "train.log_every=1")
    (first_plain,), (first_read,) = plain["history"], read["history"]
    assert first_read["lm_loss"] != pytest.approx(first_plain["lm_loss"], abs=1e-6)
    assert first_read["depth_loss"] == pytest.approx(first_plain["depth_loss"], abs=1e-6)


def test_train_only_changes_the_named_modules_and_nothing_else(root):
    run(root, "only_base", "train.steps=0")
    run(root, "only", "train.steps=2", f"model.init_from={root / 'only_base' / 'final'}",
        "train.train_only=[projector]")
    before, after = weights(root / "only_base" / "final"), weights(root / "only" / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed)
    with pytest.raises(ValueError, match="match no parameter"):
        run(root, "only_bad", "train.steps=1", "train.train_only=[projecter]")
