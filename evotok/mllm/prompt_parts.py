"""One-attribute versions of a scene prompt: its shapes alone, or its colours alone.

"a red star and a blue cross" -> shapes: "a star and a cross"; colours: "a red object and a blue
object". Counts, sizes, relations and backgrounds are kept.

Why: every scene caption names colour and shape together, so nothing in training makes the word
"star" alone carry what a star looks like, whatever its colour; a model may learn each training
pair as a whole and fail on a pair it never saw. Captions that name one attribute (training,
``data.attribute_dropout``) give each word its own job, and make the one-attribute prompts usable
as extra guidance branches when sampling (``attribute_guidance`` in
:func:`evotok.mllm.generate.generate_image_codes`). Tried on the bundled model's scale, both made
held-out drawing no better (``training/configs/mllm_attribute_dropout.yaml``; figures in
``assets/mllm/README.md``): each one-attribute caption still carries the gaps of training.
"""
from __future__ import annotations

import re

from evotok.data.scenes import COLOURS, PLURALS, SHAPES

__all__ = ["shapes_only", "colours_only", "attribute_parts", "fix_articles"]

_COLOUR = "|".join(COLOURS)
_SINGULAR = "|".join(SHAPES)
_PLURAL = "|".join(PLURALS.values())
# "red star", "red stars" (a size word before the colour stays where it is)
_PAIR = re.compile(rf"\b({_COLOUR}) ({_PLURAL}|{_SINGULAR})\b")
# the attribution captions' colour-last phrasing: "a star that is red"
_THAT_IS = re.compile(rf"\b({_SINGULAR}) that is ({_COLOUR})\b")
_ARTICLE = re.compile(r"\b(a|an) (\w+)")


def fix_articles(text: str) -> str:
    """Put "a" or "an" before each word as its first letter asks ("a orange" -> "an orange")."""
    return _ARTICLE.sub(lambda m: ("an " if m[2][0] in "aeiou" else "a ") + m[2], text)


def _object_word(shape_word: str) -> str:
    return "objects" if shape_word in PLURALS.values() else "object"


def shapes_only(prompt: str) -> str:
    """``prompt`` with every colour of a named shape left out ("an orange star" -> "a star")."""
    text = _PAIR.sub(lambda m: m[2], _THAT_IS.sub(lambda m: m[1], prompt))
    return fix_articles(text) if text != prompt else prompt


def colours_only(prompt: str) -> str:
    """``prompt`` with every shape of a named colour made "object(s)" ("two red stars" -> "two red objects")."""
    text = _THAT_IS.sub(lambda m: f"{m[2]} object", prompt)
    text = _PAIR.sub(lambda m: f"{m[1]} {_object_word(m[2])}", text)
    return fix_articles(text) if text != prompt else prompt


def attribute_parts(prompt: str) -> tuple[str, str] | None:
    """``(shapes_only, colours_only)`` of ``prompt``, or ``None`` when it names no coloured shape."""
    if not (_PAIR.search(prompt) or _THAT_IS.search(prompt)):
        return None
    return shapes_only(prompt), colours_only(prompt)
