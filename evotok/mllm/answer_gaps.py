"""Co-occurrence gaps in the answers of scene questions, kept out of the answer's softmax.

No red object is ever a star in training (the pair is held out), so "What shape is the red object?"
is never answered "star", and every such answer's softmax pushes "star" down for red objects. The
model learns "red means not a star" and, shown a red star, names the shape of a seen pairing. The
teacher had the same failure with its contrastive negatives and the same cure
(``training/train_teacher.cooccurrence_mask``): a word that would only teach a gap is left out of
that answer's softmax. Nothing about a held-out pair is shown; the model is only not taught that
those pairs cannot exist. Optionally, longer answers (captions such as "two red circles") are
masked the same way at each shape word that follows a colour word (``mask_caption_gaps`` of
``evotok.mllm.data.ChatDataset``).
"""
from __future__ import annotations

import re
from typing import Collection, Sequence

from ..data.scenes import COLOURS, PLURALS, SHAPES, TRAIN_PAIRS

_SHAPE_WORDS = {**{shape: shape for shape in SHAPES}, **{plural: shape for shape, plural in PLURALS.items()}}


def words(text: str) -> list[str]:
    """Lower-case words of ``text``."""
    return re.findall(r"[a-z]+", text.lower())


def gap_shapes(colour: str, pairs: Collection[tuple[str, str]] = frozenset(TRAIN_PAIRS)) -> list[str]:
    """The shapes never paired with ``colour`` in ``pairs``."""
    return [s for s in SHAPES if (colour, s) not in pairs]


def gap_colours(shape: str, pairs: Collection[tuple[str, str]] = frozenset(TRAIN_PAIRS)) -> list[str]:
    """The colours never paired with ``shape`` in ``pairs``."""
    return [c for c in COLOURS if (c, shape) not in pairs]


def shape_word(word: str) -> str | None:
    """"star" / "stars" -> "star"; anything else -> None."""
    return _SHAPE_WORDS.get(word)


def gap_answers(question: str, answer: str, caption: str = "",
                pairs: Collection[tuple[str, str]] = frozenset(TRAIN_PAIRS)) -> list[str]:
    """Other answers that would only teach a gap: for a shape answer, the shapes never paired in
    ``pairs`` with a colour the question names; for a colour answer, the colours never paired with a
    shape it names. A shape question that names no colour ("What shape is the object?") takes the
    colour from ``caption`` when the caption names exactly one. Other answers: none."""
    answer = answer.strip().lower()
    named = words(question)
    if answer in SHAPES:
        colours = {w for w in named if w in COLOURS}
        if not colours:
            in_caption = {w for w in words(caption) if w in COLOURS}
            colours = in_caption if len(in_caption) == 1 else set()
        return sorted({s for c in colours for s in gap_shapes(c, pairs) if s != answer})
    if answer in COLOURS:
        shapes = {shape_word(w) for w in named} - {None}
        return sorted({c for s in shapes for c in gap_colours(s, pairs) if c != answer})
    return []


def caption_gaps(pieces: Sequence[str], pairs: Collection[tuple[str, str]] = frozenset(TRAIN_PAIRS)
                 ) -> list[tuple[int, str]]:
    """``(k, word)`` for each shape word ``pieces[k]`` right after a colour word ``pieces[k - 1]``
    (a caption's tokens as text, spaces stripped): the never-seen shapes of that colour, plural
    when ``pieces[k]`` is."""
    out = []
    for k in range(1, len(pieces)):
        colour, shape = pieces[k - 1], shape_word(pieces[k])
        if colour in COLOURS and shape is not None:
            out += [(k, gap if pieces[k] == shape else PLURALS[gap]) for gap in gap_shapes(colour, pairs)]
    return out
