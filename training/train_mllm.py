"""Train the multimodal model (chat about images + text to image) on a frozen EvoTok tokenizer.

Stage 1 (adapters and new embeddings; a from-scratch LM trains whole), then stage 2 (everything):
    python training/train_mllm.py --config training/configs/mllm_stage1.yaml
    python training/train_mllm.py --config training/configs/mllm_stage2.yaml
Many GPUs (DDP through accelerate; FSDP/DeepSpeed via `accelerate config`):
    accelerate launch --multi_gpu --num_processes 8 training/train_mllm.py --config ...
Continue an interrupted run exactly (model, optimizer, schedule, RNG, data position):
    python training/train_mllm.py --config ... --resume
Override any config value: ``--set train.steps=100 train.batch_size=8``.

The frozen tokenizer's codes are computed once per image into ``data.cache_dir`` (resumable
chunks), so training steps touch only the language model, the projector and the depth transformer.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: E402
from accelerate.utils import broadcast_object_list  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from evotok.data.mixture import build_sources  # noqa: E402
from evotok.data.scenes import SceneWorld  # noqa: E402
from evotok.mllm import EvoTokMLLM, TextTokenizer, qwen2_lm_config  # noqa: E402
from evotok.mllm.data import (TASKS, ChatDataset, attach_scene_objects, build_pool, collate,  # noqa: E402
                              corpus_texts, heldout_questions, load_pool, pool_is_complete)
from evotok.mllm.model import tokenizer_digest  # noqa: E402
from evotok.model import EvoTok  # noqa: E402
from training.common import (STATE_FILE, Logger, append_jsonl, copy_config, finish_run,  # noqa: E402
                             iterate_batches, load_training_state, parse_run_args, rng_state, save_checkpoint,
                             set_rng_state, set_seed, to_float_dict)

TENSOR_KEYS = ("input_ids", "attention_mask", "labels", "image_mask", "gen_mask", "image_codes", "gen_codes",
               "answer_exclusions", "cell_targets", "anchor_cells", "cell_weights", "canvas_ids")


def build_pools(tokenizer: EvoTok, data_cfg: dict, split: str, counts: dict[str, int], accelerator: Accelerator,
                scene_objects: bool = False) -> dict:
    """Encode (main process, once; cached on disk) and load the image pools of ``split``; with
    ``scene_objects`` (or ``data.resample_scene_questions``) the training scenes' records carry
    their objects."""
    resolution = tokenizer.config.image_size
    seed = int(data_cfg.get("seed", 0)) + (1 if split == "heldout" else 0)
    digest = tokenizer_digest(tokenizer)
    cache = Path(data_cfg.get("cache_dir", "runs/mllm_cache"))
    folders = {name: cache / f"{name}-{split}-{resolution}px-seed{seed}-n{count}-{digest[:12]}"
               for name, count in counts.items() if count}
    missing = {name: folder for name, folder in folders.items() if not pool_is_complete(folder)}
    if accelerator.is_main_process and missing:  # finished pools load without their sources' data
        sources = build_sources(list(missing), resolution=resolution, seed=seed, split=split,
                                roots=data_cfg.get("roots"))
        for name, folder in missing.items():
            count = min(int(counts[name]), len(sources[name]))
            with tqdm(total=count, desc=f"encoding {name}/{split}", leave=False) as bar:
                build_pool(folder, name, sources[name], count, resolution, tokenizer,
                           batch_size=int(data_cfg.get("encode_batch_size", 64)), digest=digest, progress=bar.update,
                           workers=int(data_cfg.get("render_workers", 0)))
    accelerator.wait_for_everyone()
    pools = {name: load_pool(folder) for name, folder in folders.items()}
    if (scene_objects or (data_cfg.get("resample_scene_questions") and split == "train")) and "scenes" in pools:
        # pools encoded before records kept objects: ~25 s for 60,000 scenes; newer pools: nothing to do
        attach_scene_objects(pools["scenes"], SceneWorld(resolution, seed, split))
    return pools


def build_model(config: dict, tokenizer: EvoTok, pools: dict, run_dir: Path, resume: bool,
                accelerator: Accelerator) -> EvoTokMLLM:
    model_cfg, text_cfg = config["model"], config.get("text_tokenizer", {})
    if model_cfg.get("init_from"):  # stage 2: continue from a saved stage-1 model
        # model.new_image_tokenizer: continue with another tokenizer of the same shape (e.g. its
        # semantic decoder refitted to a new teacher); the saved model then pins that one
        new_tokenizer = bool(model_cfg.get("new_image_tokenizer", False))
        model = EvoTokMLLM.from_pretrained(model_cfg["init_from"], image_tokenizer=tokenizer,
                                           check_image_tokenizer=not new_tokenizer)
        if new_tokenizer:
            model.config.image_tokenizer = str(model_cfg["image_tokenizer"])
            model.config.image_tokenizer_sha256 = tokenizer_digest(tokenizer)
        context = int(model_cfg.get("projector_context_layers", 0))
        if context and context != model.config.projector_context_layers:
            model.add_projector_context(context)  # raises if it has one of another depth
        if model_cfg.get("grid_axis_embeddings") and not model.config.grid_axis_embeddings:
            model.add_grid_axes(float(model_cfg.get("grid_axes_init_norm", 0.0)))
        if model_cfg.get("grid_rope") and not model.config.grid_rope:
            model.add_grid_rope()
        if model_cfg.get("depth_head", "free") == "codebook" and model.config.depth_head != "codebook":
            model.use_codebook_head(model_cfg.get("depth_head_width"))
        if cell_attribute_weight(config) > 0 and not model.config.cell_attribute_head:
            model.add_cell_attribute_head()
        if config["data"].get("layout_plan"):  # from now on the model writes plans (no new weights)
            model.config.layout_plan = True
        if model_cfg.get("plan_anchors"):  # ...and anchors their entries to cells (no new weights)
            model.config.plan_anchors = True
        if model_cfg.get("plan_canvas") and not model.config.plan_canvas:
            model.add_plan_canvas()
        if "grid_rope_stride" in model_cfg:  # a later stage may respace the row and column streams
            # through the config's own checks (a stride below 1 is refused there)
            model.config = dataclasses.replace(model.config, grid_rope_stride=int(model_cfg["grid_rope_stride"]))
        return model
    text_dir = run_dir / "text_tokenizer"
    if accelerator.is_main_process:  # one BPE, trained once, shared by every rank
        if text_cfg.get("path"):
            text_tok = TextTokenizer.load(text_cfg["path"])
        elif resume and text_dir.is_dir():
            text_tok = TextTokenizer.load(text_dir)
        else:
            text_tok = TextTokenizer.train(corpus_texts(pools), int(text_cfg.get("vocab_size", 3000)),
                                           int(text_cfg.get("min_frequency", 2)))
        text_tok.save(text_dir)
    accelerator.wait_for_everyone()
    text_tok = TextTokenizer.load(text_dir)
    adapters = {k: model_cfg[k] for k in ("projector_hidden", "projector_context_layers", "grid_axis_embeddings",
                                          "grid_rope", "grid_rope_stride", "depth_layers", "depth_width",
                                          "depth_heads", "depth_head", "depth_head_width", "max_prompt_tokens",
                                          "max_answer_tokens") if k in model_cfg}
    if cell_attribute_weight(config) > 0:
        adapters["cell_attribute_head"] = True
    if config["data"].get("layout_plan"):
        adapters["layout_plan"] = True
    if model_cfg.get("plan_anchors"):
        adapters["plan_anchors"] = True
    if model_cfg.get("plan_canvas"):
        adapters["plan_canvas"] = True
    if model_cfg.get("lm_name_or_path"):
        return EvoTokMLLM.build(tokenizer, text_tok, image_tokenizer_path=model_cfg["image_tokenizer"],
                                lm_name_or_path=model_cfg["lm_name_or_path"], **adapters)
    lm_config = qwen2_lm_config(len(text_tok), **model_cfg.get("lm", {}))
    return EvoTokMLLM.build(tokenizer, text_tok, image_tokenizer_path=model_cfg["image_tokenizer"],
                            lm_config=lm_config, **adapters)


def cell_attribute_weight(config: dict) -> float:
    """``train.cell_attribute_weight``: the weight of the cell-attribute loss (0: off, no head)."""
    return float(config["train"].get("cell_attribute_weight", 0.0))


POSITION_PARAMS = ("grid_pos", "grid_rows", "grid_cols")
POSITION_PREFIXES = ("plan_canvas.",)  # the plan canvas's tables are added to the same inputs


def is_position_param(name: str) -> bool:
    return name in POSITION_PARAMS or name.startswith(POSITION_PREFIXES)


def param_groups(model: EvoTokMLLM, lr: float, position_lr_scale: float) -> list[dict]:
    """The trainable parameters; the grid-position ones (``POSITION_PARAMS``, the plan canvas) at
    ``position_lr_scale`` × lr.

    Why a scale: Adam moves a parameter by about lr per step whatever its gradient's size, and
    the projected image features they are added to are ~10× the size of a text embedding."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    position = [p for name, p in named if is_position_param(name)]
    rest = [p for name, p in named if not is_position_param(name)]
    if position_lr_scale == 1.0 or not position:  # one group, in the order older runs' optimizer states have
        return [{"params": [p for _, p in named]}]
    return [{"params": rest}, {"params": position, "lr": lr * position_lr_scale}]


def restrict_trainable(model: EvoTokMLLM, prefixes: list[str]) -> None:
    """Freeze every parameter outside the named modules (``train.train_only``, e.g. ``[projector,
    projector_context]``: the image-understanding input alone, so that drawing stays exactly as it was)."""
    names = [name for name, _ in model.named_parameters()]
    unknown = [pre for pre in prefixes if not any(n == pre or n.startswith(pre + ".") for n in names)]
    if unknown:
        raise ValueError(f"train.train_only names {unknown}, which match no parameter of the model")
    for name, p in model.named_parameters():
        if not any(name == pre or name.startswith(pre + ".") for pre in prefixes):
            p.requires_grad_(False)


def make_dataset(pools: dict, data_cfg: dict, model: EvoTokMLLM, seed: int, tasks: dict | None = None,
                 training: bool = True, cell_attributes: bool = False) -> ChatDataset:
    """``data.mask_answer_gaps``, ``data.mask_caption_gaps``, ``data.resample_scene_questions``,
    ``data.place_questions``, ``data.attribute_dropout``, ``data.onset_weight`` and ``cell_attributes``
    (the scene drawings' cell targets) apply to training batches only: held-out losses stay plain. A model
    with ``config.layout_plan`` writes plans in every batch, held-out ones too: they are its format."""
    return ChatDataset(pools, tasks or data_cfg["tasks"], model.text, model.config.num_cells, model.config.pixel_depth,
                       seed=seed, cfg_dropout=float(data_cfg.get("cfg_dropout", 0.1)),
                       describe_prob=float(data_cfg.get("describe_prob", 0.2)),
                       max_turns=int(data_cfg.get("max_turns", 3)), max_prompt_tokens=model.config.max_prompt_tokens,
                       mask_answer_gaps=training and bool(data_cfg.get("mask_answer_gaps", False)),
                       mask_caption_gaps=training and bool(data_cfg.get("mask_caption_gaps", False)),
                       resample_scene_questions=training and bool(data_cfg.get("resample_scene_questions", False)),
                       place_questions=training and bool(data_cfg.get("place_questions", False)),
                       attribute_dropout=float(data_cfg.get("attribute_dropout", 0.0)) if training else 0.0,
                       cell_attributes=training and cell_attributes, layout_plan=model.config.layout_plan,
                       plan_anchors=model.config.plan_anchors, plan_canvas=model.config.plan_canvas,
                       onset_weight=float(data_cfg.get("onset_weight", 1.0)) if training else 1.0)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (batch[k].to(device) if batch[k] is not None else None) for k in TENSOR_KEYS}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: EvoTokMLLM, eval_batch: dict, questions: list, heldout_scenes, device: torch.device,
             batch_size: int) -> dict[str, float]:
    """Held-out losses on a fixed mixed batch and greedy answer accuracy on held-out scene questions."""
    was_training = model.training
    model.eval()
    out = model(**to_device(eval_batch, device))
    report = {"lm_loss": float(out.lm_loss), "depth_loss": float(out.depth_loss)}
    if questions:
        correct: dict[str, list[int]] = {}
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            codes = torch.from_numpy(heldout_scenes.codes[[j for j, *_ in chunk]].astype("int64"))
            answers = model.answer_batch(None, [q for _, q, _, _ in chunk], max_new_tokens=8, image_codes=codes)
            for (_, _, truth, category), answer in zip(chunk, answers):
                correct.setdefault(category, []).append(int(answer.strip().lower() == truth.lower()))
        every = [c for v in correct.values() for c in v]
        report["answer_accuracy"] = sum(every) / len(every)
        report.update({f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(correct.items())})
    model.train(was_training)
    return report


class TimeBudget:
    """``train.time_budget_minutes``: fit the training steps to a fixed time (a lent GPU, say).

    The budget counts from the first training step. At ``FIT_AT`` steps after it the total
    becomes the steps that fit in the rest of the budget at the speed since the last fit (the
    first window starts ``SKIP`` steps in), never more than ``train.steps``; the cosine schedule
    decays over that total. Several fits because the first steps run slow while loader workers
    start (seen on an H200: 0.3 s a step over steps 5-25, 0.07 s later), and a fit made in the
    warm-up or just after it moves the learning rate only a little. Evaluations and saves are
    not counted: keep them rare in such a run, and leave room for the final ones. The fitted
    total is saved with the training state, and ``--resume`` keeps it rather than fitting again."""

    SKIP, FIT_AT = 5, (25, 100, 400)

    def __init__(self, minutes: float | None, start_step: int, max_steps: int):
        self.deadline = time.time() + 60 * float(minutes) if minutes else None
        self.start_step, self.max_steps, self.mark = start_step, max_steps, None

    def fit(self, step: int) -> int | None:
        """The new total at a fit point (at most ``max_steps``, at least ``step + 1``), else None."""
        if self.deadline is None:
            return None
        done = step - self.start_step
        if done == self.SKIP:
            self.mark = (step, time.time())
        if done not in self.FIT_AT or self.mark is None:
            return None
        (since, then), now = self.mark, time.time()
        self.mark = (step, now)
        fits = step + int((self.deadline - now) / ((now - then) / (step - since)))
        return max(step + 1, min(self.max_steps, fits))


def main(argv: list[str] | None = None) -> dict:
    args, config = parse_run_args(argv, __doc__)
    train_cfg, data_cfg, eval_cfg = config["train"], config["data"], config.get("eval", {})
    run_dir = Path(train_cfg["output_dir"])
    seed = int(train_cfg.get("seed", 0))

    accelerator = Accelerator(
        mixed_precision=train_cfg.get("mixed_precision", "no") if torch.cuda.is_available() else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if not torch.cuda.is_available() and train_cfg.get("cpu_threads"):
        torch.set_num_threads(int(train_cfg["cpu_threads"]))
    set_seed(seed + accelerator.process_index)

    cell_weight = cell_attribute_weight(config)  # the scene drawings' cell-attribute loss (0: off)
    tokenizer = EvoTok.from_pretrained(config["model"]["image_tokenizer"]).to(accelerator.device)
    plans = bool(data_cfg.get("layout_plan", False))  # drawings write layout plans from the scenes' objects
    onsets = float(data_cfg.get("onset_weight", 1.0)) != 1.0  # the code loss weighs where objects begin
    pools = build_pools(tokenizer, data_cfg, "train", data_cfg["pools"], accelerator,
                        scene_objects=cell_weight > 0 or plans or onsets)
    heldout = build_pools(tokenizer, data_cfg, "heldout", data_cfg.get("heldout_pools", {}), accelerator,
                          scene_objects=plans)

    resuming = args.resume and (run_dir / STATE_FILE).exists()
    model = build_model(config, tokenizer, pools, run_dir, resuming, accelerator)
    model.set_trainable(bool(train_cfg.get("train_lm", True)))
    if train_cfg.get("train_only"):
        restrict_trainable(model, list(train_cfg["train_only"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, float(train_cfg["lr"]), float(train_cfg.get("position_lr_scale", 1.0))),
                            lr=float(train_cfg["lr"]), betas=tuple(train_cfg.get("betas", (0.9, 0.95))),
                            weight_decay=float(train_cfg.get("weight_decay", 0.0)))
    total_steps = int(train_cfg["steps"])
    warmup = int(train_cfg.get("warmup_steps", 0))
    min_ratio = float(train_cfg.get("min_lr", train_cfg["lr"])) / float(train_cfg["lr"])
    # the closure reads total_steps when called, so a time budget's refit reshapes the schedule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps, min_ratio))

    step, fitted_total = 0, None
    if resuming:
        state = load_training_state(run_dir / STATE_FILE)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        fitted_total = state.get("fitted_total_steps")  # a time budget fitted it: keep that schedule
        if fitted_total:
            total_steps = int(fitted_total)
        set_rng_state(state["rng"][min(accelerator.process_index, len(state["rng"]) - 1)])
        accelerator.print(f"resumed {run_dir} at step {step}")
    elif args.resume:
        accelerator.print(f"--resume: no state in {run_dir}, starting fresh")
    if accelerator.is_main_process:
        copy_config(args.config, run_dir, args.set)

    wrapped, opt = accelerator.prepare(model, opt)
    model = accelerator.unwrap_model(wrapped)
    device = accelerator.device
    pad_id = model.text.ids["pad"]
    dataset = make_dataset(pools, data_cfg, model, seed, cell_attributes=cell_weight > 0)
    model.text.learn_words(dataset.texts_beyond_records())  # saved with the model; the app warns on unknown words
    batch_size = int(train_cfg["batch_size"])

    eval_batch, questions, heldout_scenes = None, [], heldout.get("scenes")
    if heldout:
        eval_tasks = {t: w for t, w in data_cfg["tasks"].items() if TASKS[t][0] in heldout}
        if eval_tasks:
            held_ds = make_dataset(heldout, data_cfg, model, seed + 10_000, eval_tasks, training=False)
            eval_batch = collate([held_ds[i] for i in range(int(eval_cfg.get("batch_size", 32)))], pad_id)
        if heldout_scenes is not None:
            questions = heldout_questions(heldout_scenes, int(eval_cfg.get("questions", 128)))

    logger = Logger(run_dir, accelerator.is_main_process, bool(train_cfg.get("tensorboard", False)))
    log_every, eval_every, save_every = (int(train_cfg.get(k, d)) for k, d in
                                         (("log_every", 10), ("eval_every", 500), ("save_every", 500)))
    depth_weight = float(train_cfg.get("depth_loss_weight", 1.0))
    input_noise = float(train_cfg.get("input_code_noise", 0.0))  # swapped input cells (evotok.mllm.input_noise)
    read_back_rate = float(train_cfg.get("read_back_rate", 0.0))  # images read as drawings are (evotok.mllm.read_back)

    def save(final: bool = False) -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "step": step, "fitted_total_steps": fitted_total, "rng": [rng_state()], "config": config}
        save_checkpoint(accelerator, run_dir, state, model, final)

    history: list[dict] = []
    evals: list[dict] = []
    started = time.time()
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="mllm")

    def run_eval() -> None:
        report = evaluate(model, eval_batch, questions, heldout_scenes, device, int(eval_cfg.get("answer_batch_size", 64)))
        logger.scalars(report, step, "eval/")
        evals.append({"step": step, **report})
        if accelerator.is_main_process:
            acc = f"; held-out answer accuracy {report['answer_accuracy']:.3f}" if "answer_accuracy" in report else ""
            bar.write(f"step {step}: held-out lm {report['lm_loss']:.3f} depth {report['depth_loss']:.3f}{acc}")
            append_jsonl(run_dir / "eval.jsonl", {"step": step, **report})

    if eval_batch is not None and step == 0 and eval_cfg.get("at_start", True):
        run_eval()  # the untrained baseline
    batches = iterate_batches(dataset, step, batch_size, accelerator.process_index, accelerator.num_processes,
                              int(train_cfg.get("num_workers", 0)), functools.partial(collate, pad_id=pad_id))
    budget = TimeBudget(None if fitted_total else train_cfg.get("time_budget_minutes"), step, int(train_cfg["steps"]))
    wrapped.train()
    while step < total_steps:
        batch = to_device(next(batches), device)
        with accelerator.autocast():
            out = wrapped(**batch, depth_loss_weight=depth_weight, cell_attribute_weight=cell_weight,
                          input_code_noise=input_noise, read_back_rate=read_back_rate)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(out.loss)
        if train_cfg.get("grad_clip"):
            accelerator.clip_grad_norm_(params, float(train_cfg["grad_clip"]))
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        fitted = budget.fit(step)  # every rank reaches the fit points at the same steps
        if fitted is not None and accelerator.num_processes > 1:
            fitted = broadcast_object_list([fitted])[0]  # all ranks end where the main process's clock says
        if fitted is not None and fitted != total_steps:
            total_steps = fitted_total = fitted
            bar.total = total_steps
            accelerator.print(f"time budget: at step {step} the run is fitted to end at step {total_steps}")

        if step % log_every == 0 or step == total_steps:
            values = to_float_dict({"loss": out.loss.detach(), "lm_loss": out.lm_loss.detach(),
                                    "depth_loss": out.depth_loss.detach(), "lr": sched.get_last_lr()[0]})
            values.update({f"depth_loss_stage{j + 1}": float(v) for j, v in enumerate(out.depth_loss_per_stage)})
            if out.cell_attribute_loss is not None:
                values["cell_attribute_loss"] = float(out.cell_attribute_loss)
            bar.set_postfix(lm=f"{values['lm_loss']:.3f}", depth=f"{values['depth_loss']:.3f}")
            logger.scalars(values, step, "train/")
            history.append({"step": step, **values})
        if eval_batch is not None and (step % eval_every == 0 or step == total_steps):
            run_eval()
        if step % save_every == 0 and step < total_steps:
            save()
    bar.close()
    elapsed = time.time() - started
    save(final=True)
    logger.close()
    return finish_run(accelerator, run_dir, {"steps": step, "seconds": elapsed, "history": history, "eval": evals})


if __name__ == "__main__":
    main()
