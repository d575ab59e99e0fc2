"""EvoTokMLLM: one causal language model that reads and writes EvoTok codes.

* Understanding: the frozen tokenizer's semantic features (one vector per grid cell, at the
  semantic depth) go through an MLP projector into the LM's input embeddings at the ``<image>``
  placeholders.
* Generation: after ``<boi>`` the LM runs over the grid in raster order; at each position its last
  hidden state conditions a small depth transformer that samples the ``pixel_depth`` codes of the
  next cell stage by stage; the LM's input for a cell is a projection of the code prefix sum
  ``codes_to_latent(codes, pixel_depth)``, so the LM never needs a vocabulary of image codes.

The tokenizer is attached, not owned: it is frozen, its weights stay in its own checkpoint, and
the saved model records which one it was trained with (path and a digest of its weights).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..hub import CheckpointError, PretrainedMixin, resolve_checkpoint, weights_digest
from .cell_attributes import CellAttributeHead
from .chat import IGNORE
from .config import MLLMConfig
from .depth_transformer import DepthTransformer
from .generate import batch_answers, generate_image_codes, stream_answer
from .grid_rope import cell_index_of, grid_position_ids, install_grid_rope
from .input_noise import swap_cells
from .plan_canvas import PlanCanvas
from .read_back import read_back_some
from .text_tokenizer import TextTokenizer

TEXT_TOKENIZER_DIR = "text_tokenizer"


@dataclass
class MLLMOutput:
    """Losses of one training forward pass (``depth_loss_per_stage``: one value per code stage)."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    depth_loss: torch.Tensor
    depth_loss_per_stage: torch.Tensor
    lm_tokens: int
    depth_positions: int
    cell_attribute_loss: torch.Tensor | None = None  # with a cell-attribute head and targets


def build_lm(lm_config: dict[str, Any]) -> nn.Module:
    """A transformers causal LM from its config dict (random weights, no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(lm_config)
    model_type = cfg.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


def tokenizer_digest(tokenizer: nn.Module) -> str:
    """sha256 of a tokenizer's weights: identifies the checkpoint a model was trained with."""
    return weights_digest(tokenizer)


class EvoTokMLLM(nn.Module, PretrainedMixin):
    """Chat about images and generate images from text with one set of weights.

    >>> model = EvoTokMLLM.from_pretrained("assets/mllm")       # also loads its image tokenizer
    >>> codes = model.generate_image("a red star", guidance_scale=3.0, seed=0)   # b h w pixel_depth
    >>> images = model.decode_codes(codes)                       # b 3 H W in [-1, 1]
    >>> "".join(model.answer(image, "What colour is the star?"))  # streamed text pieces
    """

    config_class = MLLMConfig
    model_type = "evotok_mllm"

    def __init__(self, config: MLLMConfig, text_tokenizer: TextTokenizer | None = None, lm: nn.Module | None = None):
        super().__init__()
        if config.lm_config is None:
            raise ValueError("MLLMConfig.lm_config is empty; build a new model with EvoTokMLLM.build")
        self.config = config
        self.lm = lm if lm is not None else build_lm(config.lm_config)
        hidden = config.hidden_size
        width = config.projector_hidden or hidden
        self.projector = nn.Sequential(nn.LayerNorm(config.semantic_dim), nn.Linear(config.semantic_dim, width),
                                       nn.GELU(), nn.Linear(width, hidden))
        self.projector_context = None
        if config.projector_context_layers:
            self._build_projector_context()
        self.latent_in = nn.Sequential(nn.Linear(config.code_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.grid_pos = nn.Parameter(torch.zeros(config.num_cells, hidden))
        nn.init.trunc_normal_(self.grid_pos, std=0.02)
        self.register_parameter("grid_rows", None)
        self.register_parameter("grid_cols", None)
        if config.grid_axis_embeddings:
            self._build_grid_axes()
        if config.grid_rope:
            install_grid_rope(self.lm)
        self.depth = DepthTransformer(hidden, config.pixel_depth, config.codebook_size, config.num_cells,
                                      config.depth_width, config.depth_layers, config.depth_heads,
                                      head=config.depth_head, code_dim=config.code_dim,
                                      head_width=config.depth_head_width)
        self.cell_attributes = CellAttributeHead(hidden) if config.cell_attribute_head else None
        self.plan_canvas = PlanCanvas(hidden) if config.plan_canvas else None
        self.text_tokenizer = text_tokenizer
        self.__dict__["image_tokenizer"] = None  # attached, never a submodule: not saved, not trained
        self._embedding_hooks: list = []
        self._cache_arg = "cache" if "cache" in inspect.signature(self.lm.base_model.forward).parameters \
            else "past_key_values"

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, image_tokenizer: nn.Module, text_tokenizer: TextTokenizer, *, image_tokenizer_path: str,
              lm_config: dict[str, Any] | None = None, lm_name_or_path: str | None = None,
              **config_overrides: Any) -> "EvoTokMLLM":
        """A new model around a frozen EvoTok tokenizer.

        Either ``lm_config`` (e.g. :func:`~evotok.mllm.config.qwen2_lm_config`, trained from
        scratch; its vocabulary is sized to ``text_tokenizer``) or ``lm_name_or_path`` (a
        pretrained transformers causal LM whose embeddings are grown for the new special tokens).
        """
        from transformers import AutoModelForCausalLM

        if (lm_config is None) == (lm_name_or_path is None):
            raise ValueError("give exactly one of lm_config (train from scratch) or lm_name_or_path (pretrained LM)")
        base_vocab = None
        if lm_name_or_path is not None:
            lm = AutoModelForCausalLM.from_pretrained(str(lm_name_or_path))
            # rows from the LM's own vocabulary up are new (Qwen pads its table beyond the
            # tokenizer, so our tokens may land inside the existing rows)
            base_vocab = text_tokenizer.pretrained_size or min(text_tokenizer.ids.values())
            if len(text_tokenizer) > lm.get_input_embeddings().num_embeddings:
                lm.resize_token_embeddings(len(text_tokenizer))
            lm_config = lm.config.to_dict()
        else:
            lm_config = {**lm_config, "vocab_size": max(int(lm_config.get("vocab_size", 0)), len(text_tokenizer))}
            lm = build_lm(lm_config)
        tcfg = image_tokenizer.config
        semantic_dim = _semantic_dim(image_tokenizer)
        config = MLLMConfig(
            image_tokenizer=str(image_tokenizer_path), image_tokenizer_sha256=tokenizer_digest(image_tokenizer),
            grid_size=tcfg.grid_size, pixel_depth=tcfg.pixel_depth, semantic_depth=tcfg.semantic_depth,
            codebook_size=tcfg.codebook_size, code_dim=tcfg.code_dim, semantic_dim=semantic_dim,
            lm_name_or_path=str(lm_name_or_path) if lm_name_or_path else None, lm_config=lm_config,
            base_vocab_size=base_vocab, **config_overrides,
        )
        model = cls(config, text_tokenizer=text_tokenizer, lm=lm)
        model.attach_image_tokenizer(image_tokenizer)
        return model

    def attach_image_tokenizer(self, tokenizer: nn.Module, check: bool = True) -> None:
        """Use ``tokenizer`` (frozen, eval mode) for encoding, semantic features, latents and decoding."""
        tcfg, cfg = tokenizer.config, self.config
        mismatched = [f"{name}: model {mine} vs tokenizer {theirs}" for name, mine, theirs in (
            ("grid_size", cfg.grid_size, tcfg.grid_size), ("pixel_depth", cfg.pixel_depth, tcfg.pixel_depth),
            ("semantic_depth", cfg.semantic_depth, tcfg.semantic_depth),
            ("codebook_size", cfg.codebook_size, tcfg.codebook_size), ("code_dim", cfg.code_dim, tcfg.code_dim),
            ("semantic_dim", cfg.semantic_dim, _semantic_dim(tokenizer))) if mine != theirs]
        if mismatched:
            raise CheckpointError("the image tokenizer does not fit this multimodal model: " + "; ".join(mismatched))
        if check and cfg.image_tokenizer_sha256 and tokenizer_digest(tokenizer) != cfg.image_tokenizer_sha256:
            raise CheckpointError(
                f"the image tokenizer's weights differ from the ones this model was trained with "
                f"({cfg.image_tokenizer!r}, sha256 {cfg.image_tokenizer_sha256[:12]}…); pass the right tokenizer "
                f"or check_image_tokenizer=False to use it anyway")
        tokenizer.eval()
        for p in tokenizer.parameters():
            p.requires_grad_(False)
        device = self.grid_pos.device
        self.__dict__["image_tokenizer"] = tokenizer.to(device)
        if self.depth.code_head is not None:
            self.depth.code_head.set_codebooks(tokenizer.quantizer.embed)

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda() move the attached tokenizer too
        super()._apply(fn, recurse)
        tok = self.__dict__.get("image_tokenizer")
        if tok is not None:
            tok._apply(fn, recurse)
        return self

    @property
    def tokenizer(self) -> nn.Module:
        tok = self.__dict__.get("image_tokenizer")
        if tok is None:
            raise RuntimeError("no image tokenizer attached; use EvoTokMLLM.from_pretrained or attach_image_tokenizer")
        return tok

    @property
    def text(self) -> TextTokenizer:
        if self.text_tokenizer is None:
            raise RuntimeError("no text tokenizer attached to this model")
        return self.text_tokenizer

    @property
    def device(self) -> torch.device:
        return self.grid_pos.device

    # ------------------------------------------------------------------ saving
    def _save_extra(self, folder: Path) -> None:
        self.text.save(folder / TEXT_TOKENIZER_DIR)

    def _load_extra(self, folder: Path) -> None:
        tok = TextTokenizer.load(folder / TEXT_TOKENIZER_DIR)
        vocab = self.lm.get_input_embeddings().num_embeddings
        if len(tok) > vocab:
            raise CheckpointError(f"{folder}: the text tokenizer has {len(tok)} tokens but the LM only {vocab} embeddings")
        self.text_tokenizer = tok

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        image_tokenizer: nn.Module | str | os.PathLike | None = None,
                        check_image_tokenizer: bool = True, **hub_kwargs: Any) -> "EvoTokMLLM":
        """Load a saved model and the image tokenizer it records (or ``image_tokenizer``: a model or path)."""
        from ..model import EvoTok

        folder = resolve_checkpoint(name_or_path, **hub_kwargs)
        model = super().from_pretrained(folder, map_location=map_location)
        if not isinstance(image_tokenizer, nn.Module):
            where = image_tokenizer
            if where is None:
                where = _find_tokenizer(model.config.image_tokenizer, folder)
            try:
                image_tokenizer = EvoTok.from_pretrained(where, map_location=map_location)
            except CheckpointError as err:
                raise CheckpointError(f"cannot load the image tokenizer {str(where)!r} recorded by {folder}: {err}. "
                                      "Pass image_tokenizer=<folder> to point at it.") from err
        model.attach_image_tokenizer(image_tokenizer, check=check_image_tokenizer)
        return model

    # ------------------------------------------------------------------ training
    def set_trainable(self, train_lm: bool) -> None:
        """Stage 1 (``train_lm=False``): projector, depth transformer, grid/latent adapters and the
        new token rows of the input and output embeddings learn, the rest of the LM is frozen.
        Stage 2 (``True``): everything learns. With a from-scratch LM (``base_vocab_size`` is None)
        every embedding row is "new".
        """
        for p in self.lm.parameters():
            p.requires_grad_(train_lm)
        for hook in self._embedding_hooks:
            hook.remove()
        self._embedding_hooks = []
        if train_lm:
            return
        base = self.config.base_vocab_size or 0
        tables = {id(m.weight): m.weight for m in (self.lm.get_input_embeddings(), self.lm.get_output_embeddings())
                  if m is not None}
        for weight in tables.values():
            weight.requires_grad_(True)
            if base:
                keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
                keep[base:] = 1
                self._embedding_hooks.append(
                    weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype)))

    def image_features(self, image_codes: torch.Tensor) -> torch.Tensor:
        """Frozen semantic features at the semantic depth: codes ``b h w D`` -> ``b (h w) C``."""
        with torch.no_grad():
            return self.tokenizer.semantic_features(image_codes, depth=self.config.semantic_depth)

    def project_image(self, image_features: torch.Tensor) -> torch.Tensor:
        """``b N C`` semantic features -> ``b N hidden`` LM inputs (before the grid positions): the
        per-cell MLP, plus the convolutional ``GridContext`` branch when the model has one."""
        values = self.projector(image_features)
        if self.projector_context is not None:
            values = values + self.projector_context(image_features)
        return values

    def add_projector_context(self, layers: int) -> None:
        """Give a trained model the ``GridContext`` branch (its output starts at zero, so every
        answer stays as it was until the branch is trained); saved with the model from then on."""
        if self.projector_context is not None:
            raise ValueError(f"this model already has a projector context of {self.config.projector_context_layers} layers")
        self.config.projector_context_layers = int(layers)
        self._build_projector_context()
        self.projector_context.to(self.grid_pos.device, self.grid_pos.dtype)

    def _build_projector_context(self) -> None:
        from .grid_context import GridContext

        cfg = self.config
        self.projector_context = GridContext(cfg.semantic_dim, cfg.projector_hidden or cfg.hidden_size, cfg.hidden_size,
                                             cfg.projector_context_layers, cfg.grid_size)

    def add_grid_axes(self, init_norm: float = 0.0) -> None:
        """Give a trained model row and column embeddings, saved with the model from then on.

        ``init_norm`` 0: they start at zero, so nothing changes until they learn. Above 0: they
        start as a centred sine-cosine pattern (rows in the first half of the channels, columns in
        the second) whose sum has that mean norm per cell: a signal the model can find at once,
        at the price of first disturbing what it had learned.
        """
        if self.config.grid_axis_embeddings:
            raise ValueError("this model already has grid axis embeddings")
        if init_norm < 0:
            raise ValueError(f"init_norm must be >= 0, got {init_norm}")
        self.config.grid_axis_embeddings = True
        self._build_grid_axes()
        if init_norm:
            with torch.no_grad():
                half = self.config.hidden_size // 2
                pattern = _centred_sincos(self.config.grid_size, half) * (init_norm / 2 ** 0.5)
                self.grid_rows[:, 0, :half] = pattern
                self.grid_cols[0, :, half:2 * half] = pattern

    def use_codebook_head(self, head_width: int | None = None) -> None:
        """Give a trained model the codebook output head (``evotok.mllm.codebook_head``) in place of
        the free one. The head is new, so the drawing must be trained again: at first the code
        loss sits near uniform (ln K per stage)."""
        if self.config.depth_head == "codebook":
            raise ValueError("this model already has the codebook head")
        self.config.depth_head = "codebook"
        self.config.depth_head_width = int(head_width or self.config.depth_head_width)
        self.depth.use_codebook_head(self.config.code_dim, self.config.depth_head_width)
        if self.__dict__.get("image_tokenizer") is not None:
            self.depth.code_head.set_codebooks(self.tokenizer.quantizer.embed)

    def add_cell_attribute_head(self) -> None:
        """Give a trained model the cell-attribute read-outs (``evotok.mllm.cell_attributes``)."""
        if self.config.cell_attribute_head:
            raise ValueError("this model already has the cell-attribute head")
        self.config.cell_attribute_head = True
        self.cell_attributes = CellAttributeHead(self.config.hidden_size).to(self.grid_pos.device)

    def add_plan_canvas(self) -> None:
        """Give a trained planning model the plan canvas (``evotok.mllm.plan_canvas``); its tables
        start at zero, so it draws as before until they learn."""
        if not self.config.layout_plan:
            raise ValueError("the plan canvas draws what the layout plan puts at each cell: the model must write plans")
        if self.config.plan_canvas:
            raise ValueError("this model already has the plan canvas")
        self.config.plan_canvas = True
        self.plan_canvas = PlanCanvas(self.config.hidden_size).to(self.grid_pos.device, self.grid_pos.dtype)

    def canvas_vectors(self, canvas_ids: torch.Tensor) -> torch.Tensor:
        """``n × cells × slots × 4`` plan-canvas indices (``evotok.mllm.plan_canvas.canvas_ids``) ->
        ``n × cells × hidden``: what is added to the input that draws each cell."""
        if self.plan_canvas is None:
            raise ValueError("this model has no plan canvas (config.plan_canvas)")
        return self.plan_canvas(canvas_ids.to(self.grid_pos.device))

    def add_grid_rope(self) -> None:
        """Switch a trained model to row-and-column rotary positions on grid cells
        (``evotok.mllm.grid_rope``); no new weights, text positions unchanged."""
        if self.config.grid_rope:
            raise ValueError("this model already uses grid rotary positions")
        install_grid_rope(self.lm)
        self.config.grid_rope = True

    def cell_index(self, image_mask: torch.Tensor | None = None, gen_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """``B L`` index of each image or generated grid cell within its grid, -1 on text."""
        if image_mask is None or gen_mask is None:
            cells = image_mask if gen_mask is None else gen_mask
        else:
            cells = image_mask | gen_mask
        return None if cells is None else cell_index_of(cells, self.config.num_cells)

    def lm_position_ids(self, positions: torch.Tensor, cell_index: torch.Tensor | None) -> torch.Tensor:
        """What the LM is given as ``position_ids``: the sequence positions, or with
        ``config.grid_rope`` their three streams (sequence, row, column)."""
        if not self.config.grid_rope:
            return positions
        return grid_position_ids(positions, cell_index, self.config.grid_size, self.config.grid_rope_stride)

    def _build_grid_axes(self) -> None:
        g, hidden = self.config.grid_size, self.config.hidden_size
        like = dict(device=self.grid_pos.device, dtype=self.grid_pos.dtype)
        self.grid_rows = nn.Parameter(torch.zeros(g, 1, hidden, **like))
        self.grid_cols = nn.Parameter(torch.zeros(1, g, hidden, **like))

    def cell_positions(self) -> torch.Tensor:
        """``N hidden``: what is added to the LM input of each grid cell, in raster order."""
        if self.grid_rows is None:
            return self.grid_pos
        return self.grid_pos + (self.grid_rows + self.grid_cols).flatten(0, 1)

    def code_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Prefix sum of the pixel-depth codes: ``... pixel_depth`` -> ``... code_dim``."""
        with torch.no_grad():
            return self.tokenizer.quantizer.codes_to_latent(codes, depth=self.config.pixel_depth)

    def embed_inputs(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None, gen_mask: torch.Tensor | None = None,
                     gen_codes: torch.Tensor | None = None, anchor_cells: torch.Tensor | None = None,
                     canvas_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with projected image features spliced in at ``<image>`` positions and
        projected code latents at generated grid cells (both in raster order, one per cell).
        ``anchor_cells`` (``B L``, -1 elsewhere) adds a cell's position vector to the plan tokens
        that close an entry (``config.plan_anchors``, ``evotok.mllm.layout_plan``). ``canvas_ids``
        (one row per drawing, see :meth:`canvas_vectors`) adds each cell's canvas vector to the
        input that draws it (``config.plan_canvas``)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if anchor_cells is not None and bool((anchor_cells >= 0).any()):
            anchored = anchor_cells >= 0
            embeds = embeds.clone()
            embeds[anchored] = embeds[anchored] + self.cell_positions()[anchor_cells[anchored]].to(embeds.dtype)
        n = self.config.num_cells
        if image_mask is not None and bool(image_mask.any()):
            if image_features is None:
                raise ValueError("the sequence has <image> placeholders but no image features were given")
            if image_features.ndim != 3 or image_features.shape[1:] != (n, self.config.semantic_dim):
                raise ValueError(f"image features must be b×{n}×{self.config.semantic_dim} (one per grid cell), "
                                 f"got {tuple(image_features.shape)}; the <image> placeholders cannot be filled")
            values = (self.project_image(image_features.to(embeds.dtype)) + self.cell_positions()).flatten(0, 1).to(embeds.dtype)
            embeds = _splice(embeds, image_mask, values, "<image> placeholders", n)
        if gen_mask is not None and bool(gen_mask.any()):
            if gen_codes is None:
                raise ValueError("the sequence has generated grid cells but no codes were given")
            latents = self.code_latents(gen_codes[..., : self.config.pixel_depth]).flatten(1, 2)
            values = (self.latent_in(latents.to(embeds.dtype)) + self.cell_positions()).flatten(0, 1).to(embeds.dtype)
            embeds = _splice(embeds, gen_mask, values, "generated grid cells", n)
            if canvas_ids is not None and self.plan_canvas is not None:
                embeds = _splice_add(embeds, _drawing_sources(gen_mask), self.canvas_vectors(canvas_ids).flatten(0, 1))
        return embeds

    def backbone(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                 cell_index: torch.Tensor | None = None):
        """The LM body (no head): ``(last_hidden_state, cache)``.

        ``position_ids`` (``B L``, default 0, 1, …) are sequence positions; ``cell_index``
        (:meth:`cell_index`) marks grid cells for ``config.grid_rope``."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        if self.config.grid_rope:
            if position_ids is None:
                if cache is not None:
                    raise ValueError("with grid rotary positions, give position_ids when continuing from a cache")
                position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
            if attention_mask is None:  # transformers reads 2-D position ids for packing without a mask
                attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            position_ids = self.lm_position_ids(position_ids, cell_index)
        out = self.lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=use_cache, **kwargs)
        return out.last_hidden_state, (getattr(out, self._cache_arg, None) if use_cache else None)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                image_mask: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                image_codes: torch.Tensor | None = None, gen_mask: torch.Tensor | None = None,
                gen_codes: torch.Tensor | None = None, depth_loss_weight: float = 1.0,
                answer_exclusions: torch.Tensor | None = None, cell_targets: torch.Tensor | None = None,
                cell_attribute_weight: float = 0.0, anchor_cells: torch.Tensor | None = None,
                cell_weights: torch.Tensor | None = None, input_code_noise: float = 0.0,
                canvas_ids: torch.Tensor | None = None, read_back_rate: float = 0.0) -> MLLMOutput:
        """Joint loss of a mixed batch (see :func:`evotok.mllm.data.collate`): LM cross-entropy on
        answer tokens plus the depth transformer's cross-entropy over the codes of every cell.

        ``answer_exclusions`` (``K × 3``: row, position, token id) leaves each token out of the
        softmax that predicts that position (``evotok.mllm.answer_gaps``). ``cell_targets``
        (``n_drawings × 2 × cells``) and a positive ``cell_attribute_weight`` add the cell-attribute
        loss of the drawing hidden states (``evotok.mllm.cell_attributes``; needs the head).
        ``anchor_cells``: see :meth:`embed_inputs`. ``cell_weights`` (``n_drawings × cells``) makes
        the code loss in ``loss`` a weighted mean over cells (``evotok.mllm.onset_weights``);
        ``depth_loss`` and its stages stay the plain mean, comparable across runs.
        ``input_code_noise``: the share of drawn cells whose input codes are swapped for another
        cell's, the targets staying true (``evotok.mllm.input_noise``; training only).
        ``canvas_ids``: see :meth:`embed_inputs`. ``read_back_rate``: the share of the images to
        understand that are first decoded at the pixel depth and encoded again, as the model's own
        drawings are read (``evotok.mllm.read_back``; training only)."""
        if image_features is None and image_codes is not None and image_codes.numel():
            if read_back_rate > 0:
                image_codes = read_back_some(self, image_codes, read_back_rate)
            image_features = self.image_features(image_codes)
        input_codes = gen_codes
        if input_code_noise > 0 and gen_codes is not None:
            input_codes = swap_cells(gen_codes, input_code_noise)
        embeds = self.embed_inputs(input_ids, image_mask, image_features, gen_mask, input_codes, anchor_cells,
                                   canvas_ids)
        hidden, _ = self.backbone(embeds, attention_mask, cell_index=self.cell_index(image_mask, gen_mask))

        targets = labels[:, 1:]
        supervised = targets != IGNORE
        lm_tokens = int(supervised.sum())
        if lm_tokens:
            logits = self.text_logits(hidden[:, :-1][supervised]).float()
            if answer_exclusions is not None and len(answer_exclusions):
                logits = _exclude(logits, supervised, answer_exclusions)
            lm_loss = F.cross_entropy(logits, targets[supervised])
        else:
            lm_loss = hidden.sum() * 0.0

        depth = self.config.pixel_depth
        cell_loss = None
        if gen_mask is not None and bool(gen_mask.any()):
            states = self.drawing_states(hidden, gen_mask)
            logits, codes = self.code_logits(states, gen_codes)
            per_cell = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1),
                                       reduction="none").view(-1, depth)
            per_stage = per_cell.mean(0)
            depth_loss = code_objective = per_stage.mean()
            if cell_weights is not None:
                weights = cell_weights.reshape(-1).to(per_cell.dtype)
                code_objective = (per_cell.mean(1) * weights).sum() / weights.sum()
            positions = codes.shape[0]
            if cell_attribute_weight > 0 and cell_targets is not None:
                if self.cell_attributes is None:
                    raise ValueError("cell_attribute_weight > 0 needs the cell-attribute head "
                                     "(EvoTokMLLM.add_cell_attribute_head or model.cell_attribute_head)")
                cell_loss = self.cell_attributes.loss(states, cell_targets.transpose(1, 2).reshape(-1, 2))
        else:
            per_stage = hidden.new_zeros(depth)
            depth_loss = code_objective = hidden.sum() * 0.0
            positions = 0
        loss = lm_loss + depth_loss_weight * code_objective
        if cell_loss is not None:
            loss = loss + cell_attribute_weight * cell_loss
        return MLLMOutput(loss, lm_loss, depth_loss, per_stage.detach(), lm_tokens, positions,
                          None if cell_loss is None else cell_loss.detach())

    def drawing_states(self, hidden: torch.Tensor, gen_mask: torch.Tensor) -> torch.Tensor:
        """The hidden state that draws each generated cell (the one *before* it): ``N × hidden``,
        cells in batch then raster order."""
        return hidden[_drawing_sources(gen_mask)]

    def code_logits(self, states: torch.Tensor, gen_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced depth-transformer logits of every generated cell from its drawing state
        (:meth:`drawing_states`): (``N L K``, the target codes ``N L``)."""
        depth, n = self.config.pixel_depth, self.config.num_cells
        codes = gen_codes[..., :depth].reshape(-1, depth).long()
        cells = torch.arange(n, device=states.device).repeat(codes.shape[0] // n)
        return self.depth(states, cells, codes), codes

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``b 3 H W`` in [-1, 1] -> full-depth codes ``b h w D``."""
        return self.tokenizer.encode(images.to(self.device))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Render generated codes (``b h w ≤pixel_depth``) with the tokenizer's pixel decoder."""
        depth = codes.shape[-1] if depth is None else depth
        return self.tokenizer.decode(codes.to(self.device), depth=depth)

    @torch.no_grad()
    def decode_stages(self, codes: torch.Tensor) -> torch.Tensor:
        """Renders after 1, 2, …, L stages of generated codes (the stage-by-stage view): ``L b 3 H W``."""
        return self.tokenizer.decode_all_depths(codes.to(self.device), list(range(1, codes.shape[-1] + 1)))

    def generate_image(self, prompt: str | Sequence[str], guidance_scale: float | None = 3.0,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None, callback: Callable[[int, torch.Tensor], None] | None = None,
                       use_cache: bool = True, cpu_threads: int | None = None,
                       attribute_guidance: float | None = None, plan_trace: list | None = None,
                       region_guidance: float | None = None, place_guidance: float | None = None,
                       branch_trace: list | None = None, depth_cache: bool = True) -> torch.Tensor:
        """Text to image codes ``b h w pixel_depth`` (decode with :meth:`decode_codes`).

        ``guidance_scale=None`` runs the conditional branch alone; any number runs the
        unconditional (empty-prompt) branch beside it and mixes logits at every depth;
        1.0 gives the same image as ``None``. ``attribute_guidance`` adds the prompt's shapes-alone
        and colours-alone branches (:func:`evotok.mllm.generate.generate_image_codes`).
        ``seed`` fixes the image exactly. A model with ``config.layout_plan`` writes a layout plan
        first (``evotok.mllm.layout_plan``); ``plan_trace`` (a list) receives the plans' texts, and
        ``place_guidance`` or ``region_guidance`` lean on where the plan puts each object
        (``evotok.mllm.plan_guidance``); ``branch_trace`` (a list) receives each guidance branch's
        log-probability of every drawn code, and ``depth_cache=False`` turns the depth transformer's
        cache off (:func:`evotok.mllm.generate.generate_image_codes`).
        ``callback(rows_done, codes)`` is called after each finished grid row (unfinished rows are 0).
        ``cpu_threads``: intra-op threads while decoding on CPU (default: 1 for a small LM; see
        :func:`evotok.mllm.generate.thread_scope`).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return generate_image_codes(self, prompts, guidance_scale=guidance_scale, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed, callback=callback, use_cache=use_cache,
                                    cpu_threads=cpu_threads, attribute_guidance=attribute_guidance,
                                    plan_trace=plan_trace, region_guidance=region_guidance,
                                    place_guidance=place_guidance, branch_trace=branch_trace,
                                    depth_cache=depth_cache)

    def answer(self, image: torch.Tensor | None, question: str, history: Sequence[tuple[str, str]] = (),
               max_new_tokens: int | None = None, stream: bool = True, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               use_cache: bool = True, cpu_threads: int | None = None) -> Iterator[str] | str:
        """Answer ``question`` about ``image`` (``3 H W`` or ``1 3 H W`` in [-1, 1], or None for text only).

        ``history``: earlier (question, answer) turns about the same image. With ``stream`` the
        answer comes as an iterator of text pieces, otherwise as one string. Greedy by default.
        """
        pieces = stream_answer(self, image, question, history,
                               max_new_tokens or self.config.max_answer_tokens, temperature, top_k, top_p, seed,
                               use_cache, cpu_threads)
        if stream:
            return pieces
        return "".join(pieces)

    def answer_batch(self, images: torch.Tensor | None, questions: Sequence[str], max_new_tokens: int | None = None,
                     image_codes: torch.Tensor | None = None, cpu_threads: int | None = None) -> list[str]:
        """Greedy single-turn answers for a batch (benchmarks and evaluation); ``image_codes``
        (``b h w D``) may replace ``images`` to skip encoding."""
        return batch_answers(self, images, questions, max_new_tokens or self.config.max_answer_tokens, image_codes,
                             cpu_threads)

    def known_words(self) -> list[str]:
        """Words the model met in training (the app warns about others)."""
        return self.text.known_words()

    def unknown_words(self, prompt: str) -> list[str]:
        return self.text.unknown_words(prompt)


def _centred_sincos(positions: int, dim: int) -> torch.Tensor:
    """``positions × dim`` sines and cosines of the position at ``dim // 2`` frequencies (periods
    from 2 positions up), centred over positions and scaled to unit norm per position."""
    freqs = torch.pi / torch.logspace(0, 2, dim // 2, base=positions)  # periods 2 .. 2·positions²
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * freqs
    waves = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # sin, cos, sin, cos, ...
    table = torch.zeros(positions, dim)
    table[:, : waves.shape[1]] = waves
    table = table - table.mean(dim=0)
    return table / table.norm(dim=1, keepdim=True).mean()


def _splice(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, what: str, per_image: int) -> torch.Tensor:
    count = int(mask.sum())
    if count != values.shape[0]:
        raise ValueError(f"{count} {what} in the batch but {values.shape[0]} embeddings to put there "
                         f"({per_image} per image expected)")
    return embeds.masked_scatter(mask.unsqueeze(-1), values)


def _splice_add(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``embeds`` with ``values`` (one row per ``True`` of ``mask``, in order) added where ``mask`` is set."""
    if int(mask.sum()) != values.shape[0]:
        raise ValueError(f"{int(mask.sum())} drawn cells in the batch but {values.shape[0]} plan-canvas vectors "
                         "(one canvas per drawing, one vector per cell expected)")
    embeds = embeds.clone()
    embeds[mask] = embeds[mask] + values.to(embeds.dtype)
    return embeds


def _drawing_sources(gen_mask: torch.Tensor) -> torch.Tensor:
    """``B L``: the positions whose hidden state draws a generated cell (each cell's predecessor)."""
    source = torch.zeros_like(gen_mask)
    source[:, :-1] = gen_mask[:, 1:]
    return source


def _semantic_dim(tokenizer: nn.Module) -> int:
    return int(getattr(tokenizer.config, "teacher_dim"))


def _find_tokenizer(ref: str, folder: Path) -> str:
    """A recorded tokenizer path, looked up beside the model folder and each folder above it,
    then as given (relative to the working directory, or a hub id)."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path)
    for base in (folder, *folder.resolve().parents):
        if (base / path).is_dir():
            return str(base / path)
    return ref


def _exclude(logits: torch.Tensor, supervised: torch.Tensor, exclusions: torch.Tensor) -> torch.Tensor:
    """Set ``logits`` (one row per supervised target, in order) to -inf at the excluded tokens."""
    rows, positions, tokens = exclusions.to(logits.device).unbind(1)
    targets = positions - 1  # the hidden state before a token predicts it
    if bool((targets < 0).any()) or not bool(supervised[rows, targets].all()):
        raise ValueError("answer_exclusions must point at supervised answer tokens")
    order = supervised.flatten().cumsum(0).sub(1).view_as(supervised)
    return logits.index_put((order[rows, targets], tokens), logits.new_tensor(float("-inf")).expand(len(tokens)))
