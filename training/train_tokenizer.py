"""Train an EvoTok tokenizer.

One CPU process (as in CI and the bundled default):
    python training/train_tokenizer.py --config training/configs/tokenizer_small.yaml
Many GPUs or nodes (DDP through accelerate; FSDP/DeepSpeed via `accelerate config`):
    accelerate launch --multi_gpu --num_processes 8 training/train_tokenizer.py --config training/configs/tokenizer_reference.yaml
Continue an interrupted run exactly (model, optimizers, EMA codebooks, RNG, data position):
    python training/train_tokenizer.py --config ... --resume
Override any config value from the command line: ``--set train.steps=100 train.batch_size=8``.

The step itself (generator and discriminator updates) lives in ``training/step.py``; its speed and
memory switches are config keys under ``train.optimizations`` (see ``training.step.Optimizations``):
    --set train.optimizations.activation_checkpointing=true train.optimizations.compile=true
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from evotok.analysis import evaluate_depths  # noqa: E402
from evotok.config import PRESETS  # noqa: E402
from evotok.data.mixture import build_mixture  # noqa: E402
from evotok.losses import FeatureDistance, LossWeights, PatchDiscriminator, sample_pixel_depths  # noqa: E402
from evotok.hub import weights_digest  # noqa: E402
from evotok.model import EvoTok  # noqa: E402
from evotok.teacher import TinySigLIPConfig, TinySigLIPTeacher, load_teacher  # noqa: E402
from training.common import (STATE_FILE, Logger, append_jsonl, copy_config, finish_run,  # noqa: E402
                             iterate_batches, load_training_state, parse_run_args, rng_state, save_checkpoint,
                             set_rng_state, set_seed, to_float_dict)
from training.step import Optimizations, TokenizerTrainer, gather_digests  # noqa: E402


def build_tokenizer(model_cfg: dict) -> EvoTok:
    cfg = dict(model_cfg)
    preset = PRESETS[cfg.pop("preset", "small")]
    config = preset(**cfg)
    return EvoTok(config, load_pretrained_encoder=config.encoder == "hf")


def build_teacher(spec):
    """A teacher folder / hub id, or ``{"random": {TinySigLIPConfig fields}}`` (an untrained,
    frozen ViT: a valid distillation target for tests and smoke runs), or nothing."""
    if not spec:
        return None
    if isinstance(spec, dict) and "random" in spec:
        teacher = TinySigLIPTeacher(TinySigLIPConfig(**spec["random"]))
    else:
        teacher = load_teacher(spec)
    return teacher.eval().requires_grad_(False)


def build_perceptual(spec: str | None):
    """``"package.module:factory"`` returning a network whose forward gives a list of feature maps.

    No pretrained perceptual network (VGG/LPIPS) can be obtained offline, so none ships: bring your own.
    """
    if not spec:
        return None
    import importlib

    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return FeatureDistance(factory())


def eval_images(data_cfg: dict, count: int) -> torch.Tensor:
    """A fixed held-out batch (the same every evaluation) for the per-depth figures."""
    held_out = build_mixture({**data_cfg, "split": "heldout", "seed": data_cfg.get("seed", 0) + 1})
    return torch.stack([held_out[i]["image"] for i in range(count)])


def main(argv: list[str] | None = None) -> dict:
    args, config = parse_run_args(argv, __doc__)
    train_cfg, data_cfg = config["train"], config["data"]
    run_dir = Path(train_cfg["output_dir"])
    optimizations = Optimizations.from_dict(train_cfg.get("optimizations"))

    accelerator = Accelerator(
        mixed_precision=train_cfg.get("mixed_precision", "no") if torch.cuda.is_available() else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    if not torch.cuda.is_available() and train_cfg.get("cpu_threads"):
        torch.set_num_threads(int(train_cfg["cpu_threads"]))
    set_seed(int(train_cfg.get("seed", 0)) + accelerator.process_index)

    tokenizer = build_tokenizer(config["model"])
    teacher = build_teacher(config.get("teacher"))
    if teacher is not None:  # so a tokenizer is never probed through a teacher it was not trained on
        tokenizer.config.teacher_sha256 = weights_digest(teacher)
        tokenizer.config.teacher_features_sha256 = teacher.feature_digest()
    weights = LossWeights(**config.get("loss", {}))
    perceptual = build_perceptual(config.get("perceptual_net"))
    if weights.perceptual > 0 and perceptual is None:
        raise ValueError("loss.perceptual > 0 needs perceptual_net: 'module:factory' (none ships offline)")
    disc_cfg = config.get("discriminator", {})
    discriminator = PatchDiscriminator(disc_cfg.get("channels", 64), disc_cfg.get("layers", 3)) if weights.gan > 0 else None

    trainer = TokenizerTrainer(
        tokenizer, weights=weights, lr=float(train_cfg["lr"]), betas=tuple(train_cfg.get("betas", (0.9, 0.95))),
        grad_clip=train_cfg.get("grad_clip"), teacher=teacher, perceptual=perceptual, discriminator=discriminator,
        disc_lr=float(disc_cfg.get("lr", train_cfg["lr"])), optimizations=optimizations, device=accelerator.device,
    )
    teacher = trainer.teacher
    accelerator.print(f"step optimisations: {optimizations.describe()}"
                      + (f" ({'; '.join(trainer.notes)})" if trainer.notes else ""))

    step = 0
    if args.resume and (run_dir / STATE_FILE).exists():
        state = load_training_state(run_dir / STATE_FILE)
        trainer.load_state_dict(state)
        step = state["step"]
        set_rng_state(state["rng"][min(accelerator.process_index, len(state["rng"]) - 1)])
        accelerator.print(f"resumed {run_dir} at step {step}")
    elif args.resume:
        accelerator.print(f"--resume: no state in {run_dir}, starting fresh")
    if accelerator.is_main_process:
        copy_config(args.config, run_dir, args.set)

    trainer.prepare(accelerator)
    model = trainer.model

    dataset = build_mixture({**data_cfg, "split": "train"})
    batch_size = int(train_cfg["batch_size"])
    batches = iterate_batches(dataset, step, batch_size, accelerator.process_index, accelerator.num_processes,
                              int(train_cfg.get("num_workers", 0)))
    held_out = eval_images(data_cfg, int(config.get("eval", {}).get("num_images", 32))).to(accelerator.device)
    logger = Logger(run_dir, accelerator.is_main_process, bool(train_cfg.get("tensorboard", False)))
    total_steps = int(train_cfg["steps"])
    log_every, eval_every, save_every = (int(train_cfg.get(k, d)) for k, d in
                                         (("log_every", 10), ("eval_every", 500), ("save_every", 500)))

    def save(final: bool = False) -> None:
        state = {**trainer.state_dict(), "step": step, "rng": [rng_state()], "config": config}
        save_checkpoint(accelerator, run_dir, state, model, final)

    history: list[dict] = []
    started = time.time()
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="tokenizer")
    model.train()
    while step < total_steps:
        batch = next(batches)
        # seeded by (seed, step, rank) so resume needs no generator state
        depth_rng = torch.Generator().manual_seed(
            (int(train_cfg.get("seed", 0)) * 1_000_003 + step) * 1024 + accelerator.process_index)
        depths = sample_pixel_depths(batch["image"].shape[0], model.config.pixel_depth,
                                     float(train_cfg.get("pixel_depth_dropout", 0.0)),
                                     train_cfg.get("max_train_depth"), depth_rng)
        # the trainer copies both to the device (without blocking when train.optimizations.sync_free)
        terms = trainer.step(batch["image"], depths, step)
        step += 1
        bar.update(1)

        if step % log_every == 0 or step == total_steps:
            stats = model.quantizer.codebook_stats()
            usage = float(torch.as_tensor(stats["usage"]).float().mean())
            values = {**to_float_dict(terms), "codebook_usage": usage}
            bar.set_postfix(loss=f"{values['total']:.4f}", rec=f"{values['reconstruction']:.4f}",
                            sem=f"{values.get('semantic', 0):.3f}", usage=f"{usage:.2f}")
            logger.scalars(values, step, "train/")
            history.append({"step": step, **values})
        if step % eval_every == 0 or step == total_steps:
            model.eval()
            report = evaluate_depths(model, held_out, teacher)
            model.train()
            logger.scalars({f"psnr_depth{d}": v for d, v in zip(report.depths, report.psnr)}, step, "eval/")
            if report.semantic_cosine:
                logger.scalars({f"cos_depth{d}": v for d, v in zip(report.depths, report.semantic_cosine)}, step, "eval/")
            if accelerator.is_main_process:
                psnrs = " ".join(f"{v:.1f}" for v in report.psnr)
                bar.write(f"step {step}: PSNR by depth [{psnrs}] dB" + (
                    f"; semantic cos at depth {model.config.semantic_depth}: {report.semantic_cosine[-1]:.3f}"
                    if report.semantic_cosine else ""))
                append_jsonl(run_dir / "eval.jsonl", {"step": step, **report.as_dict()})
        if step % save_every == 0 and step < total_steps:
            save()
    bar.close()
    elapsed = time.time() - started
    save(final=True)
    logger.close()
    # every rank's codebook buffers and weights must be identical: a cheap end-of-run check
    digests = gather_digests(model, accelerator)
    if any(d != digests[0] for d in digests):
        accelerator.print("WARNING: the ranks' quantizer buffers or weights differ at the end of training: "
                          + json.dumps(digests))
    return finish_run(accelerator, run_dir, {
        "steps": step, "seconds": elapsed, "history": history, "config": dataclasses.asdict(model.config),
        "optimizations": optimizations.as_dict(), "rank_digests": digests})


if __name__ == "__main__":
    main()
