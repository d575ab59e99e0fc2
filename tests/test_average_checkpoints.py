"""training/average_checkpoints.py: the weighted mean of runs of one model, and refusals of the rest."""
from __future__ import annotations

import json

import pytest
import torch

from evotok.hub import CheckpointError, read_weights, write_weights
from training.average_checkpoints import RECORD_NAME, average_checkpoints


def _checkpoint(folder, state, config=None, words=None, vocab="same vocabulary"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy", "width": 2}))
    write_weights(state, folder)
    side = folder / "text_tokenizer"
    side.mkdir()
    (side / "tokenizer.json").write_text(vocab)
    (side / "corpus_words.json").write_text(json.dumps(words or {"red": 3}))
    return folder


def _state(scale):
    return {"w": torch.full((2, 3), float(scale)), "b": torch.tensor([scale, -scale], dtype=torch.bfloat16),
            "steps": torch.tensor([4, 5])}


def test_weighted_mean_of_float_tensors_with_side_files_and_record(tmp_path):
    a = _checkpoint(tmp_path / "a", _state(1.0), words={"red": 3, "star": 1})
    b = _checkpoint(tmp_path / "b", _state(3.0), words={"red": 5, "heart": 2})
    out = average_checkpoints([a, b], tmp_path / "avg", weights=[0.75, 0.25])

    state, _ = read_weights(out)
    assert torch.equal(state["w"], torch.full((2, 3), 1.5))
    assert state["b"].dtype == torch.bfloat16
    assert torch.equal(state["b"], torch.tensor([1.5, -1.5], dtype=torch.bfloat16))
    assert torch.equal(state["steps"], torch.tensor([4, 5]))
    assert json.loads((out / "config.json").read_text()) == {"model_type": "toy", "width": 2}
    assert (out / "text_tokenizer" / "tokenizer.json").read_text() == "same vocabulary"
    # every word either run was trained on stays known, with its largest count
    assert json.loads((out / "text_tokenizer" / "corpus_words.json").read_text()) == {"heart": 2, "red": 5, "star": 1}
    record = json.loads((out / RECORD_NAME).read_text())
    assert [r["weight"] for r in record] == [0.75, 0.25] and record[0]["checkpoint"] == str(a)

    equal = average_checkpoints([a, b], tmp_path / "equal")
    assert torch.equal(read_weights(equal)[0]["w"], torch.full((2, 3), 2.0))


def test_refuses_checkpoints_that_are_not_runs_of_one_model(tmp_path):
    a = _checkpoint(tmp_path / "a", _state(1.0))
    other_config = _checkpoint(tmp_path / "c", _state(1.0), config={"model_type": "toy", "width": 3})
    with pytest.raises(CheckpointError, match="width"):
        average_checkpoints([a, other_config], tmp_path / "out")
    other_vocab = _checkpoint(tmp_path / "v", _state(1.0), vocab="another vocabulary")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        average_checkpoints([a, other_vocab], tmp_path / "out")
    other_shape = _checkpoint(tmp_path / "s", {**_state(1.0), "w": torch.zeros(3, 2)})
    with pytest.raises(CheckpointError, match="shape"):
        average_checkpoints([a, other_shape], tmp_path / "out")
    other_ints = _checkpoint(tmp_path / "i", {**_state(1.0), "steps": torch.tensor([4, 6])})
    with pytest.raises(CheckpointError, match="steps"):
        average_checkpoints([a, other_ints], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_refuses_bad_weights_and_writing_over_an_input(tmp_path):
    a = _checkpoint(tmp_path / "a", _state(1.0))
    b = _checkpoint(tmp_path / "b", _state(2.0))
    with pytest.raises(ValueError, match="sum to 1"):
        average_checkpoints([a, b], tmp_path / "out", weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="2 checkpoints"):
        average_checkpoints([a, b], tmp_path / "out", weights=[1.0])
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints([a], tmp_path / "out")
    with pytest.raises(ValueError, match="one of the inputs"):
        average_checkpoints([a, b], a)
    assert torch.equal(read_weights(a)[0]["w"], torch.full((2, 3), 1.0))
