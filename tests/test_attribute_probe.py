"""Which grid cells an object labels (the attribute probes' targets, evotok.mllm.cell_attributes.cell_labels)."""
from __future__ import annotations

from evotok.data.scenes import COLOURS, SHAPES, SceneObject
from evotok.mllm.cell_attributes import cell_labels


def test_cells_take_the_object_drawn_over_their_centre_and_the_last_object_wins():
    big = SceneObject("square", "red", "large", (0.5, 0.5))
    small = SceneObject("circle", "blue", "small", (0.5, 0.5))
    alone = cell_labels([big], grid=8)
    covered = alone["shape"] >= 0
    assert 0 < covered.sum() < 64 and set(alone["shape"][covered]) == {list(SHAPES).index("square")}
    assert set(alone["colour"][covered]) == {list(COLOURS).index("red")}
    assert alone["shape"][0] == -1  # a corner cell is background

    both = cell_labels([big, small], grid=8)
    on_top = both["shape"] == list(SHAPES).index("circle")
    assert on_top.any() and (both["colour"][on_top] == list(COLOURS).index("blue")).all()
    assert ((both["shape"] >= 0) == covered).all()  # the small circle lies inside the square


def test_gap_masked_probe_reads_shape_that_the_plain_probe_hides_behind_colour():
    import numpy as np

    from evotok.data.scenes import HELDOUT_PAIRS, TRAIN_PAIRS
    from training.bench_attribute_probe import allowed_classes, probe

    colours, shapes = list(COLOURS), list(SHAPES)
    allowed = allowed_classes(np.array([colours.index("red")]), "shape")[0]
    assert {shapes[k] for k in np.flatnonzero(~allowed.numpy())} == {s for c, s in HELDOUT_PAIRS if c == "red"}

    rng = np.random.default_rng(0)

    def examples(pairs, n):  # a clean colour code and a faint, noisy shape code
        picked = [pairs[k] for k in rng.integers(len(pairs), size=n)]
        c = np.array([colours.index(p[0]) for p in picked])
        s = np.array([shapes.index(p[1]) for p in picked])
        x = np.concatenate([np.eye(len(colours))[c] * 3, np.eye(len(shapes))[s] + rng.normal(0, 0.6, (n, len(shapes)))], 1)
        return x.astype(np.float32), {"colour": c, "shape": s}

    row = probe(examples(sorted(TRAIN_PAIRS), 1000), examples(sorted(HELDOUT_PAIRS), 300), "shape")
    assert row["plain: seen pairs"] > 0.6 and row["gaps masked: seen pairs"] > 0.6
    assert row["plain: held-out pairs"] < 0.2 < 0.5 < row["gaps masked: held-out pairs"]  # the prior, then none
