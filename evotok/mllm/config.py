"""The multimodal model's configuration: its typed fields *are* the saved ``config.json``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEPTH_HEADS = ("free", "codebook")  # the depth transformer's output heads (see MLLMConfig.depth_head)


@dataclass
class MLLMConfig:
    """Every architectural choice of an :class:`~evotok.mllm.model.EvoTokMLLM`.

    Image tokenizer (frozen, not saved with the model):
        image_tokenizer: folder or hub id of the EvoTok checkpoint the model reads and writes.
            A relative path is looked up beside the saved model folder first, then from the
            working directory. ``image_tokenizer_sha256`` is a digest of its weights, checked on
            load so that a model never silently runs on a tokenizer it was not trained with.
        grid_size, pixel_depth, semantic_depth, codebook_size, code_dim, semantic_dim: copied
            from the tokenizer when the model is first built (shapes of what crosses over).
    Language model:
        lm_name_or_path: a transformers causal LM by hub id or folder (full scale, e.g.
            ``Qwen/Qwen2.5-7B-Instruct``); its weights are only read when the model is first built.
        lm_config: the LM's transformers config as a dict (``model_type`` included); filled in on
            first build, and what rebuilds the LM when a saved model is loaded.
        base_vocab_size: the LM's vocabulary before EvoTok's special tokens were added; stage 1
            of training updates only the embedding rows from here on (``None``: a from-scratch LM).
    Adapters:
        projector_hidden: width of the MLP that maps semantic features into the LM
            (``None``: the LM's hidden size).
        projector_context_layers: 3×3 convolutions over the grid of features added to the MLP's
            output (``evotok.mllm.grid_context``), so each cell's token sees its neighbours
            (0: the per-cell MLP alone).
        grid_axis_embeddings: add a row and a column embedding to every image token and
            generated cell, on top of the per-cell ``grid_pos`` (16 vectors shared by 64 cells on
            the 8×8 grid, each learning from a whole row or column). Added for left/right and
            above/below questions; in the bundled model they did not help those (its card says
            how this was tested).
        grid_rope: rotate grid cells' queries and keys by their row and column as well as their
            sequence index (``evotok.mllm.grid_rope``: a third of the rotary frequencies each);
            text keeps the LM's own rotary positions exactly. Added so that the model could read an
            object's column; in the bundled model it did not (its card says how this was tested).
        grid_rope_stride: how far apart neighbouring rows (columns) sit in the row (column)
            position stream (1: unit steps as in Qwen2-VL).
        depth_layers, depth_width, depth_heads: the depth transformer that samples the
            ``pixel_depth`` codes of one grid position stage after stage.
        depth_head: its output head. "free": a learned output vector per code. "codebook": codes
            scored by their vectors in the tokenizer (``evotok.mllm.codebook_head``), so that codes
            lying close score alike; meant for drawing colour-shape pairs never seen together. Put
            on the bundled model for one CPU stage, it did not help (its card says how this was tested).
        depth_head_width: width of the codebook head's query and code vectors.
        cell_attribute_head: two linear read-outs of each drawing hidden state, the colour and the
            shape of the cell it draws (``evotok.mllm.cell_attributes``); an auxiliary training
            target (``train.cell_attribute_weight``), never read when sampling. Trained on the
            bundled model for one CPU stage, it did not help (its card says how this was tested).
        layout_plan: text to image first writes a layout plan, each object's size, colour, shape
            and centre cell, then draws (``evotok.mllm.layout_plan``); ``max_plan_tokens`` caps it.
        plan_anchors: the token that closes each plan entry also gets the position vector of the
            entry's cell (``evotok.mllm.layout_plan``); needs ``layout_plan``.
        plan_canvas: each drawn cell's input also gets learned vectors of the colour, shape and
            size of the plan entries that cover it and of its offset from their centre cells
            (``evotok.mllm.plan_canvas``); needs ``layout_plan``.
    Prompts:
        max_prompt_tokens: longest prompt or question accepted, in text tokens.
        max_answer_tokens: longest answer ``answer`` produces unless asked otherwise.
    """

    image_tokenizer: str = "assets/tokenizer"
    image_tokenizer_sha256: str | None = None
    grid_size: int = 8
    pixel_depth: int = 4
    semantic_depth: int = 8
    codebook_size: int = 1024
    code_dim: int = 32
    semantic_dim: int = 192

    lm_name_or_path: str | None = None
    lm_config: dict[str, Any] | None = None
    base_vocab_size: int | None = None

    projector_hidden: int | None = None
    projector_context_layers: int = 0
    grid_axis_embeddings: bool = False
    grid_rope: bool = False
    grid_rope_stride: int = 1
    depth_layers: int = 2
    depth_width: int = 256
    depth_heads: int = 4
    depth_head: str = "free"
    depth_head_width: int = 128
    cell_attribute_head: bool = False
    layout_plan: bool = False
    max_plan_tokens: int = 32
    plan_anchors: bool = False
    plan_canvas: bool = False

    max_prompt_tokens: int = 64
    max_answer_tokens: int = 32

    def __post_init__(self) -> None:
        for name in ("grid_size", "pixel_depth", "semantic_depth", "codebook_size", "code_dim", "semantic_dim",
                     "depth_layers", "depth_width", "depth_heads", "max_prompt_tokens", "max_answer_tokens",
                     "grid_rope_stride", "depth_head_width", "max_plan_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if int(self.projector_context_layers) < 0:
            raise ValueError(f"projector_context_layers must be >= 0, got {self.projector_context_layers!r}")
        if self.plan_anchors and not self.layout_plan:
            raise ValueError("plan_anchors marks the cells of layout plan entries: set layout_plan too")
        if self.plan_canvas and not self.layout_plan:
            raise ValueError("plan_canvas draws what the layout plan puts at each cell: set layout_plan too")
        if self.depth_head not in DEPTH_HEADS:
            raise ValueError(f"depth_head must be one of {DEPTH_HEADS}, got {self.depth_head!r}")
        if self.depth_width % self.depth_heads:
            raise ValueError(f"depth_width {self.depth_width} is not divisible by depth_heads {self.depth_heads}")
        if self.lm_config is None and not self.lm_name_or_path:
            raise ValueError("give lm_config (a transformers config dict) or lm_name_or_path (hub id or folder)")
        if self.lm_config is not None and "model_type" not in self.lm_config:
            raise ValueError("lm_config needs a 'model_type' entry (e.g. 'qwen2')")

    @property
    def num_cells(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def hidden_size(self) -> int:
        if self.lm_config is None:
            raise ValueError("the LM config is not known yet; build the model first")
        return int(self.lm_config["hidden_size"])


def qwen2_lm_config(vocab_size: int, hidden_size: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                    intermediate_size: int = 768, max_positions: int = 1024, **overrides: Any) -> dict[str, Any]:
    """A small Qwen2-architecture LM trained from scratch (the bundled default's sizes by default)."""
    config = {
        "model_type": "qwen2", "vocab_size": int(vocab_size), "hidden_size": hidden_size,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate_size, "max_position_embeddings": max_positions,
        "tie_word_embeddings": True, "attention_dropout": 0.0, "rms_norm_eps": 1e-6, "use_cache": True,
    }
    config.update(overrides)
    return config

