"""Zero-shot probe: rank label texts for images, or for (possibly predicted) patch features.

Given patch features, the teacher's own head (``Teacher.embed_features``) turns them into an
image embedding, so the same probe reads the semantic decoder's prediction at every quantizer
depth exactly as it reads the teacher's features of the real image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from evotok.teacher import Teacher

# Short default vocabularies for the demo, grouped by what the bundled teacher was trained on
# (the scene world's shapes and colours, Fashion-MNIST's classes, clip-art and photo subjects).
LABEL_GROUPS: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "star", "hexagon", "cross"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"],
    "clip art": ["animal", "building", "food", "person", "plant", "car", "tool", "computer", "flag", "sign"],
    "fashion": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"],
    "photo": ["cat", "astronaut", "rocket", "cup of coffee", "flower", "galaxy", "motorcycle", "temple"],
}
DEFAULT_LABELS: list[str] = list(dict.fromkeys(label for group in LABEL_GROUPS.values() for label in group))
DEFAULT_TEMPLATE = "a photo of {}"


@dataclass
class ProbeResult:
    labels: list[str]   # L label names, as given
    texts: list[str]    # L texts actually embedded (labels put into the template)
    logits: Tensor      # b L: logit_scale * cos + logit_bias
    scores: Tensor      # b L: sigmoid probabilities that each label's text matches
    ranking: Tensor     # b L: label indices, best first

    def top_labels(self, k: int = 5) -> list[list[tuple[str, float]]]:
        return top_labels(self, k)


def _article(label: str) -> str:
    return "an" if label[:1].lower() in "aeiou" else "a"


def fill_template(template: str, label: str) -> str:
    """Put ``label`` into ``template``; a template ending in "of {}" also gets the article
    ("a photo of {}" + "ankle boot" -> "a photo of an ankle boot"), unless the label starts
    with a number or already has an article."""
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the label goes, got {template!r}")
    if template.endswith("of {}") and not label[:1].isdigit() and not label.lower().startswith(("a ", "an ", "the ")):
        return template.replace("{}", f"{_article(label)} {label}")
    return template.replace("{}", label)


@torch.no_grad()
def zero_shot(teacher: Teacher, features_or_images: Tensor, labels: list[str],
              template: str | None = DEFAULT_TEMPLATE) -> ProbeResult:
    """Score every label for every image.

    ``features_or_images`` is either images ``b 3 H W`` in ``[-1, 1]`` or patch features
    ``b N C`` of ``teacher`` (N = grid², C = feature width). ``template=None`` embeds labels as given.
    """
    if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(l, str) and l.strip() for l in labels):
        raise ValueError("labels must be a non-empty list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be unique")
    if teacher.embed_dim is None:
        raise ValueError(f"{type(teacher).__name__} has no text side; a zero-shot probe needs one")
    if not isinstance(features_or_images, Tensor):
        raise TypeError(f"expected a tensor of images (b×3×H×W) or patch features (b×N×C), "
                        f"got {type(features_or_images).__name__}")
    if features_or_images.ndim == 4:
        image_embeds = teacher.embed_images(features_or_images)
    elif features_or_images.ndim == 3:
        image_embeds = teacher.embed_features(features_or_images)
    else:
        raise ValueError(f"expected images b×3×H×W or patch features b×N×C, got shape {tuple(features_or_images.shape)}")
    texts = [fill_template(template, label) for label in labels] if template else list(labels)
    text_embeds = teacher.embed_text(texts)
    logits = teacher.similarity_logits(image_embeds, text_embeds).float().cpu()
    return ProbeResult(labels=list(labels), texts=texts, logits=logits, scores=torch.sigmoid(logits),
                       ranking=logits.argsort(dim=1, descending=True))


def top_labels(result: ProbeResult, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each image, the ``k`` best ``(label, probability)`` pairs, best first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, len(result.labels))
    return [[(result.labels[j], float(result.scores[i, j])) for j in result.ranking[i, :k].tolist()]
            for i in range(result.scores.shape[0])]


# ------------------------------------------------------------------------------------------------
# Scene questions: single-attribute multiple choice about a rendered scene, asked by ranking
# candidate captions. The same phrasings, as true statements, are what the bundled teacher is
# trained on besides the scene captions, so a question's candidates match its text side.
# ------------------------------------------------------------------------------------------------
SCENE_CATEGORIES = ("shape", "colour", "count", "position")


@dataclass
class SceneQuestion:
    category: str            # "shape" | "colour" | "count" | "position" | "position4" | "colour_word"
    candidates: list[str]    # candidate captions, exactly one of them true
    answer: int              # index of the true candidate


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _noun(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _count_phrase(n: int, colour: str | None, shape: str) -> str:
    """"three red circles", "one red circle"; without a colour "three circles"."""
    from evotok.data.scenes import COUNT_WORDS, PLURALS

    noun = shape if n == 1 else PLURALS[shape]
    return f"{COUNT_WORDS[n]} {colour} {noun}" if colour else f"{COUNT_WORDS[n]} {noun}"


def _unique_relations(attributes: dict) -> list[tuple[dict, str, dict]]:
    """(subject, relation, object) for relations whose two objects are each the only one of their kind."""
    objects = attributes["objects"]
    kinds = [(o["colour"], o["shape"]) for o in objects]
    return [(objects[r["subject"]], r["relation"], objects[r["object"]]) for r in attributes.get("relations", [])
            if kinds.count(kinds[r["subject"]]) == 1 and kinds.count(kinds[r["object"]]) == 1]


def scene_statements(attributes: dict, both_orders: bool = True) -> list[str]:
    """True statements about a scene in the probe's phrasings (from ``Sample.attributes``).

    A relation is stated both ways ("A left of B", "B right of A") unless ``both_orders`` is False:
    then only with the earlier object as subject, the order the position questions use.
    """
    objects = attributes["objects"]
    kind = attributes["scene_type"]
    out: list[str] = []
    if kind == "single_object":
        o = objects[0]
        out += [f"a photo of {_a(o['shape'])}", _a(o["shape"]), f"a photo of {_a(_noun(o))}", _a(_noun(o)),
                f"a photo of {_a(o['colour'])} object", f"a photo of {_a(o['size'] + ' ' + _noun(o))}",
                f"a photo of {_count_phrase(1, o['colour'], o['shape'])}"]
    elif kind in ("two_objects", "colour_attribution"):
        a, b = objects[0], objects[1]
        out += [f"a photo of {_a(_noun(a))} and {_a(_noun(b))}", f"a photo of {_a(_noun(b))} and {_a(_noun(a))}"]
    elif kind == "counting":
        main = objects[0]
        n = sum((o["colour"], o["shape"]) == (main["colour"], main["shape"]) for o in objects)
        out.append(f"a photo of {_count_phrase(n, main['colour'], main['shape'])}")
        if all(o["shape"] == main["shape"] for o in objects):
            out.append(f"a photo of {_count_phrase(n, None, main['shape'])}")
    order = {id(o): i for i, o in enumerate(objects)}
    for subject, relation, obj in _unique_relations(attributes):
        if both_orders or order[id(subject)] < order[id(obj)]:
            out.append(f"a photo of {_a(_noun(subject))} {relation} {_a(_noun(obj))}")
    return list(dict.fromkeys(out))


def scene_questions(attributes: dict) -> list[SceneQuestion]:
    """The single-attribute questions a scene supports, each as a ranking of candidate captions.

    shape / colour: single-object scenes ("a photo of a {shape}", "a photo of a {colour} {shape}");
    count: counting scenes ("a photo of {n} {colour} {shapes}", n = 1..4);
    position: the scene's relation against its opposite on the same axis (left/right, above/below);
    ``position4`` ranks all four relations and ``colour_word`` ranks "a photo of a {colour} object".
    """
    from evotok.data.scenes import COLOURS, SHAPES

    objects = attributes["objects"]
    kind = attributes["scene_type"]
    questions: list[SceneQuestion] = []
    if kind == "single_object":
        o = objects[0]
        questions.append(SceneQuestion("shape", [f"a photo of {_a(s)}" for s in SHAPES], SHAPES.index(o["shape"])))
        colours = list(COLOURS)
        questions.append(SceneQuestion("colour", [f"a photo of {_a(c + ' ' + o['shape'])}" for c in colours],
                                       colours.index(o["colour"])))
        questions.append(SceneQuestion("colour_word", [f"a photo of {_a(c)} object" for c in colours],
                                       colours.index(o["colour"])))
    elif kind == "counting":
        main = objects[0]
        n = sum((o["colour"], o["shape"]) == (main["colour"], main["shape"]) for o in objects)
        questions.append(SceneQuestion("count", [f"a photo of {_count_phrase(k, main['colour'], main['shape'])}"
                                                 for k in range(1, 5)], n - 1))
    elif kind == "position":
        relations = [r for r in _unique_relations(attributes) if r[0] is objects[0] and r[2] is objects[1]]
        if relations:
            subject, relation, obj = relations[0]
            axis = ("left of", "right of") if relation in ("left of", "right of") else ("above", "below")
            options = ("left of", "right of", "above", "below")
            for name, rels in (("position", axis), ("position4", options)):
                questions.append(SceneQuestion(name, [f"a photo of {_a(_noun(subject))} {r} {_a(_noun(obj))}"
                                                      for r in rels], rels.index(relation)))
    return questions
