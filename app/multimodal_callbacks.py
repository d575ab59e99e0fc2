"""Thin callbacks of the "Text to image" and "Ask about an image" tabs over
``evotok.mllm.serving.MultimodalService``.

Both stream: ``generate`` yields the image row by row (unfinished rows grey) and finally the image,
its stage-by-stage gallery and a note; ``ask`` yields the chat as the answer grows and finally the
answer text. gradio_client's ``predict`` returns the final yield only, so the endpoints stay clean.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator, Sequence

import gradio as gr
from PIL import Image

from evotok.explore import upscale_for_display
from evotok.mllm.rerank import DEFAULT_JUDGE
from evotok.mllm.serving import (DEFAULT_CANDIDATES, DEFAULT_TEMPERATURE, Generation, GenerationCancelled,
                                 MultimodalService)

from .callbacks import user_errors

UPSCALE = "nearest-neighbour"  # what upscale_for_display does: every generated pixel stays a sharp block
# how the note words each judge's pick (evotok.mllm.rerank.pick_best); {scores}: every candidate's score
JUDGE_NOTES = {
    "caption": "under which the prompt is its likeliest caption (mean log-probability per token {scores}",
    "contrast": "it reads as the prompt most surely rather than as a near miss of it (another colour, shape, "
                "count or relation; log of the prompt's share of the caption probability {scores}",
    "questions": "that it answers most surely as the prompt says, asked what the prompt settles (which objects "
                 "are there, their colours, counts and sides; summed log-probability of those answers {scores}",
    "contrast+questions": "that scores best on near misses and questions together (log of the prompt's share "
                          "of the caption probability among its near misses plus the summed log-probability of "
                          "the answers the prompt settles {scores}",
}


def history_pairs(messages: Sequence[dict] | None) -> list[tuple[str, str]]:
    """Chatbot messages -> (question, answer) turns; a question left without an answer is skipped."""
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    for message in messages or []:
        text = message_text(message)
        if message.get("role") == "user":
            question = text
        elif message.get("role") == "assistant" and question is not None:
            pairs.append((question, text))
            question = None
    return pairs


def message_text(message: dict) -> str:
    """The text of one chat message (a string, or Gradio's list of content parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return " ".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts if p is not None).strip()


def messages_of(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for question, answer in pairs:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return out


class MultimodalCallbacks:
    """Event handlers of the two multimodal tabs, bound to one loaded ``MultimodalService``."""

    def __init__(self, service: MultimodalService, display_side: int = 256) -> None:
        self.service = service
        self.display_side = display_side

    def display(self, image: Image.Image) -> Image.Image:
        return upscale_for_display(image, self.display_side)

    @property
    def display_factor(self) -> int:
        return self.display(Image.new("RGB", (self.service.image_size,) * 2)).width // self.service.image_size

    # -- text to image ---------------------------------------------------------------------------
    @user_errors("generate an image")
    def generate(self, prompt: str | None, guidance_scale: float = 3.0, temperature: float = DEFAULT_TEMPERATURE,
                 top_k: float | None = 0, seed: float | None = -1,
                 candidates: float | None = DEFAULT_CANDIDATES) -> Iterator[tuple[Any, Any, str]]:
        """Prompt + sampling settings -> (image, stage gallery, note), streamed row by row."""
        service = self.service
        check = service.check_prompt(prompt)
        if check.unknown_words:
            gr.Warning(f"The model never read {', '.join(repr(w) for w in check.unknown_words)} in training; "
                       "it will ignore or misread them. Open “Words the model knows” for its vocabulary.",
                       title="Unknown words")
        if check.unconditional:
            gr.Info("Empty prompt: drawing an unconditional sample (what the model draws with no description).")
        seed = service.pick_seed(None if seed is None else seed)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def on_row(rows: int, preview: Image.Image) -> None:
            if stop.is_set():
                raise GenerationCancelled
            events.put(("row", rows, preview))

        def work() -> None:
            try:
                events.put(("done", service.generate(check, guidance_scale, temperature, top_k, seed, on_row=on_row,
                                                     candidates=candidates or 1)))
            except BaseException as err:  # handed to the request's thread, which reports it
                events.put(("error", err))

        threading.Thread(target=work, name="evotok-generate", daemon=True).start()
        try:
            while True:
                kind, *payload = events.get()
                if kind == "row":
                    rows, preview = payload
                    yield self.display(preview), [], f"Drawing row {rows} of {service.grid_size} (seed {seed})…"
                elif kind == "error":
                    if isinstance(payload[0], GenerationCancelled):
                        return
                    raise payload[0]
                else:
                    result: Generation = payload[0]
                    break
        finally:
            stop.set()  # a closed stream (visitor left) stops the worker at its next row
        yield self.display(result.image), self.gallery(result), self.note(result)

    def gallery(self, result: Generation) -> list[tuple[Image.Image, str]]:
        depth = len(result.stages)
        return [(self.display(image), f"after stage {d} of {depth}") for d, image in enumerate(result.stages, start=1)]

    def note(self, result: Generation) -> str:
        check, s = result.prompt, result.settings
        size = self.service.image_size
        prompt = f"“{check.text}”" if check.text else "*(empty: an unconditional sample)*"
        lines = [
            f"**Prompt:** {prompt} · seed **{result.seed}** · guidance {s['guidance_scale']:g} · temperature "
            f"{s['temperature']:g} · top-k {s['top_k'] or 'off'} · drawn in {result.seconds:.1f} s.",
            f"{size}×{size} pixels ({self.service.grid_size}×{self.service.grid_size} tokens × "
            f"{self.service.pixel_depth} pixel stages), shown {self.display_factor}× enlarged with {UPSCALE} "
            "upscaling so each generated pixel stays a sharp block. The gallery decodes the same codes after "
            f"1, 2, … {self.service.pixel_depth} stages (the last one is the image): coarse layout first, "
            "detail last.",
        ]
        if result.plan is not None:
            lines.append(f"**Layout plan** the model wrote before drawing (size, colour, shape, then the row and "
                         f"column of each object's centre cell, from 0 at the top left): "
                         f"{'`' + result.plan + '`' if result.plan else '*(empty)*'}")
        if result.candidate_scores:
            scores = ", ".join(f"{v:.2f}" for v in result.candidate_scores)
            picked = max(range(len(result.candidate_scores)), key=result.candidate_scores.__getitem__) + 1
            judged = JUDGE_NOTES[result.settings.get("judge", DEFAULT_JUDGE)].format(scores=scores)
            lines.append(f"Best of {len(result.candidate_scores)} candidates: the model read each drawing back and "
                         f"kept the one {judged}; kept candidate {picked}). The preview showed candidate 1.")
        if check.heldout_pairs:
            lines.append("Held out of training (never seen together): "
                         + ", ".join(f"{c} {s_}" for c, s_ in check.heldout_pairs) + ".")
        if check.unknown_words:
            lines.append("**Unknown words** (never read in training, so ignored or misread): "
                         + ", ".join(check.unknown_words) + ".")
        return "\n\n".join(lines)

    # -- ask about an image ----------------------------------------------------------------------
    @user_errors("answer")
    def ask(self, image: Any, question: str | None, history: Sequence[dict] | None = None
            ) -> Iterator[tuple[list[dict], str, str]]:
        """Image + question (+ chat so far) -> (chat, answer text, note), streamed piece by piece."""
        if image is None or (isinstance(image, (str, bytes)) and len(image) == 0):
            raise gr.Error("Upload an image first (or click one of the examples).", title="No image",
                           print_exception=False)
        pairs = history_pairs(history)
        prepared = self.service.prepare_question(question, pairs)
        tensor, image_note = self.service.prepare_image(image)
        started = time.perf_counter()
        pieces = self.service.answer(tensor, prepared)
        chat = messages_of(pairs) + [{"role": "user", "content": prepared.question},
                                     {"role": "assistant", "content": ""}]
        text = ""
        for piece in pieces:
            text += piece
            chat[-1]["content"] = text
            yield chat, text, "Answering…"
        text = text.strip()
        if not text:
            chat[-1]["content"] = "(the model gave no answer)"
        note = f"Answered in {time.perf_counter() - started:.2f} s. **Input:** {image_note}"
        if prepared.dropped_turns:
            note += (f" The {prepared.dropped_turns} oldest turn(s) no longer fit the model's context and were "
                     "left out.")
        yield chat, text, note

    @user_errors("answer")
    def ask_fresh(self, image: Any, question: str | None) -> Iterator[tuple[list[dict], str, str]]:
        """A new conversation (an example was clicked)."""
        yield from self.ask(image, question, [])
