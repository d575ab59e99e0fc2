"""Tokenizer phase 2: the semantic decoder alone is refitted; codes and pixels stay exactly as they were."""
from pathlib import Path

import torch
from safetensors.torch import load_file

from evotok import EvoTok, small_config
from evotok.hub import weights_digest
from evotok.losses import readout_loss
from evotok.teacher import TinySigLIPConfig, TinySigLIPTeacher
from tests.helpers import ColourTeacher
from training.tune_semantic import main


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    teacher = TinySigLIPTeacher(TinySigLIPConfig(image_size=32, patch_size=4, width=24, depth=2, num_heads=2,
                                                 embed_dim=16, pool="max_where"))
    teacher.save_pretrained(tmp_path / "teacher")
    config = small_config(image_size=32, channels=(16, 32, 32), norm_num_groups=8, num_stages=4, codebook_size=64,
                          code_dim=8, pixel_depth=2, semantic_depth=4, semantic_layers=1, semantic_width=32,
                          semantic_heads=2, teacher_dim=24, teacher=str(tmp_path / "teacher"))
    tokenizer = EvoTok(config)
    tokenizer.train()(torch.rand(8, 3, 32, 32) * 2 - 1)  # one EMA update gives the codebooks data
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer", tmp_path / "teacher"


def _tune(tmp_path: Path, name: str, steps: int, resume: bool = False) -> dict:
    tokenizer, teacher = _folders(tmp_path) if not (tmp_path / "tokenizer").is_dir() else (
        tmp_path / "tokenizer", tmp_path / "teacher")
    overrides = [f"tokenizer={tokenizer}", f"teacher={teacher}", "data.resolution=32", "data.weights={scenes: 1.0}",
                 f"train.steps={steps}", "train.batch_size=4", "train.warmup_steps=0", "train.min_lr=2.0e-4", "train.eval_every=2",
                 "train.save_every=2", "train.num_workers=0", "train.cpu_threads=0", "train.log_every=1",
                 "eval.scenes=8", f"train.output_dir={tmp_path / name}"]
    # min_lr = lr: a flat schedule, so a 2-step run is the first half of a 4-step one
    return main(["--config", "training/configs/semantic_tune.yaml", "--set", *overrides] + (["--resume"] if resume else []))


def test_only_the_semantic_decoder_changes_and_the_new_teacher_is_pinned(tmp_path):
    summary = _tune(tmp_path, "tune", steps=4)
    before = load_file(str(tmp_path / "tokenizer" / "model.safetensors"))
    after = load_file(str(tmp_path / "tune" / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]) != key.startswith("semantic_decoder."), key
    tuned = EvoTok.from_pretrained(tmp_path / "tune" / "final")
    teacher = TinySigLIPTeacher.from_pretrained(tmp_path / "teacher")
    assert tuned.config.teacher_sha256 == weights_digest(teacher)
    assert tuned.config.teacher_features_sha256 == teacher.feature_digest()
    losses = [h for h in summary["history"] if "readout" in h]
    assert len(losses) == 4 and all(0 <= h["readout"] <= 2 for h in losses)
    probes = [h for h in summary["history"] if any(k.startswith("eval/") for k in h)]
    assert [h["step"] for h in probes] == [0, 2, 4]
    assert all(0 <= v <= 1 for h in probes for k, v in h.items() if k.startswith("eval/"))
    assert (tmp_path / "tune" / "final" / "semantic_tune.json").is_file()


def test_resume_matches_an_uninterrupted_run(tmp_path):
    _tune(tmp_path, "straight", steps=4)
    _tune(tmp_path, "split", steps=2)
    _tune(tmp_path, "split", steps=4, resume=True)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_readout_loss_is_zero_for_the_real_features_and_has_a_gradient():
    teacher = ColourTeacher()
    features = teacher.image_features(torch.rand(3, 3, 8, 8) * 2 - 1)
    target = teacher.embed_features(features)
    assert readout_loss(teacher, features, target).abs() < 1e-6
    prediction = torch.randn_like(features, requires_grad=True)
    readout_loss(teacher, prediction, target).backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0


def test_repeated_set_flags_all_apply():
    """``--set a=1 --set b=2`` keeps both overrides (argparse would otherwise keep only the last)."""
    from training.common import parse_run_args

    args, config = parse_run_args(["--config", "training/configs/semantic_tune.yaml", "--set", "train.steps=7",
                                   "--set", "train.lr=0.5", "train.seed=3"], "test", "decoder")
    assert args.set == ["train.steps=7", "train.lr=0.5", "train.seed=3"]
    assert (config["train"]["steps"], config["train"]["lr"], config["train"]["seed"]) == (7, 0.5, 3)
