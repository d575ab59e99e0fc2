"""training/bench_attribute_probe.py: which grid cells an object labels (the probes' targets)."""
from __future__ import annotations

from evotok.data.scenes import COLOURS, SHAPES, SceneObject
from training.bench_attribute_probe import cell_labels


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
