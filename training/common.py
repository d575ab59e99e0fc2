"""Pieces every training entry point shares: configs, exact resume, atomic checkpoints, logging."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml


STATE_FILE = "training_state.pt"  # the resumable state a run keeps in its output folder


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Read a YAML config; ``overrides`` like ``train.steps=10`` replace nested values."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    for item in overrides or []:
        key, _, raw = item.partition("=")
        if not _:
            raise ValueError(f"override {item!r} must look like section.key=value")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return config


def parse_run_args(argv: list[str] | None, description: str, saved: str | None = None) -> tuple[argparse.Namespace, dict]:
    """Every training script's command line (``--config``, ``--resume``, ``--set``, and ``--out``
    when ``saved`` names what it gets) and the config it names, with the overrides applied.
    Repeated ``--set`` flags all apply."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true", help="continue the run in train.output_dir")
    if saved:
        parser.add_argument("--out", default=None, help=f"where to save the {saved} (default: RUN/final)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override config values")
    args = parser.parse_args(argv)
    return args, load_config(args.config, args.set)


def run_device(train_cfg: dict) -> torch.device:
    """CUDA when there is one (unless ``train.device: cpu``); on CPU, ``train.cpu_threads`` threads.
    Also seeds every generator with ``train.seed``."""
    device = torch.device("cuda" if torch.cuda.is_available() and train_cfg.get("device", "auto") != "cpu" else "cpu")
    if device.type == "cpu" and train_cfg.get("cpu_threads"):
        torch.set_num_threads(int(train_cfg["cpu_threads"]))
    set_seed(int(train_cfg.get("seed", 0)))
    return device


def learning_rate(step: int, train_cfg: dict) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at ``steps``
    (``schedule: constant`` keeps ``lr``)."""
    lr, warmup, total = float(train_cfg["lr"]), int(train_cfg.get("warmup_steps", 0)), int(train_cfg["steps"])
    if step < warmup:
        return lr * (step + 1) / warmup
    if train_cfg.get("schedule", "cosine") == "constant":
        return lr
    min_lr = float(train_cfg.get("min_lr", 0.0))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict) -> None:
    """Write ``state`` with torch.save to a temporary file, then rename: a killed save loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_training_state(path: Path) -> dict:
    """Our own resume file. RNG states hold numpy arrays and tuples, so it needs the full unpickler:
    only ever point ``--resume`` at a run folder this script wrote, never at a downloaded file."""
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {path}; nothing to resume")
    return torch.load(path, map_location="cpu", weights_only=False)


def batch_indices(step: int, batch_size: int, rank: int, world_size: int) -> range:
    """Dataset indices of one rank's share of global batch ``step``: the data position is the step."""
    start = (step * world_size + rank) * batch_size
    return range(start, start + batch_size)


def iterate_batches(dataset, start_step: int, batch_size: int, rank: int, world_size: int,
                    num_workers: int = 0, collate_fn: Callable | None = None) -> Iterator[dict]:
    """Endless batches from an indexable dataset, starting exactly at ``start_step``.

    Workers (``num_workers``) build the next batches while the current one trains. For a dataset
    whose items depend only on their index the batches are the same with any number of workers."""
    from torch.utils.data import DataLoader

    class Steps(torch.utils.data.Sampler):
        def __iter__(self):
            step = start_step
            while True:
                yield list(batch_indices(step, batch_size, rank, world_size))
                step += 1

    # Its own generator: a loader draws a worker seed from the global RNG, which would shift a resumed run.
    loader = DataLoader(dataset, batch_sampler=Steps(), num_workers=num_workers, collate_fn=collate_fn,
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(start_step))
    yield from loader


class Logger:
    """Progress-bar postfix plus optional TensorBoard scalars, main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def copy_config(config_path: str | os.PathLike, run_dir: Path, overrides: list[str] | None = None) -> None:
    """Record the run's configuration as ``run_dir/config.yaml``: the file itself (comments kept)
    or, when ``--set`` overrides were given, the resolved configuration they produce."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not overrides:
        shutil.copyfile(config_path, run_dir / "config.yaml")
        return
    header = f"# {config_path} with --set {' '.join(overrides)}\n"
    resolved = yaml.safe_dump(load_config(config_path, overrides), sort_keys=False)
    (run_dir / "config.yaml").write_text(header + resolved)


def to_float_dict(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_checkpoint(accelerator: Any, run_dir: Path, state: dict, model: Any, final: bool) -> None:
    """All ranks meet; the main process writes the resumable ``state`` and the model folder
    (``final`` or ``latest``), each atomically; all ranks meet again before training goes on."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_training_state(run_dir / STATE_FILE, state)
        model.save_pretrained(run_dir / ("final" if final else "latest"))
    accelerator.wait_for_everyone()


def finish_run(accelerator: Any, run_dir: Path, summary: dict) -> dict:
    """Write ``summary.json`` (main process) and end the distributed run cleanly."""
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    end_distributed_training(accelerator)
    return summary


def end_distributed_training(accelerator: Any, drain_seconds: float = 0.2) -> None:
    """``accelerator.end_training()`` without PyTorch's gloo teardown deadlock.

    A gloo worker thread that finishes a collective frees its Python-owned tensors, which needs
    the GIL. If the process group's last reference dies on the main thread (say when the DDP
    reducer is freed as ``main`` returns), its destructor holds the GIL while it joins those
    threads, and both wait forever (seen here in 2 of 13 runs on a loaded 2-core
    machine). So every rank meets at a barrier, sleeps briefly with the GIL released so the
    workers finish freeing, and only then tears the group down.
    """
    if accelerator.num_processes > 1:
        import time

        accelerator.wait_for_everyone()
        time.sleep(drain_seconds)
    accelerator.end_training()
