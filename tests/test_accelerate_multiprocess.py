"""The reference preset's multi-process path: ``accelerate launch`` with two CPU processes (gloo).

``training/train_tokenizer.py`` trains a tiny reference-shaped tokenizer (a random SigLIP-shaped
transformers folder as encoder and teacher, the VGG16-shaped stand-in as perceptual net, PatchGAN
active) for a few steps under DDP. Each rank draws different images (the data position is split by
rank), so identical codebooks afterwards prove the EMA statistics are all-reduced; the script
gathers every rank's SHA-256 of its quantizer buffers and weights into ``summary.json``. Only
rank 0 writes, so the run folder holds exactly one final checkpoint.

``accelerate launch --multi_gpu`` is accelerate's torchrun launcher; ``ACCELERATE_USE_CPU=true``
makes each process a CPU (gloo) rank. (``accelerate launch --cpu`` would start a single process
on one machine unless MPI is configured.)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from training import bench_train_step as bench

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_reference_config(folder: Path, run_dir: Path) -> dict:
    return {
        "model": {"preset": "reference", "encoder_name_or_path": str(folder), "teacher": str(folder),
                  "image_size": 32, "channels": [8, 16, 16, 16], "norm_num_groups": 4, "num_stages": 4,
                  "codebook_size": 32, "code_dim": 8, "pixel_depth": 2, "semantic_depth": 4, "semantic_layers": 1,
                  "semantic_width": 16, "semantic_heads": 2, "teacher_dim": 32},
        "teacher": str(folder),
        "perceptual_net": "training.bench_train_step:tiny_vgg16_standin",
        "data": {"resolution": 32, "seed": 0, "weights": {"scenes": 1.0}},
        "loss": {"perceptual": 0.1, "gan": 0.5, "gan_start_step": 1},
        "discriminator": {"channels": 8, "layers": 2},
        "train": {"output_dir": str(run_dir), "steps": STEPS, "batch_size": 2, "lr": 1.0e-3, "grad_clip": 1.0,
                  "pixel_depth_dropout": 0.5, "log_every": 1, "eval_every": 1000, "save_every": 1000,
                  "cpu_threads": 1,
                  "optimizations": {"channels_last": True, "activation_checkpointing": True}},
        "eval": {"num_images": 2},
    }


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the `accelerate` command-line launcher is not installed")
def test_two_cpu_processes_keep_codebooks_in_sync_and_write_one_checkpoint(tmp_path):
    folder = bench.write_siglip_folder(tmp_path / "siglip", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32))
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_reference_config(folder, run_dir)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(REPO / "training" / "train_tokenizer.py"), "--config", str(config)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    digests = summary["rank_digests"]
    assert len(digests) == 2, "the run did not have two ranks"
    assert digests[0]["quantizer_buffers"] == digests[1]["quantizer_buffers"]
    assert digests[0]["parameters"] == digests[1]["parameters"]
    assert summary["history"][-1]["discriminator"] > 0  # the GAN was active

    # one checkpoint, written once: no "latest", no half-written temporary files or folders
    entries = sorted(p.name for p in run_dir.iterdir())
    assert entries == ["config.yaml", "eval.jsonl", "final", "summary.json", "training_state.pt"], entries
    assert sorted(p.name for p in (run_dir / "final").iterdir()) == ["config.json", "model.safetensors"]
    assert len((run_dir / "eval.jsonl").read_text().splitlines()) == 1  # main process only
    state = torch.load(run_dir / "training_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == STEPS and len(state["rng"]) == 1


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the `accelerate` command-line launcher is not installed")
def test_two_cpu_processes_end_a_time_budgeted_mllm_run_at_the_same_step(tmp_path):
    """A time-budgeted run under DDP ends, with the fitted total in its state. Each rank times its
    own steps; the main process's fit is broadcast so that none can end a step early and leave the
    other waiting for its gradients (here the clocks agree closely, so this run does not show that
    failure without the broadcast; it shows the broadcast path works)."""
    from test_mllm import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    run_dir = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(REPO / "training" / "train_mllm.py"), "--config", str(REPO / "training/configs/mllm_tiny_test.yaml"),
               "--set", f"model.image_tokenizer={tmp_path / 'tokenizer'}", f"data.cache_dir={tmp_path / 'cache'}",
               f"train.output_dir={run_dir}", "train.steps=100000", "train.time_budget_minutes=0.03",
               "train.eval_every=100000", "train.save_every=100000", "eval.at_start=false"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(run_dir / "training_state.pt", map_location="cpu", weights_only=False)
    assert 26 <= summary["steps"] < 100000 and state["fitted_total_steps"] == summary["steps"]
