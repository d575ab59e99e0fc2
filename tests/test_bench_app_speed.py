"""training/bench_app_speed.py: the app's drawing path timed with the depth transformer's cache on and off."""
from __future__ import annotations

import pytest
import torch

from test_mllm import build, tiny_text_tokenizer, tiny_tokenizer
from training.bench_app_speed import image_seconds, table


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(tiny_tokenizer(), tiny_text_tokenizer())


def test_the_depth_cache_draws_the_same_codes_as_re_running_every_stage(model):
    prompts = ["a red circle", "two yellow triangles"]
    cached = model.generate_image(prompts, guidance_scale=3.0, temperature=0.8, seed=4)
    assert torch.equal(cached, model.generate_image(prompts, guidance_scale=3.0, temperature=0.8, seed=4,
                                                    depth_cache=False))


def test_each_prompt_and_seed_is_timed_and_tabled_side_by_side(model):
    times = image_seconds(model, ["a red circle", "a blue square"], 2, repeats=2)
    assert set(times) == {"on", "off"} and all(len(t) == 4 and min(t) > 0 for t in times.values())
    lines = table({"pick of 2": times, "one answer": {"on": [0.5, 0.25]}}).splitlines()
    assert lines[0].startswith("| path | depth cache on") and len(lines) == 4
    assert lines[2].startswith("| pick of 2 |") and lines[2].endswith("× |")
    assert lines[3] == "| one answer | 0.38 (0.50) |  |  |"
