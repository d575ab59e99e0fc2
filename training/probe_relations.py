"""Can a teacher's frozen image embedding carry relations? Fit only a text side to find out.

    python training/probe_relations.py --teacher assets/teacher [--scenes 4000 --steps 1500]

The teacher's image tower is frozen: its pooled vector (what ``image_proj`` reads) is computed once
for position scenes. Then, for each text side in the table, a fresh linear image projection and
that text side are trained on pairs only: the scene's true relation statement ("a photo of a red
circle left of a blue square") against the same statement with the opposite relation. The score
is how often the true statement wins on held-out scenes (colour-shape pairs never trained on) and
on training scenes; 50% is chance.

* ``mean``: MiniLM's mean-pooled sentence embedding (nearly order-blind) and a Linear;
* ``transformer``: ``evotok.teacher.TextAdapter`` over MiniLM's token states, then a Linear.

Each runs on the raw pooled vector and on it with each pooled group LayerNorm-ed (what the
teacher's ``pool_norm`` does), because the soft-argmax coordinates of ``max_where`` are small
beside the maxima. A text side that wins here but not in the full teacher training points at the
training signal; one that loses here points at the image features or the text encoder.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evotok.data.scenes import SceneWorld  # noqa: E402
from evotok.images import pil_to_tensor  # noqa: E402
from evotok.probe import scene_questions  # noqa: E402
from evotok.teacher import TextAdapter, TinySigLIPTeacher, load_teacher  # noqa: E402


def position_pairs(teacher: TinySigLIPTeacher, split: str, count: int, seed: int):
    """Pooled vectors of ``count`` position scenes with (true, opposite) relation statements."""
    world = SceneWorld(teacher.image_size, seed=seed, split=split, scene_weights={"position": 1.0})
    images, pairs = [], []
    for i in range(count):
        sample = world[i]
        question = next((q for q in scene_questions(sample.attributes) if q.category == "position"), None)
        if question is not None:
            images.append(pil_to_tensor(sample.image, teacher.image_size))
            pairs.append((question.candidates[question.answer], question.candidates[1 - question.answer]))
    with torch.no_grad():
        pooled = torch.cat([teacher.pooled(teacher.image_features(torch.stack(images[k:k + 256])))
                            for k in range(0, len(images), 256)])
    return pooled, pairs


def group_norm(pooled: torch.Tensor, groups: list[int]) -> torch.Tensor:
    return torch.cat([F.layer_norm(part, part.shape[-1:]) for part in pooled.split(groups, dim=-1)], dim=-1)


class TextSide(nn.Module):
    """Rows of a fixed text table -> embedding: MiniLM mean embedding or token states + adapter."""

    def __init__(self, kind: str, teacher: TinySigLIPTeacher, texts: list[str], embed_dim: int) -> None:
        super().__init__()
        self.kind = kind
        encoder = teacher.text_encoder
        if kind == "mean":
            self.register_buffer("table", encoder.encode(texts))
            width = encoder.dim
        else:
            states, mask = encoder.encode_tokens(texts)
            self.register_buffer("states", states)
            self.register_buffer("mask", mask)
            width = 192
            self.adapter = TextAdapter(encoder.dim, width, 1, 4.0, 1e-6)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return self.proj(self.table[rows])
        mask = self.mask[rows]
        length = int(mask.sum(1).max())
        return self.proj(self.adapter(self.states[rows, :length], mask[:, :length]))


def fit(kind: str, train, heldout, texts: list[str], teacher: TinySigLIPTeacher, steps: int, batch: int,
        lr: float, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    (train_x, train_pairs), (held_x, held_pairs) = train, heldout
    row = {t: i for i, t in enumerate(texts)}
    text_side = TextSide(kind, teacher, texts, teacher.embed_dim)
    image_side = nn.Linear(train_x.shape[1], teacher.embed_dim)
    scale, bias = nn.Parameter(torch.tensor(3.0)), nn.Parameter(torch.tensor(0.0))
    opt = torch.optim.AdamW([*text_side.parameters(), *image_side.parameters(), scale, bias], lr=lr)

    def margins(x: torch.Tensor, pairs: list[tuple[str, str]]) -> torch.Tensor:
        image = F.normalize(image_side(x), dim=-1)
        true = F.normalize(text_side(torch.tensor([row[p[0]] for p in pairs])), dim=-1)
        other = F.normalize(text_side(torch.tensor([row[p[1]] for p in pairs])), dim=-1)
        return (image * true).sum(-1), (image * other).sum(-1)

    for _ in range(steps):
        picked = rng.sample(range(len(train_pairs)), min(batch, len(train_pairs)))
        true, other = margins(train_x[picked], [train_pairs[i] for i in picked])
        loss = F.softplus(-(true * scale.exp() + bias)).mean() + F.softplus(other * scale.exp() + bias).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = {}
        for name, x, pairs in (("heldout", held_x, held_pairs), ("train", train_x[:1000], train_pairs[:1000])):
            true, other = margins(x, pairs)
            scores[name] = (true > other).float().mean().item()
    return scores


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="assets/teacher")
    parser.add_argument("--scenes", type=int, default=4000, help="training position scenes")
    parser.add_argument("--heldout", type=int, default=600, help="held-out position scenes")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text", nargs="+", default=["mean", "transformer"], choices=["mean", "transformer"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    teacher = load_teacher(args.teacher)
    if not isinstance(teacher, TinySigLIPTeacher):
        raise SystemExit("probe_relations reads the bundled TinySigLIP teacher's pooled vector")
    teacher.eval()
    started = time.time()
    train = position_pairs(teacher, "train", args.scenes, seed=5)
    heldout = position_pairs(teacher, "heldout", args.heldout, seed=1234)
    texts = sorted({t for _, pairs in (train, heldout) for pair in pairs for t in pair})
    groups = teacher.pooled_groups
    rows = []
    for norm in (False, True):
        use = [(group_norm(x, groups) if norm else x, pairs) for x, pairs in (train, heldout)]
        for kind in args.text:
            scores = fit(kind, use[0], use[1], texts, teacher, args.steps, args.batch_size, args.lr, args.seed)
            rows.append({"text": kind, "groups LayerNorm-ed": norm, **scores})
            print(f"{kind} norm={norm}: held-out {scores['heldout']:.1%} train {scores['train']:.1%}", flush=True)
    print(f"\n{len(train[1])} training / {len(heldout[1])} held-out position scenes, {args.steps} steps, "
          f"{time.time() - started:.0f} s; 50% is chance\n")
    print("| text side | pooled groups LayerNorm-ed | held-out | train |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['text']} | {'yes' if r['groups LayerNorm-ed'] else 'no'} | {r['heldout']:.1%} | {r['train']:.1%} |")
    return rows


if __name__ == "__main__":
    main()
