"""training/bench_code_head_probe.py: the scene features of object cells, and the script end to end."""
from __future__ import annotations

import numpy as np

from evotok.data.scenes import SceneWorld
from training.bench_code_head_probe import FEATURES, HEADS, cell_features, main


def test_each_object_cell_gets_one_hot_attributes_and_its_place_in_the_box():
    world = SceneWorld(64, seed=5, split="train", scene_weights={"single_object": 1.0})
    for i in range(20):
        cells, rows = cell_features(world.scene(i), grid=8)
        assert rows.shape == (len(cells), FEATURES) and len(set(cells)) == len(cells)
        assert np.all(rows[:, :-2].sum(1) == 4)  # colour, shape, size, background kind
        assert np.all(np.abs(rows[:, -2:]) <= 1.0)


def test_the_probe_scores_every_head_on_every_set(tmp_path):
    results = main(["--scenes", "12", "--eval-scenes", "6", "--epochs", "1", "--threads", "1",
                    "--json", str(tmp_path / "probe.json")])
    assert set(results["heads"]) == set(HEADS)
    for sets in results["heads"].values():
        for name in ("train", "seen", "held-out"):
            assert sets[name]["nll"] > 0 and 0.0 <= sets[name]["accuracy"] <= 1.0
    assert min(results["cells"].values()) > 0 and (tmp_path / "probe.json").is_file()
