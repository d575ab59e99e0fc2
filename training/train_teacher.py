"""Train the bundled semantic teacher: a small ViT with SigLIP's sigmoid image-text loss.

Images come from the offline data mixture (scenes, clip art, Fashion-MNIST, photo crops); each is
paired with either its own caption or one of the simple statements that are true of it ("a photo
of a trouser", "a photo of a red circle", "a photo of three blue stars", "a photo of a red circle
left of a blue star"), so that zero-shot prompts later match the teacher's text side. Texts are
embedded by the frozen all-MiniLM-L6-v2 and a learned projection.

    python training/train_teacher.py --config training/configs/teacher_tiny.yaml --out assets/teacher
Continue an interrupted run exactly (model, optimizer, step, RNG; the data position is the step):
    python training/train_teacher.py --config training/configs/teacher_tiny.yaml --resume
Override config values: ``--set train.steps=100 train.batch_size=32``. On a CUDA machine the same
command trains on the GPU. Afterwards ``training/eval_teacher.py --teacher OUT --card`` measures it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm  # noqa: E402

from evotok.data.base import Sample, item_rng  # noqa: E402
from evotok.data.mixture import MixtureDataset, build_sources  # noqa: E402
from evotok.data.scenes import COLOURS, HELDOUT_PAIRS, TRAIN_PAIRS, SceneWorld  # noqa: E402
from evotok.hub import CONFIG_NAME, WEIGHTS_NAME, CheckpointError  # noqa: E402
from evotok.images import ImageError, pil_to_tensor  # noqa: E402
from evotok.mllm.answer_gaps import gap_colours, gap_shapes, shape_word, words  # noqa: E402
from evotok.probe import fill_template, scene_questions, scene_statements  # noqa: E402
from evotok.teacher import TinySigLIPConfig, TinySigLIPTeacher, match_targets  # noqa: E402
from evotok.text_encoder import SentenceEncoder  # noqa: E402
from training.common import (STATE_FILE, Logger, copy_config, iterate_batches, learning_rate, load_training_state,  # noqa: E402
                             parse_run_args, rng_state, run_device, save_training_state, set_rng_state)
from training.eval_teacher import scene_zero_shot  # noqa: E402

TEXT_SEPARATOR = "\n"  # captions never contain it; joins a sample's true texts into one string


def true_texts(sample: Sample, both_orders: bool = True) -> list[str]:
    """The sample's caption and the simple statements that are also true of it (relations stated
    both ways unless ``both_orders`` is False, see ``scene_statements``)."""
    texts = [sample.caption]
    label = sample.label or ""
    if sample.source == "scenes" and sample.attributes:
        texts += scene_statements(sample.attributes, both_orders)
    elif sample.source == "fashion_mnist" and label:
        texts += [fill_template("a photo of {}", label), label]
    elif sample.source == "clipart" and label:
        texts += [f"a clip art of {label}", f"a clip art from the {label} category"]
    elif sample.source == "photos" and label:
        from evotok.data.sources import PHOTO_DESCRIPTIONS

        if label in PHOTO_DESCRIPTIONS:
            texts.append(f"a photo of {PHOTO_DESCRIPTIONS[label]}")
    return list(dict.fromkeys(texts))


def objects_of(sample: Sample) -> list[dict]:
    return list(sample.attributes.get("objects", [])) if sample.source == "scenes" and sample.attributes else []


def hard_negatives(sample: Sample, split: str = "train") -> list[str]:
    """False statements one attribute away from a true one: the wrong candidates of the scene's
    questions (another shape, colour, count or relation). In the train split none names a
    held-out colour-shape pair, so those compositions stay unseen on the text side too."""
    return list(hard_negative_truths(sample, split))


def hard_negative_truths(sample: Sample, split: str = "train") -> dict[str, str]:
    """Each hard negative (see ``hard_negatives``) -> the true statement of its question."""
    if sample.source != "scenes" or not sample.attributes:
        return {}
    excluded = [f"{colour} {shape}" for colour, shape in HELDOUT_PAIRS] if split == "train" else []
    truths: dict[str, str] = {}
    for q in scene_questions(sample.attributes):
        for j, candidate in enumerate(q.candidates):
            if j != q.answer and not any(phrase in candidate for phrase in excluded):
                truths.setdefault(candidate, q.candidates[q.answer])
    return truths


class CaptionedImages(Dataset):
    """Mixture item ``i`` with one training text and all texts true of it.

    ``{"image": 3×R×R in [-1, 1], "text": str, "true_texts": str, "negatives": str, "negative_truths": str,
    "objects": str, "source": str}``
    (lists of texts joined by ``TEXT_SEPARATOR``). The text is the caption with probability
    ``caption_prob``, else a random true statement; up to ``negatives`` hard negatives come along.
    All choices are seeded by ``(seed, i)``, so resuming at a step sees the same texts.
    """

    def __init__(self, mixture: MixtureDataset, caption_prob: float = 0.5, negatives: int = 0, seed: int = 0,
                 split: str = "train", both_orders: bool = True) -> None:
        if not 0.0 <= caption_prob <= 1.0:
            raise ValueError(f"caption_prob must be in [0, 1], got {caption_prob}")
        if negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {negatives}")
        self.mixture = mixture
        self.caption_prob = caption_prob
        self.negatives = negatives
        self.seed = seed
        self.split = split
        self.both_orders = both_orders

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self._sample(index)
        texts = true_texts(sample, self.both_orders)
        rng = item_rng(self.seed, index, 0x7EAC)
        if len(texts) == 1 or rng.uniform() < self.caption_prob:
            text = sample.caption
        else:
            text = texts[1 + int(rng.integers(len(texts) - 1))]
        truths = hard_negative_truths(sample, self.split) if self.negatives else {}
        negatives = list(truths)
        if len(negatives) > self.negatives:
            negatives = [negatives[k] for k in sorted(rng.choice(len(negatives), self.negatives, replace=False))]
        return {"image": pil_to_tensor(sample.image, self.mixture.resolution), "text": text,
                "true_texts": TEXT_SEPARATOR.join(texts), "negatives": TEXT_SEPARATOR.join(negatives),
                "negative_truths": TEXT_SEPARATOR.join(truths[n] for n in negatives),
                "objects": TEXT_SEPARATOR.join(f"{o['colour']} {o['shape']}" for o in objects_of(sample)),
                "source": sample.source}

    def _sample(self, index: int) -> Sample:
        """The mixture's sample; an unreadable image (e.g. a clip-art decompression bomb) is
        replaced by another item chosen deterministically, so resume stays exact."""
        for attempt in range(4):
            try:
                return self.mixture.sample((index + attempt * 1_000_003) % len(self.mixture))
            except ImageError as err:
                error = err
        raise error


def build_dataset(data_cfg: dict, split: str = "train") -> CaptionedImages:
    """The mixture of ``data.mixture`` (see ``evotok.data.build_mixture``), with optional
    ``data.scene_weights`` (scene-type mix), ``data.caption_prob``, ``data.hard_negatives`` and
    ``data.relation_statements`` ("both": "A left of B" and "B right of A"; "subject_first": only
    the first, the order the position questions use)."""
    if data_cfg.get("relation_statements", "both") not in ("both", "subject_first"):
        raise ValueError(f"data.relation_statements must be 'both' or 'subject_first', got {data_cfg['relation_statements']!r}")
    mix = dict(data_cfg.get("mixture", {}))
    resolution, seed = int(mix.get("resolution", 64)), int(mix.get("seed", 0))
    weights = dict(mix.get("weights") or {"scenes": 1.0})
    sources = build_sources([n for n, w in weights.items() if w > 0], resolution=resolution, seed=seed, split=split,
                            roots=mix.get("roots"), skip_missing=bool(mix.get("skip_missing", False)))
    if data_cfg.get("scene_weights") and "scenes" in sources:
        sources["scenes"] = SceneWorld(resolution=resolution, seed=seed, split=split,
                                       scene_weights=data_cfg["scene_weights"])
    weights = {n: w for n, w in weights.items() if n in sources}
    mixture = MixtureDataset(sources, weights, resolution=resolution, seed=seed)
    return CaptionedImages(mixture, float(data_cfg.get("caption_prob", 0.5)), int(data_cfg.get("hard_negatives", 0)),
                           seed, split, both_orders=data_cfg.get("relation_statements", "both") == "both")


def cooccurrence_mask(objects: list[list[tuple[str, str]]], texts: list[str],
                      pairs: frozenset[tuple[str, str]] = frozenset(TRAIN_PAIRS)) -> torch.Tensor:
    """``b n`` 1/0: 0 leaves out a pair whose negative would only teach a co-occurrence gap.

    A text that names shapes but no colour ("a photo of a star") is not contrasted with an image
    holding an object whose colour never appears with that shape in training (``pairs``), and a
    text that names colours but no shape ("a photo of a black object") is not contrasted with an
    image holding a shape that colour never takes. Otherwise "no black object is ever a star"
    is learned as "black means not a star", and held-out combinations are ranked last.
    """
    mask = torch.ones(len(objects), len(texts))
    image_colours = [{c for c, _ in objs} for objs in objects]
    image_shapes = [{s for _, s in objs} for objs in objects]
    for j, text in enumerate(texts):
        named = words(text)
        colours = {w for w in named if w in COLOURS}
        shapes = {shape_word(w) for w in named} - {None}
        if bool(colours) == bool(shapes):
            continue
        if shapes:  # colours that never take one of these shapes in training
            gap, of_image = {c for s in shapes for c in gap_colours(s, pairs)}, image_colours
        else:       # shapes that never take one of these colours
            gap, of_image = {s for c in colours for s in gap_shapes(c, pairs)}, image_shapes
        for i, found in enumerate(of_image):
            if found & gap:
                mask[i, j] = 0.0
    return mask


def batch_objects(batch: dict) -> list[list[tuple[str, str]]]:
    return [[tuple(o.split(" ", 1)) for o in joined.split(TEXT_SEPARATOR) if o] for joined in batch["objects"]]


def batch_texts(batch: dict, with_truths: bool = False) -> list[str]:
    """The batch's texts: one per image (in order), then its distinct hard negatives and, with
    ``with_truths`` (for the ranking loss), the true statements they are ranked against."""
    texts = list(batch["text"])
    chosen = set(texts)
    keys = ("negatives", "negative_truths") if with_truths else ("negatives",)
    extra = [n for key in keys for joined in batch.get(key, []) for n in joined.split(TEXT_SEPARATOR) if n]
    return texts + [n for n in dict.fromkeys(extra) if n not in chosen]


def own_hard_negatives(batch: dict, texts: list[str]):
    """Yield ``(image row, negative column, truth column)`` for each image's own hard negatives
    (the truth column is None when ``texts`` were built without truths)."""
    column = {text: j for j, text in enumerate(texts)}
    truths = batch.get("negative_truths") or [""] * len(batch["negatives"])
    for i, (joined_negatives, joined_truths) in enumerate(zip(batch["negatives"], truths)):
        negatives = [n for n in joined_negatives.split(TEXT_SEPARATOR) if n]
        true = [t for t in joined_truths.split(TEXT_SEPARATOR) if t] or [None] * len(negatives)
        for negative, truth in zip(negatives, true):
            yield i, column[negative], column.get(truth)


def ranking_pairs(batch: dict, texts: list[str], mask: torch.Tensor | None = None) -> torch.Tensor:
    """``P × 3`` rows (image, column of a true statement, column of its hard negative); pairs whose
    negative ``mask`` leaves out (a co-occurrence gap, see ``cooccurrence_mask``) are dropped, or
    the ranking would teach "black means not a star" again."""
    rows = [(i, truth, negative) for i, negative, truth in own_hard_negatives(batch, texts)
            if truth is not None and (mask is None or mask[i, negative] > 0)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


def weight_hard_negatives(batch: dict, texts: list[str], weight: float, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-pair loss weights: each image's own hard negatives count ``weight`` times.

    A flipped relation is one text among hundreds in a batch, and with order-blind text it looks
    like the true one, so unweighted it barely moves the loss: relations stayed at chance.
    """
    if weight == 1.0:
        return mask
    weights = mask.clone() if mask is not None else torch.ones(len(batch["negatives"]), len(texts))
    for i, negative, _ in own_hard_negatives(batch, texts):
        weights[i, negative] *= weight
    return weights


LOCKS = ("none", "features", "tower")


def init_from_teacher(model: TinySigLIPTeacher, folder: str | Path) -> list[str]:
    """Copy the modules of a trained teacher whose tensors all match ``model``'s by name and shape;
    return the names left at their fresh initialisation (new modules such as a text adapter, or a
    text projection whose input width changed: its bias is then fresh too)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text()) if (folder / CONFIG_NAME).is_file() else {}
    if config.get("model_type") != TinySigLIPTeacher.model_type or not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"train.init_from: {folder} is not an EvoTok teacher folder ({CONFIG_NAME} with "
                              f"model_type {TinySigLIPTeacher.model_type!r} and {WEIGHTS_NAME})")
    source = load_file(str(folder / WEIGHTS_NAME))
    own = model.state_dict()

    def module(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else name

    mismatched = {module(n) for n, t in own.items() if n not in source or source[n].shape != t.shape}
    loaded = {n: t for n, t in source.items() if n in own and module(n) not in mismatched}
    model.load_state_dict(loaded, strict=False)
    return sorted(set(own) - set(loaded))


def lock_image_side(model: TinySigLIPTeacher, lock: str) -> list[str]:
    """Freeze part of the image side for a readout refit (LiT-style locked-image tuning); return
    the frozen parameter names.

    ``features``: everything ``image_features`` depends on, so the patch features (and a tokenizer's
    ``teacher_features_sha256`` pin) stay exactly as they were; ``tower``: also the last block and
    its LayerNorm, so only pooling norms, projections, the text side and the logit scale/bias train.
    """
    if lock not in LOCKS:
        raise ValueError(f"train.lock must be one of {LOCKS}, got {lock!r}")
    if lock == "none":
        return []
    prefixes = model.feature_prefixes
    if lock == "tower":
        prefixes += (f"blocks.{model.config.depth - 1}.", "norm.")
    frozen = []
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def make_optimizer(model: TinySigLIPTeacher, train_cfg: dict) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms, position embeddings
    and the logit scale/bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "pos_embed" not in name and "probe" not in name else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": float(train_cfg.get("weight_decay", 0.0))},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=float(train_cfg["lr"]), betas=tuple(train_cfg.get("betas", (0.9, 0.98))))


def main(argv: list[str] | None = None) -> dict:
    args, config = parse_run_args(argv, __doc__, "trained teacher")
    train_cfg, data_cfg = config["train"], config.get("data", {})
    run_dir = Path(train_cfg["output_dir"])
    out_dir = Path(args.out) if args.out else run_dir / "final"
    device = run_device(train_cfg)

    sentences = SentenceEncoder(cache_size=int(train_cfg.get("text_cache_size", 65536)), device=device)
    model = TinySigLIPTeacher(TinySigLIPConfig(**config.get("model", {})), text_encoder=sentences).to(device)
    init_from = train_cfg.get("init_from")
    if init_from and not (args.resume and (run_dir / STATE_FILE).exists()):  # a resumed run has its own weights
        fresh = init_from_teacher(model, init_from)
        print(f"initialised from {init_from}; fresh: {', '.join(fresh) or 'nothing'}")
    frozen = lock_image_side(model, str(train_cfg.get("lock", "none")))
    if frozen:
        print(f"locked {len(frozen)} image-side tensors (train.lock: {train_cfg['lock']})")
    opt = make_optimizer(model, train_cfg)
    step, elapsed_before, history = 0, 0.0, []
    if args.resume and (run_dir / STATE_FILE).exists():
        state = load_training_state(run_dir / STATE_FILE)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed_before, history = state["step"], state.get("seconds", 0.0), state.get("history", [])
        set_rng_state(state["rng"])
        print(f"resumed {run_dir} at step {step}")
    elif args.resume:
        print(f"--resume: no state in {run_dir}, starting fresh")
    copy_config(args.config, run_dir, args.set)

    dataset = build_dataset(data_cfg, "train")
    batch_size, total_steps = int(train_cfg["batch_size"]), int(train_cfg["steps"])
    batches = iterate_batches(dataset, step, batch_size, 0, 1, int(train_cfg.get("num_workers", 0)))
    eval_cfg = config.get("eval", {})
    eval_world = SceneWorld(resolution=int(data_cfg.get("mixture", {}).get("resolution", 64)),
                            seed=int(eval_cfg.get("seed", 1234)), split="heldout")
    logger = Logger(run_dir, True, bool(train_cfg.get("tensorboard", False)))
    log_every, eval_every, save_every = (int(train_cfg.get(k, d)) for k, d in
                                         (("log_every", 10), ("eval_every", 250), ("save_every", 100)))
    clip = float(train_cfg.get("grad_clip", 0.0))
    ranking_weight = float(data_cfg.get("ranking_weight", 0.0))

    def save() -> None:
        save_training_state(run_dir / STATE_FILE, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": rng_state(),
            "seconds": elapsed_before + time.time() - started, "history": history, "config": config})

    started = time.time()
    bar = tqdm(total=total_steps, initial=step, desc="teacher", dynamic_ncols=True)
    model.train()
    timing = {"data_s": 0.0, "text_s": 0.0, "model_s": 0.0}
    while step < total_steps:
        tick = time.time()
        batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, train_cfg)
        texts = batch_texts(batch, with_truths=bool(ranking_weight))
        targets = match_targets([t.split(TEXT_SEPARATOR) for t in batch["true_texts"]], texts)
        mask = cooccurrence_mask(batch_objects(batch), texts) if data_cfg.get("mask_cooccurrence_gaps") else None
        mask = weight_hard_negatives(batch, texts, float(data_cfg.get("hard_negative_weight", 1.0)), mask)
        tock = time.time()
        sentence_embeds = model.encode_sentences(texts)  # frozen MiniLM, cached per string
        timing["data_s"] += tock - tick
        timing["text_s"] += time.time() - tock
        tick = time.time()
        pairs = ranking_pairs(batch, texts, mask) if ranking_weight else None
        loss = model.loss(batch["image"].to(device), sentence_embeds, targets, mask, pairs, ranking_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        timing["model_s"] += time.time() - tick
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == total_steps:
            values = {"loss": loss.item(), "lr": opt.param_groups[0]["lr"], "logit_scale": model.logit_scale.item(),
                      "logit_bias": model.logit_bias.item(), "positives": targets.sum().item() / targets.shape[0], "texts": len(texts),
                      **{k: v / log_every for k, v in timing.items()}}
            timing = dict.fromkeys(timing, 0.0)
            bar.set_postfix(loss=f"{values['loss']:.3f}", t=f"{values['logit_scale']:.1f}",
                            b=f"{values['logit_bias']:.1f}", data=f"{values['data_s']:.2f}s",
                            text=f"{values['text_s']:.2f}s", model=f"{values['model_s']:.2f}s")
            logger.scalars(values, step, "train/")
            history.append({"step": step, **values})
        if eval_every and (step % eval_every == 0 or step == total_steps):
            scores = scene_zero_shot(model, eval_world, int(eval_cfg.get("scenes", 300)))
            model.train()
            logger.scalars(scores, step, "eval/")
            history.append({"step": step, **{f"eval/{k}": v for k, v in scores.items()}})
            bar.write(f"step {step}: held-out scene zero-shot " +
                      " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        if save_every and step % save_every == 0 and step < total_steps:
            save()
    bar.close()
    seconds = elapsed_before + time.time() - started
    save()
    model.save_pretrained(out_dir)
    summary = {"steps": step, "seconds": round(seconds, 1), "batch_size": batch_size,
               "cpu_seconds_this_process": round(time.process_time(), 1),
               "images_seen": step * batch_size,
               "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
               "device": str(device), "threads": torch.get_num_threads(), "config_file": Path(args.config).as_posix(),
               "config": config, "history": history}
    if init_from:  # the run it continued, so the card can report both phases and their total time
        previous = Path(init_from) / "training.json"
        summary["init_from"] = {"path": Path(init_from).as_posix(), "feature_sha256": model.feature_digest(),
                                "training": json.loads(previous.read_text()) if previous.is_file() else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "training.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    logger.close()
    print(f"saved the teacher to {out_dir} after {step} steps ({seconds / 60:.1f} min)")
    return summary


if __name__ == "__main__":
    main()
