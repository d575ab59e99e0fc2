"""Training data of the multimodal model: cached tokenizer codes and mixed chat / text-to-image
examples.

The image tokenizer is frozen, so each image of a source is encoded once: an :class:`ImagePool`
holds the full-depth codes of the first ``count`` items of a source plus their texts (caption,
label, question/answer pairs), built in resumable chunks. A :class:`ChatDataset` item ``i`` is a
pure function of ``(seed, i)`` (task, image, turns, prompt dropout), so the data position of a
run is its step, as everywhere in EvoTok.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..data.base import item_rng
from ..data.scenes import (COUNT_WORDS, IMAGE_MIDDLE, SceneObject, is_place_question, place_questions,
                           question_candidates, split_pairs)
from .answer_gaps import caption_gaps, gap_answers, words
from .cell_attributes import IGNORE_CELL, cell_attribute_targets
from .chat import IGNORE, encode_chat, encode_generation
from .layout_plan import PlannedObject, anchor_row, plan_of, plan_text
from .onset_weights import onset_weights
from .plan_canvas import canvas_ids, stack_canvases
from .prompt_parts import colours_only, shapes_only
from .text_tokenizer import TextTokenizer

# task name -> (pool it draws images from, kind)
TASKS: dict[str, tuple[str | None, str]] = {
    "scene_t2i": ("scenes", "generate"),
    "scene_qa": ("scenes", "chat"),
    "clipart_t2i": ("clipart", "generate"),
    "clipart_qa": ("clipart", "chat"),
    "fashion_t2i": ("fashion_mnist", "generate"),
    "fashion_qa": ("fashion_mnist", "chat"),
    "text": (None, "text"),
}
_UNTELLING = {"yes", "no", *COUNT_WORDS}  # answers that earlier turns' words do not give away
LEADING_CATEGORIES = ("shape", "colour", "position")  # asked first in resampled scene conversations
_OPTIONS = {"small", "large", "left", "right", "above", "below"}  # the alternatives "... or ...?" questions offer
DESCRIBE_QUESTIONS = ("Describe the image.", "Write a caption for this image.", "What does the picture show?")
LABEL_QUESTIONS = {
    "clipart": ("What category is this clip art from?", "Which category does this picture belong to?",
                "What kind of clip art is this?"),
    "fashion_mnist": ("What is this?", "What kind of clothing is this?", "What item is shown?",
                      "Which piece of clothing is in the picture?"),
}


def text_only_pairs() -> list[tuple[str, str]]:
    """Questions without an image, so the chat also answers when no image is given."""
    from ..data.scenes import COLOURS, SHAPES
    from ..data.sources import FASHION_MNIST_CLASSES

    def listing(words: Sequence[str]) -> str:
        return ", ".join(words[:-1]) + " and " + words[-1]

    shapes, colours, clothes = listing(list(SHAPES)), listing(list(COLOURS)), listing(list(FASHION_MNIST_CLASSES))
    can = "I can answer questions about an image and draw simple pictures from a short description"
    return [
        ("What shapes do you know?", shapes), ("Which shapes can you draw?", shapes),
        ("What colours do you know?", colours), ("Which colors can you draw?", colours),
        ("What kinds of clothing do you know?", clothes),
        ("What can you do?", can), ("Who are you?", "a small model trained on scenes, clip art and clothes. " + can),
        ("Hello", "hello! show me an image and ask about it, or ask me to draw something"),
        ("Hi", "hello! show me an image and ask about it, or ask me to draw something"),
    ]


# ---------------------------------------------------------------------------- pools
@dataclass
class ImagePool:
    """Codes ``N h w D`` (int16/int32) and one text record per image of a source."""

    name: str
    codes: np.ndarray
    records: list[dict[str, Any]]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> Iterator[str]:
        for r in self.records:
            yield r["caption"]
            if r.get("label"):
                yield r["label"]
            for q, a in r.get("qa", []):
                yield q
                yield a


def _record(sample) -> dict[str, Any]:
    attrs = sample.attributes or {}
    record = {"caption": sample.caption, "label": sample.label, "qa": [list(p) for p in sample.qa]}
    if "qa_categories" in attrs:
        record["qa_categories"] = list(attrs["qa_categories"])
        record["scene_type"] = attrs.get("scene_type")
    if "objects" in attrs:
        record["objects"] = [_object_fields(o) for o in attrs["objects"]]
    return record


def _object_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a pool record keeps of a scene object (``SceneObject.to_dict`` less the derived fields)."""
    return {k: obj[k] for k in ("shape", "colour", "size", "centre")}


def attach_scene_objects(pool: ImagePool, world, checks: int = 16) -> None:
    """Give each record of a scene pool its objects (``shape``, ``colour``, ``size``, ``centre``) from
    ``world.scene(i)``, for pools encoded before records kept them. Scene pools skip no image, so
    record ``i`` is scene ``i``; ``checks`` evenly spaced records must carry the caption the world
    gives them, or the pool was built from another world and nothing is changed."""
    n = len(pool)
    for i in sorted({round(k * (n - 1) / max(1, checks - 1)) for k in range(checks)} if n else ()):
        if world[i].caption != pool.records[i]["caption"]:
            raise ValueError(f"pool {pool.name!r} record {i} does not match {world!r} (its caption differs); "
                             "was it built from another seed or split?")
    for i, record in enumerate(pool.records):
        if "objects" not in record:
            record["objects"] = [_object_fields(o.to_dict()) for o in world.scene(i).objects]


def build_pool(folder: str | os.PathLike, name: str, source, count: int, resolution: int, tokenizer: torch.nn.Module,
               batch_size: int = 64, chunk_size: int = 1024, digest: str = "",
               progress: Callable[[int], None] | None = None, workers: int = 0) -> ImagePool:
    """Encode the first ``count`` items of ``source`` (fewer if it is shorter, or has unreadable
    images) into ``folder``.

    Chunks already on disk are kept, so an interrupted build continues where it stopped; each
    chunk is written to a temporary file and renamed. ``progress(n)`` is told of each finished chunk.
    ``workers`` > 0 renders the items in that many forked processes (the encoding stays here):
    on a GPU the rendering is most of the time. The pool is the same either way.
    """
    with _Renderer(source, workers) as render:
        return _build_pool(Path(folder), name, source, count, resolution, tokenizer, batch_size, chunk_size,
                           digest, progress, render)


class _Renderer:
    """``render(start, stop)``: the readable items of ``source`` in that range, in order, in this
    process or split over forked workers (fork: the source is inherited, never pickled)."""

    def __init__(self, source, workers: int):
        self.source, self.workers, self.pool = source, int(workers), None

    def __enter__(self) -> Callable[[int, int], list]:
        if self.workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_set_render_source, initargs=(self.source,))
        return self.render

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def render(self, start: int, stop: int) -> list:
        if self.pool is None:
            return _render_range(self.source, start, stop)
        step = -(-(stop - start) // self.workers)
        parts = self.pool.map(_render_in_worker, [(i, min(i + step, stop)) for i in range(start, stop, step)])
        return [s for part in parts for s in part]


_RENDER_SOURCE = None


def _set_render_source(source) -> None:
    global _RENDER_SOURCE
    _RENDER_SOURCE = source


def _render_in_worker(bounds: tuple[int, int]) -> list:
    return _render_range(_RENDER_SOURCE, *bounds)


def _render_range(source, start: int, stop: int) -> list:
    return [s for s in (load_or_skip(source, i) for i in range(start, stop)) if s is not None]


def _build_pool(folder: Path, name: str, source, count: int, resolution: int, tokenizer: torch.nn.Module,
                batch_size: int, chunk_size: int, digest: str, progress: Callable[[int], None] | None,
                render: Callable[[int, int], list]) -> ImagePool:
    from ..images import pil_to_tensor

    folder.mkdir(parents=True, exist_ok=True)
    count = min(int(count), len(source))
    meta = {"name": name, "count": count, "resolution": resolution, "chunk_size": chunk_size, "tokenizer": digest,
            "split": getattr(source, "split", None), "seed": getattr(source, "seed", None)}
    meta_file = folder / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()) != meta:
        raise ValueError(f"{folder} holds a different pool ({meta_file.read_text()}); "
                         "remove it or use another cache folder")
    meta_file.write_text(json.dumps(meta))
    device = next(tokenizer.parameters()).device
    dtype = np.int16 if tokenizer.config.codebook_size <= 32768 else np.int32
    for start in range(0, count, chunk_size):
        path = folder / f"chunk_{start // chunk_size:05d}.npz"
        stop = min(start + chunk_size, count)
        if not path.is_file():
            samples = render(start, stop)
            codes = []
            for k in range(0, len(samples), batch_size):
                images = torch.stack([pil_to_tensor(s.image, resolution) for s in samples[k:k + batch_size]])
                codes.append(tokenizer.encode(images.to(device)).cpu().numpy().astype(dtype))
            records = json.dumps([_record(s) for s in samples])
            fd, tmp = tempfile.mkstemp(prefix=".chunk.", suffix=".npz", dir=folder)
            os.close(fd)
            try:
                np.savez(tmp, codes=np.concatenate(codes), records=np.array(records))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        if progress is not None:
            progress(stop - start)
    return load_pool(folder)


def load_or_skip(source, index: int):
    """``source[index]``, or None for an image that cannot be read (e.g. a clip-art file Pillow
    refuses as a decompression bomb): a pool keeps the readable images only."""
    from ..images import ImageError

    try:
        return source[index]
    except ImageError as err:
        warnings.warn(f"{getattr(source, 'source_name', 'source')}[{index}] left out of the pool: {err}", stacklevel=2)
        return None


def _chunk_paths(folder: Path, meta: dict) -> list[Path]:
    chunks = (meta["count"] + meta["chunk_size"] - 1) // meta["chunk_size"]
    return [folder / f"chunk_{k:05d}.npz" for k in range(chunks)]


def pool_is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a finished pool: loading it needs no image source (its data
    may not be installed on the machine that trains, a rented GPU say)."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        return False
    return all(path.is_file() for path in _chunk_paths(folder, json.loads((folder / "meta.json").read_text())))


def load_pool(folder: str | os.PathLike) -> ImagePool:
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    codes, records = [], []
    for path in _chunk_paths(folder, meta):
        if not path.is_file():
            raise FileNotFoundError(f"pool {folder} is incomplete: {path.name} is missing (rebuild it)")
        with np.load(path, allow_pickle=False) as data:
            codes.append(data["codes"])
            records.extend(json.loads(str(data["records"])))
    return ImagePool(meta["name"], np.concatenate(codes), records, meta)


# ---------------------------------------------------------------------------- examples
class ChatDataset(torch.utils.data.Dataset):
    """Item ``i``: one training sequence of a task drawn by ``task_weights``.

    Returns ``{"task", "input_ids", "labels", "image_mask", "gen_mask", "image_codes", "gen_codes"}``
    (lists and numpy arrays; :func:`collate` makes tensors). Text-to-image prompts are dropped
    to the empty prompt with probability ``cfg_dropout`` (the unconditional branch of guidance).

    With ``resample_scene_questions`` a scene conversation draws its questions afresh from every
    question the scene world can ask about the record's objects (about 12 per scene, against the 6
    a record keeps), categories taken in turn so that shape, colour and position questions are not
    crowded out by the many counting ones, and leaves out each turn whose answer an earlier turn
    gave away (:func:`without_told_answers`). The records then need ``objects``
    (:func:`attach_scene_objects`). ``place_questions`` adds one more category to those
    conversations: on which side of the image's middle an object lies
    (:func:`evotok.data.scenes.place_questions`), a one-object step towards the two-object relations.
    ``attribute_dropout``: the share of scene text-to-image captions that name only the shapes or
    only the colours (:mod:`evotok.mllm.prompt_parts`, one or the other at even odds).
    ``cell_attributes``: scene drawings also carry ``cell_targets``, the colour and shape drawn over
    each cell (:mod:`evotok.mllm.cell_attributes`; the records need ``objects``).
    ``layout_plan``: drawings with a prompt write a layout plan before the grid
    (:mod:`evotok.mllm.layout_plan`; scenes from the records' ``objects``, other sources an empty
    one). With ``mask_answer_gaps`` or ``mask_caption_gaps`` the plan's shape words are masked like
    a caption's, so that copying a new pair from the prompt is not taught against. ``plan_anchors``:
    those drawings also carry ``anchor_cells`` (per token, the cell of the plan entry it closes, -1
    elsewhere; ``MLLMConfig.plan_anchors``) and with ``plan_canvas`` ``canvas_ids``, the plan
    entries covering each cell (:mod:`evotok.mllm.plan_canvas`). ``onset_weight`` (other than 1):
    scene drawings with a prompt carry ``cell_weights``, that weight on the cells where each object
    begins and 1 elsewhere (:mod:`evotok.mllm.onset_weights`).
    """

    def __init__(self, pools: Mapping[str, ImagePool], task_weights: Mapping[str, float], text_tokenizer: TextTokenizer,
                 num_cells: int, pixel_depth: int, seed: int = 0, cfg_dropout: float = 0.1, describe_prob: float = 0.2,
                 max_turns: int = 3, max_prompt_tokens: int | None = 64, length: int = 10**9,
                 mask_answer_gaps: bool = False, mask_caption_gaps: bool = False,
                 resample_scene_questions: bool = False, place_questions: bool = False,
                 attribute_dropout: float = 0.0, cell_attributes: bool = False, layout_plan: bool = False,
                 plan_anchors: bool = False, onset_weight: float = 1.0, plan_canvas: bool = False):
        unknown = sorted(set(task_weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; expected some of {sorted(TASKS)}")
        self.tasks = [t for t, w in task_weights.items() if w > 0]
        if not self.tasks:
            raise ValueError("every task weight is zero")
        missing = sorted({TASKS[t][0] for t in self.tasks if TASKS[t][0] is not None} - set(pools))
        if missing:
            raise ValueError(f"tasks need image pools {missing} that were not built")
        p = np.array([task_weights[t] for t in self.tasks], dtype=np.float64)
        self.cdf = np.cumsum(p / p.sum())
        self.pools, self.tok = dict(pools), text_tokenizer
        self.num_cells, self.pixel_depth, self.seed = num_cells, pixel_depth, int(seed)
        self.cfg_dropout, self.describe_prob, self.max_turns = cfg_dropout, describe_prob, max_turns
        self.max_prompt_tokens, self.length = max_prompt_tokens, int(length)
        self.text_pairs = text_only_pairs()
        self.mask_answer_gaps, self.mask_caption_gaps = mask_answer_gaps, mask_caption_gaps
        self.resample_scene_questions = resample_scene_questions
        if place_questions and not resample_scene_questions:
            raise ValueError("place_questions are drawn with the fresh scene questions: "
                             "set resample_scene_questions too")
        self.place_questions = place_questions
        if not 0.0 <= attribute_dropout <= 1.0:
            raise ValueError(f"attribute_dropout must lie in [0, 1], got {attribute_dropout}")
        self.attribute_dropout = float(attribute_dropout)
        self.cell_attributes, self.layout_plan = cell_attributes, layout_plan
        if plan_anchors and not layout_plan:
            raise ValueError("plan_anchors marks the cells of layout plan entries: set layout_plan too")
        self.plan_anchors = plan_anchors
        if plan_canvas and not layout_plan:
            raise ValueError("plan_canvas draws what the layout plan puts at each cell: set layout_plan too")
        self.plan_canvas = plan_canvas
        if onset_weight <= 0:
            raise ValueError(f"onset_weight must be positive, got {onset_weight}")
        self.onset_weight = float(onset_weight)
        if (resample_scene_questions or cell_attributes or layout_plan or self.onset_weight != 1.0) \
                and "scenes" in self.pools:
            scenes = self.pools["scenes"]
            if scenes.records and "objects" not in scenes.records[0]:
                needs = ("resample_scene_questions" if resample_scene_questions
                         else "cell_attributes" if cell_attributes else "layout_plan" if layout_plan
                         else "onset_weight")
                raise ValueError(f"{needs} needs the scene pool's objects: "
                                 "call evotok.mllm.data.attach_scene_objects(pool, world) first")
            self.scene_pairs = split_pairs(scenes.meta.get("split") or "train")

    def __len__(self) -> int:
        return self.length

    def texts_beyond_records(self) -> list[str]:
        """Wordings its conversations use that no pool record holds, so the text tokenizer's corpus
        word list never counted them (``TextTokenizer.learn_words`` adds them): the place
        questions' reference, "the middle of the image"."""
        return [IMAGE_MIDDLE] if self.place_questions else []

    def task_of(self, rng: np.random.Generator) -> str:
        return self.tasks[min(int(np.searchsorted(self.cdf, rng.uniform(), side="right")), len(self.tasks) - 1)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = item_rng(self.seed, int(index), 0x4D4C)
        task = self.task_of(rng)
        source, kind = TASKS[task]
        item: dict[str, Any] = {"task": task, "image_codes": None, "gen_codes": None, "cell_targets": None,
                                "cell_weights": None, "exclusions": [], "anchor_cells": None, "canvas_ids": None}
        if kind == "text":
            q, a = self.text_pairs[int(rng.integers(len(self.text_pairs)))]
            encoded = encode_chat(self.tok, [(q, a)], 0, self.max_prompt_tokens, truncate=True)
        else:
            pool = self.pools[source]
            j = int(rng.integers(len(pool)))
            record, codes = pool.records[j], pool.codes[j]
            if kind == "generate":
                prompt = "" if rng.uniform() < self.cfg_dropout else record["caption"]
                if prompt and source == "scenes" and self.attribute_dropout and rng.uniform() < self.attribute_dropout:
                    prompt = (shapes_only if rng.uniform() < 0.5 else colours_only)(prompt)
                entries = self.plan(source, record, codes.shape[0]) if prompt and self.layout_plan else None
                plan = None if entries is None else plan_text(entries)
                encoded = encode_generation(self.tok, prompt, self.num_cells, self.max_prompt_tokens, truncate=True,
                                            plan=plan)
                item["gen_codes"] = codes[..., : self.pixel_depth]
                if plan:
                    start = encoded.answer_starts[0]
                    plan_ids = encoded.input_ids[start:encoded.input_ids.index(self.tok.ids["boi"], start)]
                    if self.mask_answer_gaps or self.mask_caption_gaps:
                        item["exclusions"] = self.caption_gap_exclusions(plan_ids, start)
                    if self.plan_anchors:
                        pieces = [self.tok.decode([i]) for i in plan_ids]
                        item["anchor_cells"] = anchor_row(pieces, start, len(encoded), codes.shape[0])
                    if self.plan_canvas:
                        item["canvas_ids"] = canvas_ids(entries, codes.shape[0])
                weigh_onsets = self.onset_weight != 1.0 and bool(prompt)
                if source == "scenes" and (self.cell_attributes or weigh_onsets):
                    objects = [SceneObject.from_any(o) for o in record["objects"]]
                    if self.cell_attributes:
                        item["cell_targets"] = cell_attribute_targets(objects, codes.shape[0])
                    if weigh_onsets:
                        item["cell_weights"] = onset_weights(objects, codes.shape[0], self.onset_weight)
            else:
                turns = self.conversation(source, record, rng)
                encoded = encode_chat(self.tok, turns, self.num_cells, self.max_prompt_tokens, truncate=True)
                item["image_codes"] = codes
                if (self.mask_answer_gaps or self.mask_caption_gaps) and source == "scenes":
                    item["exclusions"] = self.answer_exclusions(turns, encoded.answer_starts, record["caption"])
        item.update(input_ids=encoded.input_ids, labels=encoded.labels, image_mask=encoded.image_mask,
                    gen_mask=encoded.gen_mask)
        return item

    def answer_exclusions(self, turns: Sequence[tuple[str, str]], starts: Sequence[int],
                          caption: str) -> list[tuple[int, int]]:
        """(position, token id) pairs to leave out of the softmax (see ``evotok.mllm.answer_gaps``).
        With ``mask_answer_gaps``, at each answer's first token the first tokens of ``gap_answers``;
        with ``mask_caption_gaps``, inside longer answers (captions) at each shape token right after
        a colour token the never-seen shapes of that colour."""
        out = []
        for (question, answer), start in zip(turns, starts):
            ids = self.tok.encode(answer)
            for word in gap_answers(question, answer, caption) if self.mask_answer_gaps else []:
                token = self.tok.encode(word)[:1]
                if token and token != ids[:1]:
                    out.append((start, token[0]))
            if self.mask_caption_gaps:
                out += self.caption_gap_exclusions(ids, start)
        return out

    def caption_gap_exclusions(self, ids: Sequence[int], start: int) -> list[tuple[int, int]]:
        """(position, token id) pairs for text ``ids`` placed at ``start``: at each shape token right
        after a colour token, the never-seen shapes of that colour (``answer_gaps.caption_gaps``)."""
        out = []
        pieces = [self.tok.decode([i]) for i in ids]
        for k, word in caption_gaps([p.strip() for p in pieces]):
            space = pieces[k][: len(pieces[k]) - len(pieces[k].lstrip())]  # " star", not "star"
            token = self.tok.encode(space + word)
            if len(token) == 1 and token[0] != ids[k]:
                out.append((start + k, token[0]))
        return out

    def plan(self, source: str, record: Mapping[str, Any], grid: int) -> list[PlannedObject]:
        """The layout plan's entries a drawing of ``record`` writes: a scene's objects in the order
        its caption names them; an empty plan for the other sources."""
        if source != "scenes":
            return []
        objects = [SceneObject.from_any(o) for o in record["objects"]]
        return plan_of(objects, record["caption"], grid)

    def conversation(self, source: str, record: Mapping[str, Any], rng: np.random.Generator) -> list[tuple[str, str]]:
        """1..max_turns (question, answer) turns about one image."""
        ranked = self.resample_scene_questions and source == "scenes"
        pairs = self.fresh_scene_questions(record, rng) if ranked else [tuple(p) for p in record.get("qa", [])]
        if record.get("label") and source in LABEL_QUESTIONS:
            questions = LABEL_QUESTIONS[source]
            pairs.append((questions[int(rng.integers(len(questions)))], record["label"]))
        describe = (DESCRIBE_QUESTIONS[int(rng.integers(len(DESCRIBE_QUESTIONS)))], record["caption"])
        if not pairs or rng.uniform() < self.describe_prob:
            pairs.append(describe)
            first = [len(pairs) - 1]
        else:
            first = []
        rest = range(len(pairs)) if ranked else rng.permutation(len(pairs))
        order = first + [int(k) for k in rest if int(k) not in first]
        turns = int(rng.integers(1, self.max_turns + 1))
        chosen = order[:turns]
        if ranked:  # round-robin order kept, so each category leads as often; told answers dropped
            return without_told_answers([pairs[k] for k in chosen], independent=is_place_question)
        rng.shuffle(chosen)
        return [pairs[k] for k in chosen]

    def fresh_scene_questions(self, record: Mapping[str, Any], rng: np.random.Generator) -> list[tuple[str, str]]:
        """Every question about the record's objects, freshly worded, in the order turns take them:
        one of each category, then a second of each, and so on; each round asks the
        ``LEADING_CATEGORIES`` first (in random order), since their answers are the ones the other
        questions give away ("Is there an orange square?" names a shape and a colour)."""
        objects = [SceneObject.from_any(o) for o in record["objects"]]
        candidates = question_candidates(objects, rng, self.scene_pairs)
        if self.place_questions:
            candidates["place"] = place_questions(objects, rng)
        categories = [list(LEADING_CATEGORIES), [c for c in candidates if c not in LEADING_CATEGORIES]]
        categories = [c for group in categories for c in rng.permutation(group)]
        queues = [[candidates[c][int(k)] for k in rng.permutation(len(candidates[c]))] for c in categories]
        return [queue[rank] for rank in range(max(map(len, queues), default=0)) for queue in queues
                if rank < len(queue)]


def without_told_answers(turns: Sequence[tuple[str, str]],
                         independent: Callable[[str], bool] | None = None) -> list[tuple[str, str]]:
    """``turns`` less each one whose one-word answer (a shape, colour, size or side; not yes/no or a
    number) an earlier kept turn already said: after "Is there an orange square?" the answer to
    "What shape is the orange object?" can be copied from the text instead of read from the image.
    Longer answers (captions) are kept, and so is every turn whose question ``independent`` accepts;
    such a turn tells nothing either (an object's side of the image's middle neither gives away nor
    is given away by its side of another object)."""
    told: set[str] = set()
    kept = []
    for question, answer in turns:
        if independent is not None and independent(question):
            kept.append((question, answer))
            continue
        word = answer.strip().lower()
        if word in told and word not in _UNTELLING:
            continue
        kept.append((question, answer))
        asked = words(question)
        told.update(set(asked) - _OPTIONS if "or" in asked else asked, words(answer))  # "small or large?" tells neither
    return kept


def collate(items: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of :class:`ChatDataset` items into one mixed batch of tensors."""
    length = max(len(it["input_ids"]) for it in items)

    def pad(key: str, value) -> torch.Tensor:
        return torch.tensor([list(it[key]) + [value] * (length - len(it[key])) for it in items])

    batch: dict[str, Any] = {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE),
        "image_mask": pad("image_mask", False),
        "gen_mask": pad("gen_mask", False),
        "attention_mask": torch.tensor([[1] * len(it["input_ids"]) + [0] * (length - len(it["input_ids"]))
                                        for it in items]),
        "tasks": [it["task"] for it in items],
        # (row, position, token): leave the token out of the softmax that predicts that position
        "answer_exclusions": torch.tensor([(row, pos, tok) for row, it in enumerate(items)
                                           for pos, tok in it.get("exclusions", [])], dtype=torch.long).reshape(-1, 3),
    }
    batch["anchor_cells"] = None
    if any(it.get("anchor_cells") is not None for it in items):
        batch["anchor_cells"] = torch.tensor([list(it.get("anchor_cells") or [-1] * len(it["input_ids"]))
                                              + [-1] * (length - len(it["input_ids"])) for it in items])
    for key in ("image_codes", "gen_codes"):
        arrays = [it[key] for it in items if it[key] is not None]
        batch[key] = torch.from_numpy(np.stack(arrays).astype(np.int64)) if arrays else None
    # one row per drawing, in gen_codes' order; drawings without targets are ignored
    drawings = [it for it in items if it["gen_codes"] is not None]
    batch["cell_targets"] = None
    if any(it.get("cell_targets") is not None for it in drawings):
        cells = drawings[0]["gen_codes"].shape[0] * drawings[0]["gen_codes"].shape[1]
        blank = np.full((2, cells), IGNORE_CELL, dtype=np.int64)
        batch["cell_targets"] = torch.from_numpy(np.stack([blank if it.get("cell_targets") is None
                                                           else it["cell_targets"] for it in drawings]))
    batch["cell_weights"] = None  # drawings without weights weigh every cell 1
    if any(it.get("cell_weights") is not None for it in drawings):
        cells = drawings[0]["gen_codes"].shape[0] * drawings[0]["gen_codes"].shape[1]
        batch["cell_weights"] = torch.from_numpy(np.stack([np.ones(cells, dtype=np.float32)
                                                           if it.get("cell_weights") is None
                                                           else it["cell_weights"] for it in drawings]))
    batch["canvas_ids"] = None  # drawings without a plan get an empty canvas
    if any(it.get("canvas_ids") is not None for it in drawings):
        cells = drawings[0]["gen_codes"].shape[0] * drawings[0]["gen_codes"].shape[1]
        batch["canvas_ids"] = stack_canvases([it.get("canvas_ids") for it in drawings], cells)
    return batch


def heldout_questions(pool: ImagePool, count: int) -> list[tuple[int, str, str, str]]:
    """(image index, question, answer, category) for the first ``count`` scene questions of a pool,
    one per image, cycling through each image's questions so every category is asked."""
    out = []
    for j, record in enumerate(pool.records):
        qa, cats = record.get("qa", []), record.get("qa_categories") or ["label"] * len(record.get("qa", []))
        if not qa:
            continue
        k = j % len(qa)
        out.append((j, qa[k][0], qa[k][1], cats[k]))
        if len(out) >= count:
            break
    return out


def corpus_texts(pools: Mapping[str, ImagePool]) -> list[str]:
    """Everything the text tokenizer is trained on: captions, labels, questions, answers of the
    pools, the fixed question templates and the text-only chat."""
    texts: list[str] = []
    for pool in pools.values():
        texts.extend(pool.texts())
    texts.extend(DESCRIBE_QUESTIONS)
    for questions in LABEL_QUESTIONS.values():
        texts.extend(questions)
    for q, a in text_only_pairs():
        texts.extend((q, a))
    return texts
