"""Phase 2 of a tokenizer: refit its semantic decoder on frozen codes, so that what the teacher's
head reads survives the prediction.

    python training/tune_semantic.py --config training/configs/semantic_tune.yaml
    cp runs/semantic_tune/final/* assets/tokenizer/
Continue an interrupted run exactly: add ``--resume``. Override values: ``--set train.steps=100``.

Everything but the semantic decoder is frozen (encoder, quantizer codebooks, pixel decoder), so the
codes, the reconstructions and every pixel figure stay exactly as they were. Per batch: the codes
and the teacher's patch features of the images, both without gradient; the decoder's prediction at
the semantic depth; loss = ``loss.features`` × the cosine + fold loss of the main training plus
``loss.readout`` × ``evotok.losses.readout_loss`` (the teacher's image embedding of the prediction
against that of the real features). The saved tokenizer pins the teacher it was tuned against.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402

from evotok.data.mixture import build_mixture  # noqa: E402
from evotok.hub import weights_digest  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.losses import cosine_fold_loss, readout_loss  # noqa: E402
from evotok.model import EvoTok  # noqa: E402
from evotok.teacher import Teacher, load_teacher, matches_pins  # noqa: E402
from training.common import (STATE_FILE, Logger, copy_config, iterate_batches, learning_rate, load_training_state,  # noqa: E402
                             parse_run_args, rng_state, run_device, save_training_state, set_rng_state)
from training.eval_tokenizer import held_out_samples, probe_accuracy, probe_tasks  # noqa: E402


def freeze_all_but_semantic_decoder(tokenizer: EvoTok) -> list[torch.nn.Parameter]:
    """Eval mode (no codebook EMA updates) and no gradient except in the semantic decoder."""
    tokenizer.eval().requires_grad_(False)
    tokenizer.semantic_decoder.train().requires_grad_(True)
    return list(tokenizer.semantic_decoder.parameters())


class SceneProbe:
    """Zero-shot scene questions (shape, colour, count, position) on held-out scenes, asked of the
    teacher's text side against the decoder's prediction at the semantic depth."""

    def __init__(self, tokenizer: EvoTok, count: int, seed: int = 1) -> None:
        resolution = tokenizer.config.image_size
        samples = held_out_samples("scenes", resolution, count, seed)
        images = torch.stack([pil_to_tensor(s.image, resolution) for s in samples])
        self.codes = tokenizer.encode(images)
        self.tasks = probe_tasks("scenes", samples, None)

    @torch.no_grad()
    def __call__(self, tokenizer: EvoTok, teacher: Teacher) -> dict[str, float]:
        features = tokenizer.semantic_features(self.codes)
        return {task.removeprefix("scene "): probe_accuracy(teacher, features[idx], cands, answers)
                for task, idx, cands, answers in self.tasks}


def main(argv: list[str] | None = None) -> dict:
    args, config = parse_run_args(argv, __doc__, "tuned tokenizer")
    train_cfg, loss_cfg = config["train"], config.get("loss", {})
    run_dir = Path(train_cfg["output_dir"])
    out_dir = Path(args.out) if args.out else run_dir / "final"
    device = run_device(train_cfg)

    tokenizer = EvoTok.from_pretrained(config["tokenizer"]).to(device)
    teacher = load_teacher(config.get("teacher") or tokenizer.config.teacher, device=device).eval().requires_grad_(False)
    if teacher.feature_dim != tokenizer.config.teacher_dim:
        raise ValueError(f"the teacher's features are {teacher.feature_dim}-d, the tokenizer's semantic decoder "
                         f"predicts {tokenizer.config.teacher_dim}-d")
    if not matches_pins(teacher, tokenizer.config.teacher_features_sha256, tokenizer.config.teacher_sha256):
        print("note: this teacher's patch features are not the ones the tokenizer was trained against; the semantic "
              "decoder is retargeted to them (the codes stay as they are)")
    params = freeze_all_but_semantic_decoder(tokenizer)
    opt = torch.optim.AdamW(params, lr=float(train_cfg["lr"]), betas=tuple(train_cfg.get("betas", (0.9, 0.95))),
                            weight_decay=float(train_cfg.get("weight_decay", 0.0)))
    step, elapsed_before, history = 0, 0.0, []
    if args.resume and (run_dir / STATE_FILE).exists():
        state = load_training_state(run_dir / STATE_FILE)
        tokenizer.semantic_decoder.load_state_dict(state["semantic_decoder"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed_before, history = state["step"], state.get("seconds", 0.0), state.get("history", [])
        set_rng_state(state["rng"])
        print(f"resumed {run_dir} at step {step}")
    elif args.resume:
        print(f"--resume: no state in {run_dir}, starting fresh")
    copy_config(args.config, run_dir, args.set)

    data_cfg = {**config.get("data", {}), "split": "train"}
    batches = iterate_batches(build_mixture(data_cfg), step, int(train_cfg["batch_size"]), 0, 1,
                              int(train_cfg.get("num_workers", 0)))
    probe = SceneProbe(tokenizer, int(config.get("eval", {}).get("scenes", 200)))
    logger = Logger(run_dir, True, bool(train_cfg.get("tensorboard", False)))
    total, depth = int(train_cfg["steps"]), tokenizer.config.semantic_depth
    log_every, eval_every, save_every = (int(train_cfg.get(k, d)) for k, d in
                                         (("log_every", 10), ("eval_every", 250), ("save_every", 100)))
    w_features, folds = float(loss_cfg.get("features", 1.0)), int(loss_cfg.get("folds", 4))
    w_readout = float(loss_cfg.get("readout", 1.0))

    def save() -> None:
        save_training_state(run_dir / STATE_FILE, {
            "semantic_decoder": tokenizer.semantic_decoder.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "rng": rng_state(), "seconds": elapsed_before + time.time() - started, "history": history, "config": config})

    if step == 0:
        history.append({"step": 0, **{f"eval/{k}": v for k, v in probe(tokenizer, teacher).items()}})
    started = time.time()
    bar = tqdm(total=total, initial=step, desc="semantic decoder", dynamic_ncols=True)
    while step < total:
        images = next(batches)["image"].to(device)
        with torch.no_grad():
            latents = tokenizer.quantizer.codes_to_latent(tokenizer.encode(images), depth)
            target = teacher.image_features(images).float()
            target_embeds = teacher.embed_features(target) if w_readout else None
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, train_cfg)
        prediction = tokenizer.semantic_decoder(latents)
        terms = {"features": cosine_fold_loss(prediction, target, folds)}
        if w_readout:
            terms["readout"] = readout_loss(teacher, prediction, target_embeds)
        loss = w_features * terms["features"] + w_readout * terms.get("readout", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(params, float(train_cfg["grad_clip"]))
        opt.step()
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == total:
            values = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "lr": opt.param_groups[0]["lr"]}
            bar.set_postfix(loss=f"{values['loss']:.4f}", readout=f"{values.get('readout', 0):.4f}")
            logger.scalars(values, step, "train/")
            history.append({"step": step, **values})
        if eval_every and (step % eval_every == 0 or step == total):
            scores = probe(tokenizer, teacher)
            tokenizer.semantic_decoder.train()
            logger.scalars(scores, step, "eval/")
            history.append({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
            bar.write(f"step {step}: held-out scene probe at depth {depth}: "
                      + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        if save_every and step % save_every == 0 and step < total:
            save()
    bar.close()
    seconds = elapsed_before + time.time() - started
    save()
    tokenizer.eval()
    tokenizer.config.teacher_sha256 = weights_digest(teacher)
    tokenizer.config.teacher_features_sha256 = teacher.feature_digest()
    tokenizer.save_pretrained(out_dir)
    summary = {"steps": step, "seconds": round(seconds, 1), "batch_size": int(train_cfg["batch_size"]),
               "tokenizer": str(config["tokenizer"]), "teacher": str(config.get("teacher") or tokenizer.config.teacher),
               "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
               "device": str(device), "threads": torch.get_num_threads(), "config_file": Path(args.config).as_posix(),
               "config": config, "history": history}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "semantic_tune.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}
                                                           | {"probe": [h for h in history if any(k.startswith("eval/") for k in h)]}, indent=2))
    logger.close()
    print(f"saved the tuned tokenizer to {out_dir} after {step} steps ({seconds / 60:.1f} min)")
    return summary


if __name__ == "__main__":
    main()
