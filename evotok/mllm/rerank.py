"""Best-of-n text to image, judged by the same model's understanding.

One set of weights both draws and reads images, so the model can check its own drawings: draw
``n`` candidates for a prompt, read each back through the tokenizer (decode the pixel-depth codes,
encode the pixels to full depth, as any image the model is asked about), and keep the one the
model reads as the prompt best. The judges (``JUDGES``) differ in what they ask of a candidate:
that the prompt be its likeliest caption ("Describe the image." → the prompt), likelier than the
prompt's near misses (another colour, shape, count or relation), that the model answer the
questions the prompt settles as the prompt says ("How many stars are there?" → "three"), or the
last two together. No judge outside the model is involved.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from .chat import IGNORE, EncodedChat, encode_chat, prompt_ids
from .data import DESCRIBE_QUESTIONS, collate
from .generate import right_pad
from .near_miss import near_misses
from .prompt_checks import prompt_checks
from .read_back import read_back_codes

if TYPE_CHECKING:
    from .model import EvoTokMLLM


@torch.no_grad()
def caption_log_likelihood(model: "EvoTokMLLM", image_codes: torch.Tensor, captions: Sequence[str],
                           question: str = DESCRIBE_QUESTIONS[0], per_token: bool = True) -> torch.Tensor:
    """Mean log-probability per token of each caption (and its end token) as the answer to
    ``question`` about the matching image (full-depth codes ``b h w D``): a tensor of ``b``; with
    ``per_token=False`` the caption's whole log-probability, the sum over its tokens.

    The same quantity the training loss averages: ``-caption_log_likelihood`` of one image equals
    the LM loss of that one-turn conversation."""
    if len(captions) != image_codes.shape[0]:
        raise ValueError(f"{image_codes.shape[0]} images but {len(captions)} captions")
    tok, cfg = model.text, model.config
    items = []
    for caption in captions:
        encoded = encode_chat(tok, [(question, caption)], cfg.num_cells, cfg.max_prompt_tokens, truncate=True)
        items.append({"task": "score", "image_codes": None, "gen_codes": None, "input_ids": encoded.input_ids,
                      "labels": encoded.labels, "image_mask": encoded.image_mask, "gen_mask": encoded.gen_mask})
    batch = collate(items, tok.ids["pad"])
    device = model.device
    image_mask = batch["image_mask"].to(device)
    embeds = model.embed_inputs(batch["input_ids"].to(device), image_mask, model.image_features(image_codes.to(device)))
    hidden, _ = model.backbone(embeds, batch["attention_mask"].to(device), cell_index=model.cell_index(image_mask))
    targets = batch["labels"][:, 1:].to(device)
    supervised = targets != IGNORE
    # logits only where a caption token is predicted, as the training loss does
    log_probs = F.log_softmax(model.text_logits(hidden[:, :-1][supervised]).float(), dim=-1)
    picked = torch.zeros(targets.shape, device=device)
    picked[supervised] = log_probs.gather(-1, targets[supervised].unsqueeze(-1)).squeeze(-1)
    return picked.sum(1) / supervised.sum(1) if per_token else picked.sum(1)


@torch.no_grad()
def contrast_scores(model: "EvoTokMLLM", image_codes: torch.Tensor, prompts: Sequence[str],
                    images_per_batch: int = 8) -> torch.Tensor:
    """How surely each image (full-depth codes ``b h w D``) is read as its prompt rather than as
    any near miss of it (:func:`evotok.mllm.near_miss.near_misses`): the log of the prompt's share of
    the caption probability (whole captions, :func:`caption_log_likelihood` with ``per_token=False``)
    among the prompt and its near misses, a tensor of ``b``, at most 0. A prompt without near
    misses scores 0."""
    if len(prompts) != image_codes.shape[0]:
        raise ValueError(f"{image_codes.shape[0]} images but {len(prompts)} prompts")
    out = torch.empty(len(prompts))
    for first in range(0, len(prompts), images_per_batch):
        groups = [[p] + near_misses(p) for p in prompts[first:first + images_per_batch]]
        totals = _totals_after_one_prefix(model, image_codes[first:first + images_per_batch], groups,
                                          DESCRIBE_QUESTIONS[0])
        for k, scores in enumerate(totals):
            out[first + k] = scores[0] - torch.logsumexp(scores, 0)
    return out


def _totals_after_one_prefix(model: "EvoTokMLLM", image_codes: torch.Tensor, groups: Sequence[Sequence[str]],
                             question: str) -> list[torch.Tensor]:
    """Each group's captions' whole log-probabilities as the answer to ``question`` about the
    group's image: the image and the question run through the LM once per image (its KV cache
    then serves every caption of the group), so a caption costs only its own few tokens."""
    tok, cfg = model.text, model.config
    prefix = encode_chat(tok, [(question, None)], cfg.num_cells, cfg.max_prompt_tokens, truncate=True)
    return _continuation_totals(model, image_codes, prefix, [[([], caption) for caption in g] for g in groups])


def _answer_totals(model: "EvoTokMLLM", image_codes: torch.Tensor,
                   groups: Sequence[Sequence[tuple[str, str]]]) -> list[torch.Tensor]:
    """Each group's (question, answer) pairs about the group's image: each answer's whole
    log-probability as the answer to its question, asked first in a conversation. The image runs
    through the LM once; every question and answer continues its KV cache."""
    tok, cfg = model.text, model.config
    prefix = EncodedChat()
    prefix.add([tok.ids["user"]])
    prefix.add([tok.ids["image"]] * cfg.num_cells, image=True)
    asked = [[(prompt_ids(tok, q, cfg.max_prompt_tokens, "question", truncate=True)
               + [tok.ids["end"], tok.ids["assistant"]], answer) for q, answer in g] for g in groups]
    return _continuation_totals(model, image_codes, prefix, asked)


def _continuation_totals(model: "EvoTokMLLM", image_codes: torch.Tensor, prefix: EncodedChat,
                         groups: Sequence[Sequence[tuple[list[int], str]]]) -> list[torch.Tensor]:
    """The prefix (holding the image's placeholders) with each group's image runs through the LM
    once; each (lead ids, answer) of the group continues its KV cache, and the answer's tokens and
    end token are scored (the lead's are not): per group, each answer's whole log-probability."""
    tok, device = model.text, model.device
    b, length = len(groups), len(prefix.input_ids)
    ids = torch.tensor([prefix.input_ids] * b, device=device)
    image_mask = torch.tensor([prefix.image_mask] * b, device=device)
    embeds = model.embed_inputs(ids, image_mask, model.image_features(image_codes.to(device)))
    positions = torch.arange(length, device=device)[None].expand(b, -1)
    hidden, cache = model.backbone(embeds, torch.ones_like(ids), positions, use_cache=True,
                                   cell_index=model.cell_index(image_mask))
    owner = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=device)
    leads = [lead for g in groups for lead, _ in g]
    answers = [tok.encode(answer) + [tok.ids["end"]] for g in groups for _, answer in g]
    cont_ids, cont_mask = right_pad([lead + answer for lead, answer in zip(leads, answers)], tok.ids["pad"], device)
    scored, _ = right_pad([[0] * len(lead) + [1] * len(answer) for lead, answer in zip(leads, answers)], 0, device)
    cache.batch_select_indices(owner)
    mask = torch.cat([cont_mask.new_ones(len(answers), length), cont_mask], 1)  # the prefix, then the continuation
    after, _ = model.backbone(model.lm.get_input_embeddings()(cont_ids), mask,
                              length + torch.arange(cont_ids.shape[1], device=device)[None].expand(len(answers), -1),
                              cache=cache, use_cache=True, cell_index=torch.full_like(cont_ids, -1))
    # the state before each continuation token: the prefix's last for the first, then the continuation's own
    states = torch.cat([hidden[owner, -1:], after[:, :-1]], 1)
    scored = scored.bool()
    log_probs = F.log_softmax(model.text_logits(states[scored]).float(), dim=-1)
    picked = torch.zeros(cont_ids.shape, device=device)
    picked[scored] = log_probs.gather(-1, cont_ids[scored].unsqueeze(-1)).squeeze(-1)
    return list(picked.sum(1).cpu().split([len(g) for g in groups]))


@torch.no_grad()
def question_scores(model: "EvoTokMLLM", image_codes: torch.Tensor, prompts: Sequence[str],
                    images_per_batch: int = 8) -> torch.Tensor:
    """How surely the model gives, about each image (full-depth codes ``b h w D``), the answers its
    prompt settles (:func:`evotok.mllm.prompt_checks.prompt_checks`): the sum of those answers'
    log-probabilities, a tensor of ``b``, at most 0. A prompt without checks scores 0."""
    if len(prompts) != image_codes.shape[0]:
        raise ValueError(f"{image_codes.shape[0]} images but {len(prompts)} prompts")
    out = torch.zeros(len(prompts))
    for first in range(0, len(prompts), images_per_batch):
        chunk = [(k, checks) for k, p in enumerate(prompts[first:first + images_per_batch], first)
                 if (checks := prompt_checks(p))]
        if chunk:
            totals = _answer_totals(model, image_codes[[k for k, _ in chunk]], [c for _, c in chunk])
            for (k, _), scores in zip(chunk, totals):
                out[k] = scores.sum()
    return out


@torch.no_grad()
def draw_candidates(model: "EvoTokMLLM", prompts: Sequence[str], n: int, seed: int | None = None,
                    **sampling) -> torch.Tensor:
    """``n`` drawings of each prompt, drawn together: codes ``b n h w pixel_depth``. ``sampling``
    goes to :meth:`EvoTokMLLM.generate_image`; with ``n = 1`` the drawing is that call's image."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    prompts = list(prompts)
    drawn = model.generate_image([p for p in prompts for _ in range(n)], seed=seed, **sampling)
    return drawn.view(len(prompts), n, *drawn.shape[1:])


# each judge's score of full-depth codes ``b h w D`` for their prompts (see pick_best)
_JUDGE_SCORES = {
    "caption": caption_log_likelihood,
    "contrast": contrast_scores,
    "questions": question_scores,
    "contrast+questions": lambda model, codes, prompts: (contrast_scores(model, codes, prompts)
                                                        + question_scores(model, codes, prompts)),
}
JUDGES = tuple(_JUDGE_SCORES)
# the app's. Temperature 0.8, the same candidates (model card): held-out 0.608, 0.656 and 0.597 on three runs,
# "contrast+questions" 0.625, 0.653 and 0.600, "questions" 0.578, 0.611 and 0.575; seen 0.742, 0.719 and 0.731
DEFAULT_JUDGE = "contrast"


@torch.no_grad()
def read_back(model: "EvoTokMLLM", candidates: torch.Tensor) -> torch.Tensor:
    """Candidates (codes ``b n h w pixel_depth``) as the model reads any image: decoded at the pixel
    depth and encoded again to full depth (codes ``b n h w D``; :mod:`evotok.mllm.read_back`)."""
    full = read_back_codes(model, candidates.flatten(0, 1))
    return full.view(*candidates.shape[:2], *full.shape[1:])


@torch.no_grad()
def pick_best(model: "EvoTokMLLM", prompts: Sequence[str], candidates: torch.Tensor, judge: str = DEFAULT_JUDGE,
              read: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate (codes ``b n h w pixel_depth``) of each prompt that the model reads back as the
    prompt best: (codes ``b h w pixel_depth``, each candidate's score ``b n``; zeros for one).

    ``judge="caption"`` scores the prompt's mean log-probability per token as the candidate's caption
    (:func:`caption_log_likelihood`); ``"contrast"`` how surely the candidate is read as the prompt
    rather than as a near miss of it (:func:`contrast_scores`); ``"questions"`` how surely the model
    gives the answers the prompt settles (:func:`question_scores`); ``"contrast+questions"`` the sum
    of those two log-probabilities. ``read``: the candidates already read back (:func:`read_back`),
    so that several judges score them without reading them twice."""
    if judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; expected one of {JUDGES}")
    b, n = candidates.shape[:2]
    if len(prompts) != b:
        raise ValueError(f"{b} candidate sets but {len(prompts)} prompts")
    if n == 1:
        return candidates[:, 0], torch.zeros(b, 1)
    full = (read_back(model, candidates) if read is None else read).flatten(0, 1)
    repeated = [p for p in prompts for _ in range(n)]
    scores = _JUDGE_SCORES[judge](model, full, repeated).view(b, n).cpu()
    return candidates[torch.arange(b), scores.argmax(1)], scores


def generate_best_of(model: "EvoTokMLLM", prompts: Sequence[str], n: int, seed: int | None = None,
                     judge: str = DEFAULT_JUDGE, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """For each prompt, the best of ``n`` drawn candidates by ``judge`` (see :func:`pick_best`):
    (codes ``b h w pixel_depth``, each candidate's score ``b n``). ``sampling`` goes to
    :meth:`EvoTokMLLM.generate_image`; with ``n = 1`` the result is that call's image."""
    return pick_best(model, prompts, draw_candidates(model, prompts, n, seed=seed, **sampling), judge=judge)
