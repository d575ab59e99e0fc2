"""training/bench_drawing_likelihood.py: the teacher-forced code likelihood it reports is the
model's own training loss, and the script runs end to end."""
from __future__ import annotations

import json

import numpy as np
import torch

from evotok.mllm.data import collate
from evotok.mllm.chat import encode_generation
from test_oracle import tiny_mllm
from evotok.data.scenes import HELDOUT_PAIRS, SceneObject
from evotok.mllm.cell_attributes import object_cells
from training.bench_drawing_likelihood import PROMPTS, by_pair, code_nll, main, prompt_variants


def test_code_nll_is_the_depth_loss_of_the_training_step(tmp_path):
    from evotok.mllm import EvoTokMLLM

    model = EvoTokMLLM.from_pretrained(tiny_mllm(tmp_path)).eval()
    g, depth = model.config.grid_size, model.config.pixel_depth
    codes = torch.randint(0, model.tokenizer.config.codebook_size, (2, g, g, depth))
    prompts = ["a red star", "an image of a blue cross and a white square"]  # lengths differ: left padding
    nll = code_nll(model, prompts, codes)
    assert nll.shape == (2, g * g, depth) and (nll > 0).all()
    for k, prompt in enumerate(prompts):
        encoded = encode_generation(model.text, prompt, g * g, model.config.max_prompt_tokens)
        item = {"task": "t2i", "image_codes": None, "gen_codes": codes[k].numpy(), "exclusions": [],
                "input_ids": encoded.input_ids, "labels": encoded.labels, "image_mask": encoded.image_mask,
                "gen_mask": encoded.gen_mask}
        batch = collate([item], model.text.ids["pad"])
        with torch.no_grad():
            out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], gen_mask=batch["gen_mask"],
                        gen_codes=batch["gen_codes"])
        assert torch.allclose(nll[k].mean(), out.depth_loss, atol=1e-4)


def test_prompt_variants_change_one_word_each():
    rng = np.random.default_rng(0)
    v = prompt_variants("an orange hexagon on a plain background", "orange", "hexagon", rng)
    assert set(v) == set(PROMPTS)
    assert v["caption"] == "an orange hexagon on a plain background" and v["empty"] == ""
    assert v["another shape"].startswith("an orange ") and "hexagon" not in v["another shape"]
    assert "orange" not in v["another colour"] and v["another colour"].split()[2] == "hexagon"
    assert v["shapes only"] == "a hexagon on a plain background"
    assert v["colours only"] == "an orange object on a plain background"


def test_object_cells_cover_the_box_or_at_least_the_centre_cell():
    large = SceneObject("star", "red", "large", (0.5, 0.5))  # drawn within 0.32-0.68: centres 0.4375, 0.5625
    assert object_cells(large, 8).reshape(8, 8)[3:5, 3:5].all() and object_cells(large, 8).sum() == 4
    small = SceneObject("star", "red", "small", (0.3, 0.3))  # box 0.19-0.41: no centre of a 4×4 grid
    assert object_cells(small, 4).nonzero()[0].tolist() == [5]


def test_the_script_prints_and_saves_both_pair_sets(tmp_path, capsys):
    out = tmp_path / "likelihood.json"
    result = main(["--model", str(tiny_mllm(tmp_path)), "--scenes", "3", "--batch-size", "2", "--threads", "1",
                   "--json", str(out)])
    assert json.loads(out.read_text())["held-out"]["scenes"] == 3
    for pairs in ("seen", "held-out"):
        assert set(result[pairs]["object"]) == set(PROMPTS) == set(result[pairs]["background"]) \
            == set(result[pairs]["onset"])
        assert all(v > 0 for part in ("object", "onset", "background") for v in result[pairs][part].values())
    printed = capsys.readouterr().out
    assert "held-out − seen" in printed and "additive expectation" in printed and "onset cells" in printed
    # the onset column is the caption's NLL on each object's top row of cells, read again by hand
    from evotok.data.scenes import SceneWorld
    from evotok.images import pil_to_tensor
    from evotok.mllm import EvoTokMLLM
    from evotok.mllm.onset_weights import onset_cells
    from training.bench_drawing_likelihood import SPLITS
    model = EvoTokMLLM.from_pretrained(result["model"]).eval()
    world = SceneWorld(model.tokenizer.config.image_size, seed=SPLITS["seen"][1], split=SPLITS["seen"][0],
                       scene_weights={"single_object": 1.0})
    samples = [world[i] for i in range(3)]
    codes = model.encode_images(torch.stack([pil_to_tensor(x.image, world.resolution) for x in samples]))
    nll = code_nll(model, [x.caption for x in samples], codes)
    onsets = [onset_cells([world.scene(i).objects[0]], model.config.grid_size) for i in range(3)]
    by_hand = np.mean([float(nll[k, onset].sum(-1).mean()) for k, onset in enumerate(onsets)])
    assert abs(by_hand - result["seen"]["onset"]["caption"]) < 1e-4
    held = result["held-out"]["caption_by_scene"]
    assert len(held) == 3 and all((r["colour"], r["shape"]) in HELDOUT_PAIRS for r in held)
    assert sum(r["n"] for r in result["by_pair"]) == 3
    assert abs(sum(r["held-out"] * r["n"] for r in result["by_pair"]) / 3 - result["held-out"]["object"]["caption"]) < 1e-6


def test_by_pair_sets_each_held_out_pair_against_its_additive_expectation():
    scene = lambda colour, shape, v: {"colour": colour, "shape": shape, "object": v}  # noqa: E731
    results = {"seen": {"caption_by_scene": [scene("red", "circle", 4.0), scene("blue", "star", 6.0),
                                             scene("red", "square", 2.0), scene("green", "star", 8.0)]},
               "held-out": {"caption_by_scene": [scene("red", "star", 9.0), scene("red", "star", 7.0)]}}
    (row,) = by_pair(results)
    # same shape (stars) 7.0, same colour (red) 3.0, seen mean 5.0: expectation 5.0, excess +3.0
    assert row == {"pair": "red star", "n": 2, "held-out": 8.0, "seen, same shape": 7.0, "seen, same colour": 3.0,
                   "additive expectation": 5.0, "excess": 3.0}


def test_a_model_with_the_cell_attribute_head_gets_its_reading_of_object_cells(tmp_path, capsys):
    from evotok.mllm import EvoTokMLLM

    model = EvoTokMLLM.from_pretrained(tiny_mllm(tmp_path))
    model.add_cell_attribute_head()
    with torch.no_grad():  # every cell read as the first colour and the first shape
        model.cell_attributes.colour.bias[0] = 5.0
        model.cell_attributes.shape.bias[0] = 5.0
    model.save_pretrained(tmp_path / "with_head")
    result = main(["--model", str(tmp_path / "with_head"), "--scenes", "3", "--batch-size", "3", "--threads", "1"])
    assert "cell-attribute head's reading" in capsys.readouterr().out
    from evotok.data.scenes import COLOURS, SHAPES, SceneWorld
    from training.bench_drawing_likelihood import SPLITS
    for name, (split, seed) in SPLITS.items():
        world = SceneWorld(model.tokenizer.config.image_size, seed=seed, split=split, scene_weights={"single_object": 1.0})
        objects = [world.scene(i).objects[0] for i in range(3)]
        cells = [int(object_cells(o, model.config.grid_size).sum()) for o in objects]
        expect = {"colour": sum(c for c, o in zip(cells, objects) if o.colour == list(COLOURS)[0]) / sum(cells),
                  "shape": sum(c for c, o in zip(cells, objects) if o.shape == list(SHAPES)[0]) / sum(cells)}
        assert result[name]["cell_readout"] == expect
    plain = main(["--model", str(tiny_mllm(tmp_path)), "--scenes", "2", "--batch-size", "2", "--threads", "1"])
    assert plain["seen"]["cell_readout"] is None


def test_probes_of_the_drawing_states_are_fitted_on_seen_cells_and_scored_on_held_out_ones(tmp_path, capsys):
    result = main(["--model", str(tiny_mllm(tmp_path)), "--scenes", "4", "--batch-size", "4", "--threads", "1",
                   "--probe", "--json", str(tmp_path / "probe.json")])
    assert "Linear probes of the drawing states" in capsys.readouterr().out
    for attribute in ("colour", "shape"):
        row = result["state_probes"][attribute]
        assert row["n held-out"] >= 4 and all(0.0 <= row[k] <= 1.0 for k in row if k != "n held-out")
    assert "states" not in result["seen"]  # the cells' states are not written to the JSON
    assert json.loads((tmp_path / "probe.json").read_text())["state_probes"]["shape"]["n held-out"] >= 4


def test_a_planning_model_draws_after_the_plan_each_prompt_names(tmp_path):
    from evotok.mllm import EvoTokMLLM
    from training.bench_drawing_likelihood import PLANNED_PROMPTS, named_plan

    star = SceneObject("star", "red", "small", (0.3, 0.6))
    assert named_plan("a red star on a plain background", star, 8) == "small red star 4 2"
    assert named_plan("a red cross on a plain background", star, 8) == "small red cross 4 2"
    assert named_plan("a blue star", star, 8) == "small blue star 4 2" and named_plan("", star, 8) is None
    assert named_plan("a red star", star, 8, moved=True) == "small red star 0 6"

    folder = tiny_mllm(tmp_path, layout_plan=True)
    model = EvoTokMLLM.from_pretrained(folder).eval()
    g, depth = model.config.grid_size, model.config.pixel_depth
    codes = torch.randint(0, model.tokenizer.config.codebook_size, (1, g, g, depth))
    planned = code_nll(model, ["a red star"], codes, ["small red star 1 1"])
    other = code_nll(model, ["a red star"], codes, ["large blue cross 3 3"])
    assert not torch.allclose(planned, other)  # the drawing reads the plan
    result = main(["--model", str(folder), "--scenes", "2", "--batch-size", "2", "--threads", "1"])
    assert set(result["seen"]["object"]) == set(PLANNED_PROMPTS)
