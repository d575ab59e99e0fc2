"""The tokenizer's training entry point: loss falls, resume is exact, saves are atomic."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import common
from training.train_tokenizer import main

CONFIG = "training/configs/tokenizer_tiny_test.yaml"


def run(out: Path, *overrides: str, resume: bool = False) -> dict:
    argv = ["--config", CONFIG, "--set", f"train.output_dir={out}", *overrides]
    return main(argv + (["--resume"] if resume else []))


def test_short_run_lowers_the_loss_and_saves_a_loadable_tokenizer(tmp_path):
    summary = run(tmp_path / "run", "train.steps=24", "train.eval_every=24", "loss.gan_start_step=100")
    totals = [h["total"] for h in summary["history"]]
    assert sum(totals[-4:]) / 4 < 0.8 * sum(totals[:4]) / 4
    from evotok import EvoTok

    tok = EvoTok.from_pretrained(tmp_path / "run" / "final")
    assert tok.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 8, 4)
    assert len(tok.config.teacher_sha256) == 64  # the teacher it learned from, for the explorer's check
    assert (tmp_path / "run" / "eval.jsonl").read_text().count("psnr") == 1


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    run(tmp_path / "straight", "train.steps=6")
    run(tmp_path / "split", "train.steps=3")            # "interrupted" after its step-3 checkpoint
    run(tmp_path / "split", "train.steps=6", resume=True)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_killed_save_keeps_the_previous_state(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    common.save_training_state(path, {"step": 1})

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(common.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        common.save_training_state(path, {"step": 2})
    assert common.load_training_state(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_batch_indices_partition_the_data_across_ranks():
    seen = [i for step in range(3) for rank in range(2) for i in common.batch_indices(step, 4, rank, 2)]
    assert seen == list(range(24))


def test_the_run_records_the_config_it_actually_used(tmp_path):
    source = tmp_path / "source.yaml"
    source.write_text("# a comment worth keeping\ntrain:\n  steps: 10\n  lr: 0.001\n")
    common.copy_config(source, tmp_path / "plain")
    assert (tmp_path / "plain" / "config.yaml").read_text() == source.read_text()

    common.copy_config(source, tmp_path / "overridden", ["train.steps=700"])
    recorded = (tmp_path / "overridden" / "config.yaml").read_text()
    assert recorded.startswith(f"# {source} with --set train.steps=700")
    assert common.load_config(tmp_path / "overridden" / "config.yaml") == {"train": {"steps": 700, "lr": 0.001}}
