"""Near-miss captions of a scene prompt: the same sentence with one thing in it made wrong.

"a red star left of a blue cross" -> "a green star left of a blue cross", "a red circle left of a
blue cross", "a red star right of a blue cross", "a blue star left of a red cross", ...

Why: a judge that asks only how likely the prompt is as a drawing's caption rewards drawings
that make the prompt's common words likely, whatever they get wrong. Asking instead how much
likelier the prompt is than each of its near misses rewards the drawing that gets exactly the
prompt's colours, shapes, counts and relation right (:func:`evotok.mllm.rerank.contrast_scores`).
Only the scene world's words are changed; a prompt without them has no near misses.
"""
from __future__ import annotations

import re

from evotok.data.scenes import (COLOURS, COUNT_WORDS, PLURALS, RELATION_OF_PHRASE, RELATION_PHRASE_PATTERN,
                                 RELATION_PHRASES, RELATIONS, SHAPES)

from .prompt_parts import fix_articles

__all__ = ["near_misses"]

_PLURAL_OF = dict(PLURALS)
_SINGULAR_OF = {plural: shape for shape, plural in PLURALS.items()}
_COLOUR = re.compile(rf"\b({'|'.join(COLOURS)})\b")
# plurals first: "crosses" must not match as "cross" + "es"
_SHAPE = re.compile(rf"\b({'|'.join(list(PLURALS.values()) + list(SHAPES))})\b")
_COUNTS = range(2, len(COUNT_WORDS))  # the counts a plural can take: two to four
# a count word, only when a plural shape follows it ("three small red stars")
_COUNT = re.compile(rf"\b({'|'.join(COUNT_WORDS[n] for n in _COUNTS)})\b"
                    rf"(?= (?:\w+ )*?(?:{'|'.join(PLURALS.values())})\b)")


def _swapped(text: str, match: re.Match, word: str) -> str:
    return text[:match.start()] + word + text[match.end():]


def _other_shapes(word: str) -> list[str]:
    if word in _SINGULAR_OF:
        return [_PLURAL_OF[s] for s in SHAPES if s != _SINGULAR_OF[word]]
    return [s for s in SHAPES if s != word]


def near_misses(prompt: str) -> list[str]:
    """Every sentence that differs from ``prompt`` in one colour word, one shape word, one count
    (one more or one fewer, two to four) or its relation (the opposite one), or that swaps the
    colours of two named colours; without repeats and without ``prompt`` itself, in that order."""
    out: list[str] = []
    for m in _COLOUR.finditer(prompt):
        out += [_swapped(prompt, m, c) for c in COLOURS if c != m[1]]
    for m in _SHAPE.finditer(prompt):
        out += [_swapped(prompt, m, s) for s in _other_shapes(m[1])]
    for m in _COUNT.finditer(prompt):
        n = COUNT_WORDS.index(m[1])
        out += [_swapped(prompt, m, COUNT_WORDS[k]) for k in (n - 1, n + 1) if k in _COUNTS]
    for m in RELATION_PHRASE_PATTERN.finditer(prompt):
        relation = RELATION_OF_PHRASE[m[1]]
        phrases = RELATION_PHRASES[RELATIONS[relation]]  # the same wording where there is one
        out.append(_swapped(prompt, m, phrases[min(RELATION_PHRASES[relation].index(m[1]), len(phrases) - 1)]))
    colours = list(_COLOUR.finditer(prompt))
    if len(colours) == 2 and colours[0][1] != colours[1][1]:
        first, second = colours
        out.append(prompt[:first.start()] + second[1] + prompt[first.end():second.start()] + first[1]
                   + prompt[second.end():])
    seen = {prompt}
    return [s for s in map(fix_articles, out) if not (s in seen or seen.add(s))]
