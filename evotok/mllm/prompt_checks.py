"""The questions a scene prompt answers: what any image true to the prompt must answer to them.

"three red stars" -> ("How many stars are there?", "three"), ("How many red objects are there?", "three")
"a red star left of a blue cross" -> ("Is there a red star?", "yes"), ("What colour is the star?", "red"),
    ..., ("Is the red star left or right of the blue cross?", "left")

Why: a drawing can be judged by asking the model that drew it the questions its prompt settles
and scoring how surely it gives the prompt's answers (:func:`evotok.mllm.rerank.question_scores`),
as TIFA does with a separate question answerer. The model answers these questions about images
read back through the tokenizer well (counts 0.945), so they were meant to read counts and sides
off a drawing more surely than a whole caption's likelihood does. Measured on the bundled model,
this judge alone picks worse than the near-miss one, and the two together as well as the
near-miss one alone (model card). Questions use the scene world's question wording
(``QUESTION_TEMPLATES``), the phrasing the model was trained to answer. Only the scene world's
words are read: a prompt naming no shape has no checks.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from evotok.data.scenes import (COLOURS, COUNT_WORDS, PLURALS, QUESTION_TEMPLATES, RELATION_OF_PHRASE,
                                 RELATION_PHRASE_PATTERN, SHAPES, SIZES)

from .prompt_parts import fix_articles

__all__ = ["Mention", "mentions", "prompt_checks"]

_SINGULAR_OF = {plural: shape for shape, plural in PLURALS.items()} | {shape: shape for shape in SHAPES}
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Mention:
    """One shape the prompt names: its colour (``None``: not given), how many (``None``: a plural
    without a count word) and where its shape word ends in the lower-cased prompt."""

    colour: str | None
    shape: str
    count: int | None
    end: int


def mentions(prompt: str) -> list[Mention]:
    """Every shape word of ``prompt``, in order, with the colour and count words of its phrase: the
    words just before it ("three small red stars"), or a colour after it ("a star that is red")."""
    text = prompt.lower()
    words = list(_WORD.finditer(text))
    out = []
    for i, word in enumerate(words):
        shape = _SINGULAR_OF.get(word[0])
        if shape is None:
            continue
        colour, j = None, i - 1
        while j >= 0 and (words[j][0] in COLOURS or words[j][0] in SIZES):
            colour = colour or (words[j][0] if words[j][0] in COLOURS else None)
            j -= 1
        count = COUNT_WORDS.index(words[j][0]) if j >= 0 and words[j][0] in COUNT_WORDS else None
        after = [w[0] for w in words[i + 1:i + 4]]
        if colour is None and after[:2] == ["that", "is"] and len(after) == 3 and after[2] in COLOURS:
            colour = after[2]
        if count is None and word[0] == shape:  # "a star": one
            count = 1
        out.append(Mention(colour, shape, count, word.end()))
    return out


def _reference(m: Mention) -> str:
    return f"the {m.colour} {m.shape}" if m.colour else f"the {m.shape}"


def prompt_checks(prompt: str) -> list[tuple[str, str]]:
    """(question, answer) pairs that every image true to ``prompt`` answers so: for a counted shape,
    how many of its shape and of its colour there are; for one coloured shape, that it is there and
    (when the prompt names no other of its shape) its colour; for two shapes joined by a relation,
    the side the first is on. Questions whose answer the prompt leaves open are not asked (the
    colour of a shape named twice, the count of an uncounted plural). Without repeats, in order."""
    named = mentions(prompt)
    shapes = Counter(m.shape for m in named)
    colours = Counter(m.colour for m in named if m.colour)
    q = QUESTION_TEMPLATES
    checks: list[tuple[str, str]] = []
    for m in named:
        if m.count is not None and m.count >= 2:
            if shapes[m.shape] == 1:
                checks.append((q["count_shape"][0].format(shapes=PLURALS[m.shape]), COUNT_WORDS[m.count]))
            if m.colour and colours[m.colour] == 1:
                checks.append((q["count_colour"][0].format(colour=m.colour), COUNT_WORDS[m.count]))
        elif m.count == 1 and m.colour:
            checks.append((q["existence"][0].format(a=fix_articles(f"a {m.colour} {m.shape}")), "yes"))
            if shapes[m.shape] == 1:
                checks.append((q["colour"][0].format(x=f"the {m.shape}"), m.colour))
    relation = RELATION_PHRASE_PATTERN.search(prompt.lower())
    if relation and len(named) == 2 and named[0].end <= relation.start() and named[0].count == named[1].count == 1:
        side = RELATION_OF_PHRASE[relation[1]]
        axis = "position_lr" if side in ("left of", "right of") else "position_ab"
        checks.append((q[axis][0].format(x=_reference(named[0]), y=_reference(named[1])), side.split()[0]))
    return list(dict.fromkeys(checks))
