"""The multimodal model behind a user interface, with no UI library: checked prompts and questions,
seeded text-to-image with a row-by-row preview and the stage-by-stage view, streamed answers with a
conversation that fits the LM's context, and the vocabulary the model knows.

``MultimodalService`` is what ``app/`` talks to; every user mistake surfaces as a ``ValueError``
subclass (``PromptTooLongError``, ``EmptyPromptError``, ``ImageError``, ...) with a sentence that
says what to change.
"""
from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from ..hub import resolve_checkpoint
from ..images import tensor_to_pil
from .chat import EmptyPromptError, PromptTooLongError, encode_chat, prompt_ids
from .model import EvoTokMLLM, tokenizer_digest
from .rerank import DEFAULT_JUDGE, JUDGES, generate_best_of
from .text_tokenizer import words_of

# Refused before tokenizing, so a pasted novel costs nothing; the token cap is the model's own.
MAX_PROMPT_CHARS = 500
MAX_SEED = 2**31 - 1
MAX_CANDIDATES = 16  # best of n in the app: all n drawn, read back and scored (16: 2.9-4.2 s, one: 1.0-1.3 s, 2 cores)
DEFAULT_TEMPERATURE = 0.8  # chosen on development prompts (prompt seed 1); benchmark figures in the card
# the app's Candidates: its own pick of 16 scores 0.661 on 720 held-out prompts, of 8 0.603, one image 0.412
# (model card); the library's generate keeps 1, plain sampling, unless asked
DEFAULT_CANDIDATES = 16
PREVIEW_GREY = 0.0  # unfinished rows of the preview, in [-1, 1] (mid grey)

# Prompts ready to click: (colour, shape) pairs seen in training and held out from it.
EXAMPLE_PROMPTS: tuple[str, ...] = (
    "a red circle to the left of a blue square",
    "three green stars",
    "a large white hexagon on a striped background",
    "one orange triangle and one purple circle",
    "a yellow circle above a blue square",
    "two red stars",
    "a photo of a green square",
    "a purple triangle below a white cross",
)


class GenerationCancelled(Exception):
    """Raised from a row callback to stop a generation early (the visitor went away)."""


@dataclass
class PromptCheck:
    """A prompt as the model will read it, and what is worth telling the user about it."""

    text: str
    tokens: int
    unknown_words: list[str] = field(default_factory=list)
    heldout_pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unconditional(self) -> bool:
        return not self.text


@dataclass
class Generation:
    """One text-to-image result: codes ``h w L``, the image, and its decode after each pixel stage."""

    prompt: PromptCheck
    seed: int
    settings: dict[str, Any]
    codes: torch.Tensor
    image: Image.Image
    stages: list[Image.Image]
    seconds: float
    candidate_scores: list[float] = field(default_factory=list)  # best of n: each candidate's judge score
    plan: str | None = None  # the layout plan the model wrote first (models with config.layout_plan)


@dataclass
class PreparedQuestion:
    """A question with the part of the conversation that fits the context window."""

    question: str
    history: list[tuple[str, str]]
    dropped_turns: int


def _model_card(folder: Path | None) -> tuple[str, str]:
    """(title, markdown body) of a checkpoint's README.md; empty strings without one."""
    from ..explore import read_model_card

    card = read_model_card(folder)
    return card.title, card.body


def heldout_pairs_in(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs of the scene world's held-out split named in ``text``
    ("a red star", "two red stars", "a star that is red")."""
    from ..data.scenes import COLOURS, HELDOUT_PAIRS, PLURALS

    nouns = {shape: shape for shape in PLURALS} | {plural: shape for shape, plural in PLURALS.items()}
    colour, noun = "|".join(COLOURS), "|".join(sorted(nouns, key=len, reverse=True))
    found: list[tuple[str, str]] = []
    lowered = text.lower()
    named = [(c, nouns[n]) for c, n in re.findall(rf"\b({colour})\s+({noun})\b", lowered)]
    named += [(c, nouns[n]) for n, c in re.findall(rf"\b({noun})\s+that\s+(?:is|are)\s+({colour})\b", lowered)]
    for pair in named:
        if pair in HELDOUT_PAIRS and pair not in found:
            found.append(pair)
    return found


def example_prompts() -> dict[str, list[str]]:
    """``EXAMPLE_PROMPTS`` split into those naming only (colour, shape) pairs seen in training and
    those naming a held-out pair (compositional generalisation)."""
    split: dict[str, list[str]] = {"seen": [], "held-out": []}
    for prompt in EXAMPLE_PROMPTS:
        split["held-out" if heldout_pairs_in(prompt) else "seen"].append(prompt)
    return split


class MultimodalService:
    """An :class:`EvoTokMLLM` ready for a UI (one per process; safe to call from several threads)."""

    def __init__(self, model: EvoTokMLLM, source: str = "", folder: Path | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.source = source
        self.card_title, self.card_body = _model_card(folder)
        self.image_size = int(model.tokenizer.config.image_size)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: str | os.PathLike, shared_tokenizer: torch.nn.Module | None = None,
             device: str = "cpu") -> "MultimodalService":
        """Load a model folder or hub id. ``shared_tokenizer`` (e.g. the explorer's) is reused when its
        weights are the ones the model was trained with, instead of loading a second copy."""
        folder = resolve_checkpoint(name_or_path)
        config = EvoTokMLLM.load_config(folder)
        tokenizer = None
        if shared_tokenizer is not None and config.image_tokenizer_sha256:
            if tokenizer_digest(shared_tokenizer) == config.image_tokenizer_sha256:
                tokenizer = shared_tokenizer
        model = EvoTokMLLM.from_pretrained(folder, map_location=device, image_tokenizer=tokenizer)
        return cls(model, source=str(name_or_path), folder=folder)

    # ------------------------------------------------------------------ facts
    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def pixel_depth(self) -> int:
        return self.config.pixel_depth

    @property
    def max_prompt_tokens(self) -> int:
        return self.config.max_prompt_tokens

    @property
    def max_candidates(self) -> int:
        return MAX_CANDIDATES

    def describe(self) -> str:
        """Markdown: what is loaded and how big it is."""
        c = self.config
        lm_params = sum(p.numel() for p in self.model.lm.parameters())
        all_params = sum(p.numel() for p in self.model.parameters())
        name = self.card_title or Path(self.source).name or "EvoTok multimodal model"
        lm = c.lm_name_or_path or f"{c.lm_config.get('model_type', 'causal')} LM trained from scratch"
        return (f"**Loaded:** {name} (`{self.source}`) — {lm}, {lm_params / 1e6:.1f} M LM parameters "
                f"({all_params / 1e6:.1f} M with the projector and depth transformer). It draws "
                f"{self.image_size}×{self.image_size} images as {c.grid_size}×{c.grid_size} tokens × "
                f"{c.pixel_depth} pixel stages and reads images at semantic depth {c.semantic_depth}. "
                f"Prompts and questions: at most {c.max_prompt_tokens} tokens.")

    def known_words(self) -> list[str]:
        return self.model.known_words()

    def vocabulary_groups(self) -> dict[str, list[str]]:
        """The known words, the scene world's first (colours, shapes, counts, places, sizes), then the rest."""
        from ..data.scenes import BACKGROUND_WORDS, COLOURS, COUNT_WORDS, PLURALS, RELATION_PHRASES, SIZES
        from ..data.sources import FASHION_MNIST_CLASSES

        known = set(self.known_words())
        relation_words = {w for phrases in RELATION_PHRASES.values() for p in phrases for w in p.split()}
        relation_words -= {"of", "the", "to", "on"}
        groups = {
            "colours": list(COLOURS),
            "shapes": [w for s, p in PLURALS.items() for w in (s, p)],
            "counts": list(COUNT_WORDS),
            "positions": sorted(relation_words),
            "sizes": list(SIZES),
            "backgrounds": sorted(set(BACKGROUND_WORDS.values())),
            "clothes (Fashion-MNIST)": sorted({w for name in FASHION_MNIST_CLASSES for w in words_of(name)}),
        }
        out: dict[str, list[str]] = {}
        placed: set[str] = set()
        for title, words in groups.items():
            present = [w for w in words if w in known and w not in placed]
            if present:
                out[title] = present
                placed.update(present)
        rest = sorted(known - placed)
        if rest:
            out["other words"] = rest
        return out

    # ------------------------------------------------------------------ text to image
    def check_prompt(self, prompt: str | None) -> PromptCheck:
        """Clean a prompt and check its length; an empty prompt means an unconditional sample."""
        text = " ".join(str(prompt or "").split())
        if len(text) > MAX_PROMPT_CHARS:
            raise PromptTooLongError(f"the prompt is {len(text)} characters; this model accepts at most "
                                     f"{self.max_prompt_tokens} tokens (a short sentence). Shorten it.")
        ids = prompt_ids(self.model.text, text, self.max_prompt_tokens, "prompt") if text else []
        return PromptCheck(text=text, tokens=len(ids), unknown_words=self.model.unknown_words(text),
                           heldout_pairs=heldout_pairs_in(text))

    def generate(self, prompt: str | PromptCheck | None, guidance_scale: float = 3.0,
                 temperature: float = DEFAULT_TEMPERATURE,
                 top_k: int | None = None, seed: int | None = None,
                 on_row: Callable[[int, Image.Image], None] | None = None, candidates: int = 1,
                 judge: str = DEFAULT_JUDGE) -> Generation:
        """Text to one image. ``seed`` None (or negative) draws one, reported in the result.

        ``on_row(rows_done, preview)`` runs after each finished grid row with the partial image
        (unfinished rows grey; with several candidates, the first one's); it may raise
        :class:`GenerationCancelled` to stop. ``candidates`` > 1 draws that many and keeps the one
        the model itself reads back as the prompt best, by ``judge`` (:func:`evotok.mllm.rerank.pick_best`).
        """
        check = prompt if isinstance(prompt, PromptCheck) else self.check_prompt(prompt)
        seed = self.pick_seed(seed)
        if int(candidates) != candidates or not 1 <= candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be a whole number from 1 to {MAX_CANDIDATES}, got {candidates}")
        top_k = int(top_k) if top_k else None
        if judge not in JUDGES:
            raise ValueError(f"unknown judge {judge!r}; expected one of {JUDGES}")
        settings = {"guidance_scale": float(guidance_scale), "temperature": float(temperature), "top_k": top_k,
                    "candidates": int(candidates), "judge": judge}
        callback = None
        if on_row is not None:
            def callback(rows: int, codes: torch.Tensor) -> None:
                on_row(rows, self.preview(codes[0], rows))
        started = time.perf_counter()
        plans: list[str] = []  # filled by a model that writes layout plans
        codes, scores = generate_best_of(self.model, [check.text], int(candidates), seed=seed,
                                         guidance_scale=float(guidance_scale), temperature=float(temperature),
                                         top_k=top_k, callback=callback, plan_trace=plans, judge=judge)
        stages = self.model.decode_stages(codes)[:, 0].cpu()  # L 3 H W, the last one is the image
        seconds = time.perf_counter() - started
        return Generation(prompt=check, seed=seed, settings=settings, codes=codes[0].cpu(),
                          image=tensor_to_pil(stages[-1]), stages=[tensor_to_pil(s) for s in stages],
                          seconds=seconds, candidate_scores=scores[0].tolist() if candidates > 1 else [],
                          plan=plans[0] if plans else None)

    @staticmethod
    def pick_seed(seed: int | float | None) -> int:
        if seed is None or seed < 0:
            return random.SystemRandom().randint(0, MAX_SEED)
        if int(seed) != seed or seed > MAX_SEED:
            raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED} (empty or -1 = random), got {seed}")
        return int(seed)

    @torch.no_grad()
    def preview(self, codes: torch.Tensor, rows_done: int) -> Image.Image:
        """Decode of a partly generated grid (``h w L``) with the rows not generated yet in grey."""
        image = self.model.decode_codes(codes[None])[0].cpu()
        cut = image.shape[-2] * rows_done // self.grid_size
        image[:, cut:] = PREVIEW_GREY
        return tensor_to_pil(image)

    # ------------------------------------------------------------------ questions
    def prepare_image(self, source: Any) -> tuple[torch.Tensor, str]:
        """Any upload (path, bytes, PIL image, array) -> ``3 H W`` at the model's size and a note on
        how it was normalised; unreadable files raise ``ImageError`` (see ``load_image_safely``)."""
        from ..explore import prepare_image

        return prepare_image(source, self.image_size)

    def prepare_question(self, question: str | None, history: Sequence[tuple[str, str]] = ()) -> PreparedQuestion:
        """Check a question and keep the most recent earlier turns that fit the LM's context
        (image placeholders + conversation + the longest answer)."""
        text = " ".join(str(question or "").split())
        if not text:
            raise EmptyPromptError("the question is empty; type a question about the image.")
        if len(text) > MAX_PROMPT_CHARS:
            raise PromptTooLongError(f"the question is {len(text)} characters; this model accepts at most "
                                     f"{self.max_prompt_tokens} tokens (a short sentence). Shorten it.")
        prompt_ids(self.model.text, text, self.max_prompt_tokens, "question")
        turns = [(str(q), str(a)) for q, a in history if str(q).strip()]
        budget = self.context_length() - self.config.max_answer_tokens
        dropped = 0
        while True:
            length = len(encode_chat(self.model.text, [*turns, (text, None)], self.config.num_cells,
                                     truncate=True))
            if length <= budget or not turns:
                break
            turns.pop(0)
            dropped += 1
        return PreparedQuestion(text, turns, dropped)

    def context_length(self) -> int:
        lm = self.model.lm.config
        return int(getattr(lm, "max_position_embeddings", None) or 10**9)

    def answer(self, image: torch.Tensor, question: PreparedQuestion | str,
               history: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
        """Stream the answer to a question about ``image`` (``3 H W`` in [-1, 1] at the model's size).

        Every check runs before this returns; the iterator only produces text pieces.
        """
        prepared = question if isinstance(question, PreparedQuestion) else self.prepare_question(question, history)
        return self.model.answer(image, prepared.question, history=prepared.history, stream=True)
