"""Best-of-n text to image, judged by the same model's understanding.

One set of weights both draws and reads images, so the model can check its own drawings: draw
``n`` candidates for a prompt, read each back through the tokenizer (decode the pixel-depth codes,
encode the pixels to full depth, as any image the model is asked about), and keep the candidate
under which the prompt is the likeliest caption ("Describe the image." → the prompt). No judge
outside the model is involved.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from .chat import IGNORE, encode_chat
from .data import DESCRIBE_QUESTIONS, collate

if TYPE_CHECKING:
    from .model import EvoTokMLLM


@torch.no_grad()
def caption_log_likelihood(model: "EvoTokMLLM", image_codes: torch.Tensor, captions: Sequence[str],
                           question: str = DESCRIBE_QUESTIONS[0]) -> torch.Tensor:
    """Mean log-probability per token of each caption (and its end token) as the answer to
    ``question`` about the matching image (full-depth codes ``b h w D``): a tensor of ``b``.

    The same quantity the training loss averages: ``-caption_log_likelihood`` of one image equals
    the LM loss of that one-turn conversation."""
    if len(captions) != image_codes.shape[0]:
        raise ValueError(f"{image_codes.shape[0]} images but {len(captions)} captions")
    tok, cfg = model.text, model.config
    items = []
    for codes, caption in zip(image_codes.cpu().numpy(), captions):
        encoded = encode_chat(tok, [(question, caption)], cfg.num_cells, cfg.max_prompt_tokens, truncate=True)
        items.append({"task": "score", "image_codes": codes, "gen_codes": None, "input_ids": encoded.input_ids,
                      "labels": encoded.labels, "image_mask": encoded.image_mask, "gen_mask": encoded.gen_mask})
    batch = collate(items, tok.ids["pad"])
    device = model.device
    image_mask = batch["image_mask"].to(device)
    embeds = model.embed_inputs(batch["input_ids"].to(device), image_mask,
                                model.image_features(batch["image_codes"].to(device)))
    hidden, _ = model.backbone(embeds, batch["attention_mask"].to(device), cell_index=model.cell_index(image_mask))
    targets = batch["labels"][:, 1:].to(device)
    supervised = targets != IGNORE
    # logits only where a caption token is predicted, as the training loss does
    log_probs = F.log_softmax(model.text_logits(hidden[:, :-1][supervised]).float(), dim=-1)
    picked = torch.zeros(targets.shape, device=device)
    picked[supervised] = log_probs.gather(-1, targets[supervised].unsqueeze(-1)).squeeze(-1)
    return picked.sum(1) / supervised.sum(1)


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


@torch.no_grad()
def pick_best(model: "EvoTokMLLM", prompts: Sequence[str], candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate (codes ``b n h w pixel_depth``) of each prompt that the model reads back as the
    prompt best: (codes ``b h w pixel_depth``, each candidate's caption score ``b n``; zeros for one)."""
    b, n = candidates.shape[:2]
    if len(prompts) != b:
        raise ValueError(f"{b} candidate sets but {len(prompts)} prompts")
    if n == 1:
        return candidates[:, 0], torch.zeros(b, 1)
    flat = candidates.flatten(0, 1)
    full = model.encode_images(model.decode_codes(flat).clamp(-1, 1))  # read back as any image would be
    scores = caption_log_likelihood(model, full, [p for p in prompts for _ in range(n)]).view(b, n).cpu()
    return candidates[torch.arange(b), scores.argmax(1)], scores


def generate_best_of(model: "EvoTokMLLM", prompts: Sequence[str], n: int, seed: int | None = None,
                     **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """For each prompt, the best of ``n`` drawn candidates: (codes ``b h w pixel_depth``, each
    candidate's score ``b n``). ``sampling`` goes to :meth:`EvoTokMLLM.generate_image`; with
    ``n = 1`` the result is that call's image."""
    return pick_best(model, prompts, draw_candidates(model, prompts, n, seed=seed, **sampling))
