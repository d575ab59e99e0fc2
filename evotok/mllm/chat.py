"""The chat template: how turns, images and generated grids become one token sequence.

Understanding (``n`` = grid cells; the image sits at the start of the first user turn)::

    <|user|><image>×n What colour is the star?<|end|><|assistant|>red<|end|><|user|>...

Text to image (the prompt is the user turn; an empty prompt is the unconditional branch)::

    <|user|>a red star<|end|><|assistant|><boi>[cell]×n<eoi><|end|>

A model with layout plans (``evotok.mllm.layout_plan``) writes one before ``<boi>``, and the plan
and ``<boi>`` carry the language-model loss::

    <|user|>a red star<|end|><|assistant|>small red star 3 1<boi>[cell]×n<eoi><|end|>

Only answer tokens and the ``<|end|>`` that closes an answer carry the language-model loss;
the grid cells carry the depth transformer's code loss instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .text_tokenizer import SPECIAL_TOKENS, TextTokenizer

IGNORE = -100


class PromptTooLongError(ValueError):
    """A prompt or question longer than the model's ``max_prompt_tokens``."""


class EmptyPromptError(ValueError):
    """A question with no text (an empty prompt is only meaningful for unconditional generation)."""


@dataclass
class EncodedChat:
    """One sequence: token ids, next-token labels (``IGNORE`` = no loss) and two position masks.

    ``image_mask`` marks ``<image>`` placeholders (replaced by projected semantic features);
    ``gen_mask`` marks the generated grid cells (their ids are ``<pad>``; their inputs are
    projected code latents). ``answer_starts`` holds the index of each answer's first token.
    """

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)
    gen_mask: list[bool] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)

    def add(self, ids: Sequence[int], supervised: bool = False, image: bool = False, gen: bool = False) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(ids if supervised else [IGNORE] * len(ids))
        self.image_mask.extend([image] * len(ids))
        self.gen_mask.extend([gen] * len(ids))

    def __len__(self) -> int:
        return len(self.input_ids)


def prompt_ids(tok: TextTokenizer, text: str, max_tokens: int | None, what: str = "prompt",
               truncate: bool = False) -> list[int]:
    """Token ids of a user text, refused (or, for training data, cut) beyond ``max_tokens``."""
    ids = tok.encode(text)
    if max_tokens is not None and len(ids) > max_tokens:
        if truncate:
            return ids[:max_tokens]
        words = len(text.split())
        raise PromptTooLongError(
            f"the {what} is {len(ids)} tokens ({words} words); this model accepts at most {max_tokens} tokens. "
            f"Shorten it.")
    return ids


def encode_chat(tok: TextTokenizer, turns: Sequence[tuple[str, str | None]], num_image_tokens: int = 0,
                max_prompt_tokens: int | None = None, truncate: bool = False) -> EncodedChat:
    """A (multi-turn) conversation; ``num_image_tokens`` placeholders open the first user turn.

    ``turns`` are (user text, assistant answer) pairs; the last answer may be ``None``, which
    ends the sequence with ``<|assistant|>`` ready for the model to answer.
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    ids = tok.ids
    out = EncodedChat()
    for k, (question, answer) in enumerate(turns):
        if not question or not question.strip():
            raise EmptyPromptError("the question is empty; type a question about the image")
        if answer is None and k != len(turns) - 1:
            raise ValueError("only the last turn may lack an answer")
        out.add([ids["user"]])
        if k == 0 and num_image_tokens:
            out.add([ids["image"]] * num_image_tokens, image=True)
        out.add(prompt_ids(tok, question, max_prompt_tokens, "question", truncate))
        out.add([ids["end"], ids["assistant"]])
        if answer is not None:
            out.answer_starts.append(len(out.input_ids))
            out.add(tok.encode(answer) + [ids["end"]], supervised=True)
    return out


def encode_generation(tok: TextTokenizer, prompt: str, num_cells: int, max_prompt_tokens: int | None = None,
                      include_grid: bool = True, truncate: bool = False, plan: str | None = None) -> EncodedChat:
    """A text-to-image sequence; without ``include_grid`` it stops after ``<boi>`` (the generation prefix).

    ``plan`` (a layout plan's text, "" for an empty one) goes before ``<boi>``, supervised with it;
    ``answer_starts`` then holds the plan's first position."""
    ids = tok.ids
    out = plan_prefix(tok, prompt, max_prompt_tokens, truncate)
    if plan is None:
        out.add([ids["boi"]])
    else:
        out.answer_starts.append(len(out))
        out.add(tok.encode(plan) + [ids["boi"]], supervised=True)
    if include_grid:
        out.add([ids["pad"]] * num_cells, gen=True)
        out.add([ids["eoi"], ids["end"]])
    return out


def plan_prefix(tok: TextTokenizer, prompt: str, max_prompt_tokens: int | None = None,
                truncate: bool = False) -> EncodedChat:
    """A text-to-image sequence up to ``<|assistant|>``: where the model writes its layout plan."""
    ids = tok.ids
    out = EncodedChat()
    out.add([ids["user"]])
    out.add(prompt_ids(tok, prompt.strip(), max_prompt_tokens, "prompt", truncate) if prompt.strip() else [])
    out.add([ids["end"], ids["assistant"]])
    return out


def render_chat(turns: Sequence[tuple[str, str | None]], num_image_tokens: int = 0) -> str:
    """The template as readable text (for documentation and debugging)."""
    s = SPECIAL_TOKENS
    parts = []
    for k, (question, answer) in enumerate(turns):
        image = f"{s['image']}×{num_image_tokens}" if k == 0 and num_image_tokens else ""
        parts.append(f"{s['user']}{image}{question}{s['end']}{s['assistant']}")
        if answer is not None:
            parts.append(f"{answer}{s['end']}")
    return "".join(parts)
