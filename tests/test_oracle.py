"""The scene oracle: colour segmentation, shape reading, the GenEval judge, prompts, save/load and the
benchmark script (on a tiny random multimodal model)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from evotok.data.scenes import (COLOURS, HELDOUT_PAIRS, TRAIN_PAIRS, SceneObject, SceneWorld, _background_array,
                                _sample_background, vocabulary)
from evotok.hub import CheckpointError
from evotok.images import pil_to_tensor
from evotok.oracle import (GENEVAL_CATEGORIES, OracleConfig, PromptSpec, SceneOracle, calibrate_thresholds,
                           false_spec, geneval_prompts, judge, reference_renders, render_accuracy, render_spec,
                           segment_colours, to_uint8_images)

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "oracle"


@pytest.fixture(scope="module")
def oracle() -> SceneOracle:
    """The bundled oracle, or (before one is trained) a small one trained here in seconds."""
    if (BUNDLED / "model.safetensors").is_file():
        return SceneOracle.from_pretrained(BUNDLED)
    from training.train_oracle import build_dataset, train_classifier

    torch.manual_seed(0)
    model = SceneOracle(OracleConfig())
    crops, labels = build_dataset(model, scenes=300, others=150, seed=5, progress=None)
    train_classifier(model, crops, labels, epochs=8, batch_size=64, progress=None)
    return model.eval()


def as_detections(objects: list[SceneObject]) -> list[dict]:
    """What a perfect oracle would report for rendered objects."""
    return [{"shape": o.shape, "colour": o.colour, "centre": o.centre, "bbox": o.bbox,
             "area": int((o.extent * 64) ** 2)} for o in objects]


# ---------------------------------------------------------------------------- segmentation


def test_calibrated_thresholds_keep_every_background_pixel_out():
    thresholds = calibrate_thresholds(samples=40, seed=3)
    assert len(thresholds) == len(COLOURS) and all(t > 0 for t in thresholds)
    rng = np.random.default_rng(3)  # the same backgrounds the calibration saw, rendered as images
    for _ in range(40):
        background = _background_array(_sample_background(rng), 64)
        components, _ = segment_colours(np.ascontiguousarray(background), thresholds, min_area=1, min_core_area=0)
        assert components == []


def test_segmentation_finds_each_object_of_held_out_scenes_in_its_colour():
    world = SceneWorld(64, seed=11, split="heldout")
    for i in range(25):
        sample = world[i]
        components, _ = segment_colours(np.asarray(sample.image), OracleConfig().colour_thresholds)
        objects = sample.attributes["objects"]
        assert sorted(c.colour for c in components) == sorted(o["colour"] for o in objects)
        for obj in objects:
            x0, y0, x1, y1 = (v * 64 for v in obj["bbox"])
            assert any(c.colour == obj["colour"] and x0 <= c.centroid[0] <= x1 and y0 <= c.centroid[1] <= y1
                       for c in components)


def test_images_are_read_from_pil_arrays_and_tensors_alike():
    image = SceneWorld(64, seed=2, split="heldout")[0].image
    from_pil = to_uint8_images(image)[0]
    from_tensor = to_uint8_images(pil_to_tensor(image))[0]
    assert np.abs(from_pil.astype(int) - from_tensor.astype(int)).max() <= 1
    assert to_uint8_images(image.resize((128, 128)), 64)[0].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="3 H W"):
        to_uint8_images(torch.zeros(2, 4, 8, 8))
    with pytest.raises(TypeError):
        to_uint8_images("not an image")


# ---------------------------------------------------------------------------- the oracle


def test_oracle_reads_shape_colour_and_place_of_held_out_scenes(oracle):
    world = SceneWorld(64, seed=31, split="heldout")
    samples = [world[i] for i in range(30)]
    found = oracle.detect([s.image for s in samples])
    hits = total = extra = 0
    for detections, sample in zip(found, samples):
        objects = sample.attributes["objects"]
        total += len(objects)
        extra += max(0, len(detections) - len(objects))
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            hits += any((d["shape"], d["colour"]) == (obj["shape"], obj["colour"])
                        and x0 <= d["centre"][0] <= x1 and y0 <= d["centre"][1] <= y1 for d in detections)
    assert hits / total >= 0.9
    assert extra <= 0.05 * total
    keys = {"shape", "colour", "centre", "bbox", "area", "score"}
    assert all(keys <= set(d) for dets in found for d in dets)


def test_oracle_calls_strange_blobs_and_colour_noise_other(oracle):
    from training.train_oracle import colour_noise, other_blobs

    rng = np.random.default_rng(123)
    images = [other_blobs(rng) for _ in range(12)] + [colour_noise(rng) for _ in range(12)]
    detections = oracle.detect(images)
    kept = sum(len(d) for d in detections)
    raw = sum(len(d) for d in oracle.detect(images, keep_other=True))
    assert raw > 0 and kept <= 0.25 * raw


def test_save_load_round_trip(oracle, tmp_path):
    oracle.save_pretrained(tmp_path / "oracle")
    loaded = SceneOracle.from_pretrained(tmp_path / "oracle")
    assert loaded.config == oracle.config
    images = [SceneWorld(64, seed=8, split="heldout")[i].image for i in range(4)]
    assert loaded.detect(images) == oracle.detect(images)
    (tmp_path / "oracle" / "config.json").write_text('{"model_type": "evotok_mllm"}')
    with pytest.raises(CheckpointError, match="evotok_mllm"):
        SceneOracle.from_pretrained(tmp_path / "oracle")


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="colour_thresholds"):
        OracleConfig(colour_thresholds=(50.0,))
    with pytest.raises(ValueError, match="classes"):
        OracleConfig(classes=("circle", "blob"))


# ---------------------------------------------------------------------------- prompts


def test_prompts_use_only_held_out_pairs_and_familiar_words():
    specs = geneval_prompts(12, seed=4)
    assert [s.category for s in specs].count("counting") == 12
    assert {s.category for s in specs} == set(GENEVAL_CATEGORIES)
    known = set(vocabulary())
    for spec in specs:
        assert all(pair in HELDOUT_PAIRS for pair in spec.objects)
        for colour, shape in spec.objects:
            assert colour in spec.prompt and shape in spec.prompt
        assert set(re.findall(r"[a-z]+", spec.prompt)) <= known, spec.prompt
        if spec.category == "colour_attribution":
            (c1, s1), (c2, s2) = spec.objects
            assert c1 != c2 and s1 != s2
    assert geneval_prompts(12, seed=4) == specs
    assert geneval_prompts(12, seed=5) != specs


def test_prompt_specs_are_validated():
    with pytest.raises(ValueError, match="category"):
        PromptSpec("colors", "a red star", (("red", "star"),))
    with pytest.raises(ValueError, match="count"):
        PromptSpec("counting", "red stars", (("red", "star"),))
    with pytest.raises(ValueError, match="relation"):
        PromptSpec("position", "a red star near a blue cross", (("red", "star"), ("blue", "cross")), relation="near")
    with pytest.raises(ValueError, match="2 object"):
        PromptSpec("two_objects", "a red star", (("red", "star"),))


# ---------------------------------------------------------------------------- the judge


def test_judge_accepts_true_specs_and_rejects_near_misses_in_every_category():
    specs = geneval_prompts(6, seed=9)
    for i, spec in enumerate(specs):
        image, objects = render_spec(spec, np.random.default_rng(i))
        detections = as_detections(objects)
        assert judge(spec, detections), spec
        wrong = false_spec(spec, np.random.default_rng(i))
        assert wrong != spec
        assert not judge(wrong, detections), (spec, wrong)
        if spec.background is not None:
            assert image.size == (64, 64)


def test_drawing_breakdown_counts_what_the_oracle_found():
    from training.bench_geneval import breakdown_markdown, drawing_breakdown

    def det(colour, shape):
        return {"shape": shape, "colour": colour, "centre": (0.5, 0.5), "area": 100}

    specs = [PromptSpec("two_objects", "", (("red", "star"), ("blue", "cross"))),
             PromptSpec("two_objects", "", (("red", "star"), ("blue", "cross"))),
             PromptSpec("counting", "", ((None, "star"),), count=3)]
    detections = [[det("red", "cross"), det("blue", "star")],  # both colours and shapes, neither pair
                  [det("red", "star")],
                  [det("green", "star"), det("green", "star")]]
    found = drawing_breakdown(specs, detections)
    two = found["two_objects"]
    assert (two["n"], two["asked"], two["found"]) == (2, 2.0, 1.5)
    assert (two["shape"], two["colour"], two["pair"]) == (0.75, 0.75, 0.25)
    assert (two["fewer"], two["more"]) == (0.5, 0.0)
    counting = found["counting"]
    assert (counting["asked"], counting["found"], counting["shape"]) == (3.0, 2.0, 1.0)
    assert np.isnan(counting["colour"]) and np.isnan(counting["pair"])  # the prompt names no colour
    assert "| counting | 1 | 3.00 | 2.00 | 1.00 | 0.00 | 1.00 | – | – |" in breakdown_markdown(found)
    extra = drawing_breakdown(specs[:1], [[det("red", "star"), det("blue", "cross"), det("blue", "cross")]])
    assert (extra["two_objects"]["fewer"], extra["two_objects"]["more"]) == (0.0, 1.0)


def test_one_object_prompts_are_counted_by_pair(oracle):
    from training.bench_geneval import by_pair_markdown, one_object_by_pair

    def det(colour, shape):
        return {"shape": shape, "colour": colour, "centre": (0.5, 0.5), "bbox": (0.3, 0.3, 0.7, 0.7), "area": 100}

    specs = [PromptSpec("single_object", "", (("red", "star"),)), PromptSpec("colours", "", (("red", "star"),)),
             PromptSpec("single_object", "", (("blue", "cross"),)),
             PromptSpec("two_objects", "", (("red", "star"), ("blue", "cross"))),  # not a one-object prompt
             PromptSpec("counting", "", ((None, "star"),), count=1)]
    detections = [[det("red", "star")], [det("red", "circle")], [], [det("red", "star")], [det("red", "star")]]
    verdicts = [judge(s, d, oracle.config.position_margin) for s, d in zip(specs, detections)]
    table = one_object_by_pair(specs, detections, verdicts)
    assert table == {"blue cross": {"passed": 0.0, "shape": 0.0, "colour": 0.0, "n": 1},
                     "red star": {"passed": 0.5, "shape": 0.5, "colour": 1.0, "n": 2}}
    assert "| red star | 2 | 0.50 | 0.50 | 1.00 |" in by_pair_markdown(table)


def test_candidate_table_counts_accepted_draws_and_prompts_with_any():
    from types import SimpleNamespace

    from training.bench_geneval import candidates_markdown, judge_candidates

    def det(colour, shape):
        return {"shape": shape, "colour": colour, "centre": (0.5, 0.5), "area": 100}

    specs = [PromptSpec("single_object", "a red star", (("red", "star"),)),
             PromptSpec("single_object", "a blue cross", (("blue", "cross"),)),
             PromptSpec("colours", "a green circle", (("green", "circle"),))]
    # candidate codes carry their own index; the fake decoder passes it on as the "image" (in [-1, 1])
    candidates = torch.arange(9).view(3, 3, 1, 1, 1)
    right = {0: det("red", "star"), 1: det("red", "star"), 5: det("blue", "cross")}
    model = SimpleNamespace(device="cpu", decode_codes=lambda codes: codes.flatten() / 100)
    oracle = SimpleNamespace(config=SimpleNamespace(position_margin=0.08),
                             detect=lambda images: [[right.get(round(float(i) * 100), det("white", "square"))] for i in images])
    picks = {"caption": torch.tensor([0, 2, 1]), "contrast": torch.tensor([1, 1, 0])}  # a candidate per prompt
    records = [{} for _ in specs]
    table = judge_candidates(model, oracle, specs, candidates, picks, records)
    # each prompt's record keeps its candidates' verdicts and the judges' picks, to compare judges prompt by prompt
    assert records[0] == {"candidates_passed": [True, True, False], "picks": {"caption": 0, "contrast": 1}}
    assert records[1]["candidates_passed"] == [False, False, True] and records[1]["picks"]["caption"] == 2
    # 3 of 6 draws; both prompts have one; the caption picks find both, the contrast picks one
    assert table["single_object"] == {"mean": 0.5, "any": 1.0, "n": 2, "picked_by": {"caption": 1.0, "contrast": 0.5}}
    assert table["colours"] == {"mean": 0.0, "any": 0.0, "n": 1, "picked_by": {"caption": 0.0, "contrast": 0.0}}
    assert table["overall"] == {"mean": 0.25, "any": 0.5, "n": 3, "picked_by": {"caption": 0.5, "contrast": 0.25}}
    generated = {"single_object": {"score": 0.5}, "colours": {"score": 0.0}, "overall": {"score": 0.25}}
    assert "| single_object | 2 | 0.500 | 0.500 | 1.000 |" in candidates_markdown(generated, table, ["contrast"])
    both = candidates_markdown(generated, table, ["contrast", "caption"])
    assert "caption judge's pick" in both and "| single_object | 2 | 0.500 | 1.000 | 0.500 | 1.000 |" in both


def test_judge_rules_on_handmade_detections():
    def det(colour, shape, x, y, area=100):
        return {"shape": shape, "colour": colour, "centre": (x, y), "area": area}

    three = [det("red", "star", 0.2, 0.2), det("red", "star", 0.5, 0.5), det("red", "star", 0.8, 0.8)]
    assert judge(PromptSpec("counting", "", (("red", "star"),), count=3), three)
    assert not judge(PromptSpec("counting", "", (("red", "star"),), count=2), three)
    assert not judge(PromptSpec("counting", "", (("red", "star"),), count=3), three + [det("red", "star", 0.1, 0.9)])
    # a blue star does not count as a red one, but a "colours" verdict reads the largest star
    mixed = [det("red", "star", 0.2, 0.2, area=50), det("blue", "star", 0.7, 0.7, area=300)]
    assert judge(PromptSpec("single_object", "", (("red", "star"),)), mixed)
    assert not judge(PromptSpec("colours", "", (("red", "star"),)), mixed)
    assert judge(PromptSpec("colours", "", (("blue", "star"),)), mixed)
    # position: the offset must pass the margin and dominate the other axis
    a, b = ("red", "star"), ("blue", "cross")
    left = PromptSpec("position", "", (a, b), relation="left of")
    assert judge(left, [det(*a, 0.2, 0.5), det(*b, 0.7, 0.55)])
    assert not judge(left, [det(*a, 0.45, 0.5), det(*b, 0.5, 0.5)])  # within the margin
    assert not judge(left, [det(*a, 0.2, 0.1), det(*b, 0.4, 0.8)])  # mostly below, not left
    assert judge(PromptSpec("position", "", (a, b), relation="above"), [det(*a, 0.5, 0.1), det(*b, 0.5, 0.8)])
    # colour attribution: swapped colours fail
    attr = PromptSpec("colour_attribution", "", (("red", "star"), ("blue", "cross")))
    assert judge(attr, [det("red", "star", 0.2, 0.2), det("blue", "cross", 0.7, 0.7)])
    assert not judge(attr, [det("blue", "star", 0.2, 0.2), det("red", "cross", 0.7, 0.7)])
    # detections flagged invalid (keep_other=True) never count
    invalid = [{**det("red", "star", 0.5, 0.5), "valid": False}]
    assert not judge(PromptSpec("single_object", "", (("red", "star"),)), invalid)


def test_oracle_judges_renders_of_true_and_false_prompts(oracle):
    specs = geneval_prompts(8, seed=21)
    result = render_accuracy(oracle, specs, reference_renders(specs, seed=21), seed=21)
    assert set(result) == {*GENEVAL_CATEGORIES, "overall"}
    for category in GENEVAL_CATEGORIES:
        assert result[category]["n"] == 8
        assert result[category]["true_accept"] >= 0.75, (category, result[category])
        assert result[category]["false_reject"] >= 0.75, (category, result[category])
    assert result["overall"]["true_accept"] >= 0.9 and result["overall"]["false_reject"] >= 0.9


# ---------------------------------------------------------------------------- the benchmark script


def tiny_mllm(folder: Path, **options) -> Path:
    """A random 32-px multimodal model saved with its tokenizer (what the benchmark loads);
    ``options`` go to its config."""
    from evotok.mllm import EvoTokMLLM, TextTokenizer, qwen2_lm_config
    from test_mllm import tiny_tokenizer

    tok = tiny_tokenizer(seed=0)
    tok.save_pretrained(folder / "tok")
    captions = [s.prompt for s in geneval_prompts(10, seed=0)]
    text = TextTokenizer.train(captions, vocab_size=300, min_frequency=1)
    lm = qwen2_lm_config(len(text), hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    model = EvoTokMLLM.build(tok, text, image_tokenizer_path=str(folder / "tok"), lm_config=lm, depth_width=32,
                             depth_heads=2, depth_layers=1, max_prompt_tokens=64, **options)
    model.save_pretrained(folder / "mllm")
    return folder / "mllm"


def test_benchmark_scores_generations_and_the_render_ceiling(oracle, tmp_path):
    from training.bench_geneval import main

    oracle.save_pretrained(tmp_path / "oracle")
    ceiling = main(["--renders-only", "--oracle", str(tmp_path / "oracle"), "--per-category", "2"])
    assert ceiling["model"] is None and "generated" not in ceiling
    assert ceiling["renders"]["overall"]["n"] == 12 and ceiling["pairs"] == "heldout"
    seen = main(["--renders-only", "--oracle", str(tmp_path / "oracle"), "--per-category", "2", "--pairs", "train"])
    assert seen["pairs"] == "train" and seen["renders"]["overall"]["n"] == 12
    for result, pairs in ((ceiling, HELDOUT_PAIRS), (seen, TRAIN_PAIRS)):
        assert {tuple(o[:2]) for p in result["prompts"] for o in p["objects"]} <= set(pairs)

    model = tiny_mllm(tmp_path)
    out = tmp_path / "geneval.json"
    result = main(["--model", str(model), "--oracle", str(tmp_path / "oracle"), "--per-category", "1",
                   "--no-fid", "--batch-size", "6", "--threads", "1", "--json", str(out),
                   "--save-images", str(tmp_path / "images")])
    assert set(result["generated"]) == {*GENEVAL_CATEGORIES, "overall"}
    assert all(0.0 <= v["score"] <= 1.0 for v in result["generated"].values())
    assert set(result["reconstructions"]) == {*GENEVAL_CATEGORIES, "overall"}
    assert result["seconds_per_image"] > 0 and result["image_size"] == 32
    assert len(result["prompts"]) == 6 and out.is_file()
    assert len(list((tmp_path / "images").glob("*.png"))) == 6
    assert set(result["found"]) == set(GENEVAL_CATEGORIES) and result["sampling"]["best_of"] == 1
    assert sum(r["n"] for r in result["one_object_by_pair"].values()) == 2  # single object and colours

    picked = main(["--model", str(model), "--oracle", str(tmp_path / "oracle"), "--per-category", "1",
                   "--no-fid", "--batch-size", "6", "--threads", "1", "--best-of", "2", "--attribute-guidance", "1"])
    assert picked["sampling"]["best_of"] == 2 and len(picked["prompts"]) == 6
    assert picked["sampling"]["attribute_guidance"] == 1.0
    with pytest.raises(SystemExit):  # attribute guidance mixes guidance branches: none without guidance
        main(["--model", str(model), "--oracle", str(tmp_path / "oracle"), "--guidance", "0", "--attribute-guidance", "1"])
    pool = picked["candidates"]
    assert set(pool) == {*GENEVAL_CATEGORIES, "overall"} and pool["overall"]["n"] == 6
    for cat in GENEVAL_CATEGORIES:  # a perfect judge keeps an accepted candidate whenever one exists
        assert 0.0 <= pool[cat]["mean"] <= pool[cat]["any"] <= 1.0
        assert pool[cat]["any"] >= picked["generated"][cat]["score"]
    assert "plans" not in result and "plan" not in result["prompts"][0]

    both = main(["--model", str(model), "--oracle", str(tmp_path / "oracle"), "--per-category", "1",
                 "--no-fid", "--batch-size", "6", "--threads", "1", "--best-of", "2", "--judge", "contrast", "caption"])
    assert both["sampling"]["judge"] == "contrast" and both["sampling"]["judges"] == ["contrast", "caption"]
    for cat in [*GENEVAL_CATEGORIES, "overall"]:  # each judge's picks are scored on the same candidates
        picks = both["candidates"][cat]["picked_by"]
        assert set(picks) == {"contrast", "caption"}
        assert all(0.0 <= v <= both["candidates"][cat]["any"] for v in picks.values())
    with pytest.raises(SystemExit):
        main(["--model", str(model), "--oracle", str(tmp_path / "oracle"), "--best-of", "2", "--judge", "oracle"])


def test_benchmark_reports_a_planning_models_plans(oracle, tmp_path):
    from training.bench_geneval import main

    oracle.save_pretrained(tmp_path / "oracle")
    model = tiny_mllm(tmp_path, layout_plan=True, max_plan_tokens=4)
    result = main(["--model", str(model), "--oracle", str(tmp_path / "oracle"), "--per-category", "1",
                   "--no-fid", "--batch-size", "6", "--threads", "1", "--best-of", "2"])
    assert set(result["plans"]) == set(GENEVAL_CATEGORIES)
    assert all(isinstance(r["plan"], str) for r in result["prompts"])
    # an untrained planner writes no well-formed plan, so none is judged
    assert all(r["plan_passed"] is None for r in result["prompts"])
    assert all(t["parsed"] == 0.0 and t["n_accepted"] == 0 for t in result["plans"].values())
    assert all(t["entries"] == 0 for t in result["plan_following"].values())  # nothing planned, nothing to find
    region = main(["--model", str(model), "--oracle", str(tmp_path / "oracle"), "--per-category", "1",
                   "--no-fid", "--batch-size", "6", "--threads", "1", "--region-guidance", "2"])
    assert region["sampling"]["region_guidance"] == 2.0


def test_plans_are_judged_as_they_stand_and_images_against_their_accepted_plans():
    from training.bench_geneval import judge_plans, plans_markdown

    specs = [PromptSpec("position", "a red star left of a blue cross", (("red", "star"), ("blue", "cross")),
                        relation="left of"),
             PromptSpec("position", "a red star left of a blue cross", (("red", "star"), ("blue", "cross")),
                        relation="left of"),
             PromptSpec("counting", "two green circles", (("green", "circle"),), count=2),
             PromptSpec("counting", "two green circles", (("green", "circle"),), count=2)]
    plans = ["small red star 3 1, large blue cross 3 6",    # right
             "small red star 3 6, large blue cross 3 1",    # the relation reversed
             "small green circle 1 1, small green circle 5 5",
             "small green circle 1"]                        # malformed
    table, verdicts = judge_plans(specs, plans, [True, True, False, True], grid=8, margin=0.08)
    assert verdicts == [True, False, True, None]
    assert table["position"] == {"parsed": 1.0, "accepted": 0.5, "image_given_plan": 1.0, "n": 2, "n_accepted": 1}
    assert table["counting"] == {"parsed": 0.5, "accepted": 0.5, "image_given_plan": 0.0, "n": 2, "n_accepted": 1}
    assert "| position | 2 | 1.00 | 0.50 | 1.00 (1) |" in plans_markdown(table)


def test_plan_following_counts_planned_cells_with_a_drawn_object_against_another_plans_cells():
    from types import SimpleNamespace

    from training.bench_geneval import following_markdown, plan_following

    def found(colour, shape, row, col):  # a detection centred in cell (row, col) of an 8×8 grid
        return {"colour": colour, "shape": shape, "centre": ((col + 0.5) / 8, (row + 0.5) / 8)}

    specs = [SimpleNamespace(category="single_object")] * 3
    plans = ["small red star 1 1", "small red star", "small blue cross 6 6"]  # the second does not parse
    detections = [[found("red", "star", 1, 2)],        # one cell off: at the planned cell, as planned
                  [found("blue", "cross", 6, 6)],      # at the next prompt's planned cell
                  [found("red", "star", 1, 1)]]        # far from its own plan, on the next (first) prompt's
    table = plan_following(specs, plans, detections, grid=8)["single_object"]
    assert table == {"object_at_cell": 0.5, "planned_object_at_cell": 0.5, "other_plan_cell": 1.0, "entries": 2}
    assert "| single_object | 2 | 0.50 | 0.50 | 1.00 |" in following_markdown({"single_object": table})
