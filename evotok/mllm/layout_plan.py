"""Layout plans: the model writes where each object goes before it draws the grid.

With ``MLLMConfig.layout_plan`` a text-to-image answer opens with one short line of text that
lists the objects it will draw, each with its size, colour, shape and the grid cell (row, then
column) of its centre, in the order the prompt names them::

    <|user|>a red star left of a blue cross<|end|><|assistant|>small red star 3 1, large blue cross 4 6<boi>[cell]×n<eoi><|end|>

Why: drawing straight from the prompt, the model must keep count, bind each colour to its shape
and place the objects while it writes cells in raster order, and it mostly fails at all three
(two objects, position and colour attribution are the weakest GenEval-style categories even on
seen pairs). Written as text, the count, the binding and the layout become next-token choices the
LM makes well, and every cell can look up what the plan puts at its own row and column. The plan
is the model's own output, sampled from the same weights; training teaches it from the scene
world's exact layouts. Drawings without a plan (clip-art, Fashion-MNIST) write an empty one.

With ``MLLMConfig.plan_anchors`` the token that closes each entry (its column digit) also gets the
position vector of the entry's cell added to its input embedding, the same vector the drawn cell
there gets (``EvoTokMLLM.cell_positions``): a cell finds the plan's entry for its own place by
matching a vector it already carries, instead of learning which digit tokens name its row and column.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..data.scenes import COLOURS, PLURALS, SHAPES, SIZES, SceneObject

SEPARATOR = ", "


@dataclass(frozen=True)
class PlannedObject:
    """One entry of a plan: what is drawn and the grid cell of its centre."""

    size: str
    colour: str
    shape: str
    row: int
    col: int

    def text(self) -> str:
        return f"{self.size} {self.colour} {self.shape} {self.row} {self.col}"


def centre_cell(obj: SceneObject, grid: int) -> tuple[int, int]:
    """(row, column) of the grid cell holding the object's centre."""
    x, y = obj.centre
    return min(max(int(y * grid), 0), grid - 1), min(max(int(x * grid), 0), grid - 1)


def mention_order(objects: Sequence[SceneObject], caption: str) -> list[int]:
    """Indices of ``objects`` in the order ``caption`` first names their colour and shape (a
    plural counts: "two red stars" names "red star"); objects it never names go last; ties (the
    copies of a counted object) by their centres, top to bottom, then left to right."""
    text = caption.lower()

    def key(k: int) -> tuple[int, float, float]:
        obj = objects[k]
        found = [i for i in (text.find(f"{obj.colour} {obj.shape}"), text.find(f"{obj.colour} {PLURALS[obj.shape]}"))
                 if i >= 0]
        return (min(found) if found else len(text), obj.centre[1], obj.centre[0])

    return sorted(range(len(objects)), key=key)


def plan_of(objects: Sequence[SceneObject], caption: str, grid: int) -> list[PlannedObject]:
    """The plan of a scene drawn for ``caption``: its objects in the order the caption names them."""
    out = []
    for k in mention_order(objects, caption):
        obj = objects[k]
        row, col = centre_cell(obj, grid)
        out.append(PlannedObject(obj.size, obj.colour, obj.shape, row, col))
    return out


def plan_text(plan: Sequence[PlannedObject]) -> str:
    """The plan as the model writes it ("" for none)."""
    return SEPARATOR.join(p.text() for p in plan)


_ENTRY = re.compile(r"^\s*(\w+)\s+(\w+)\s+(\w+)\s+(\d+)\s+(\d+)\s*$")
_CLOSED_ENTRY = re.compile(r"(?:^|,)\s*\w+ \w+ \w+ (\d+) (\d+)$")


def parse_plan(text: str, grid: int) -> list[PlannedObject] | None:
    """The entries of a written plan, or ``None`` when it is malformed (an entry that is not
    "size colour shape row column" with known words and cells on the grid). "" is the empty plan."""
    if not text.strip():
        return []
    out = []
    for part in text.split(SEPARATOR.strip()):
        match = _ENTRY.match(part)
        if match is None:
            return None
        size, colour, shape, row, col = match.groups()
        if size not in SIZES or colour not in COLOURS or shape not in SHAPES or int(row) >= grid or int(col) >= grid:
            return None
        out.append(PlannedObject(size, colour, shape, int(row), int(col)))
    return out


def plan_detections(plan: Sequence[PlannedObject], grid: int) -> list[dict[str, Any]]:
    """A plan as the scene oracle's detections (``SceneOracle.detect``: shape, colour, centre,
    area), so that the GenEval-style judge (``evotok.oracle.judge``) can say whether the plan
    itself satisfies a prompt, apart from whether the drawing follows it."""
    return [{"shape": p.shape, "colour": p.colour, "centre": ((p.col + 0.5) / grid, (p.row + 0.5) / grid),
             "area": SIZES[p.size] ** 2, "valid": True} for p in plan]


def closed_entry_cell(text: str, grid: int) -> int:
    """The cell index (``row · grid + column``) of the plan entry that ``text``, a plan written so
    far, has just closed with its column digit; -1 when its end closes no entry."""
    match = _CLOSED_ENTRY.search(text)
    if match is None or int(match[1]) >= grid or int(match[2]) >= grid:
        return -1
    return int(match[1]) * grid + int(match[2])


def plan_anchors(pieces: Sequence[str], grid: int) -> list[int]:
    """Per plan token (``pieces``: each token's text), the cell of the entry it closes, -1 for the
    others (``MLLMConfig.plan_anchors``)."""
    out, text = [], ""
    for piece in pieces:
        text += piece
        out.append(closed_entry_cell(text, grid))
    return out


def anchor_row(pieces: Sequence[str], start: int, length: int, grid: int) -> list[int]:
    """:func:`plan_anchors` of a plan (``pieces``: its tokens' texts) placed at ``start`` in a
    sequence of ``length`` tokens, -1 everywhere else: the ``anchor_cells`` row of a drawing."""
    row = [-1] * length
    row[start:start + len(pieces)] = plan_anchors(pieces, grid)
    return row
