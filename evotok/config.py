"""The tokenizer's configuration: its typed fields *are* the saved ``config.json``."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class EvoTokConfig:
    """Every architectural choice of an EvoTok tokenizer.

    Encoder:
        encoder: ``"conv"`` (a diffusers convolutional encoder trained from scratch) or ``"hf"``
            (any transformers vision model; its penultimate patch features go through
            Linear–Tanh–Linear down to ``code_dim``).
        encoder_name_or_path: hub id or folder of the transformers vision model (``encoder="hf"``).
            Only read when the model is first built for training; afterwards the architecture
            comes from ``encoder_hf_config`` and the weights from the EvoTok checkpoint.
        encoder_hf_config: the transformers config of that vision model, filled in on first build.
        channels / layers_per_block / norm_num_groups: the conv encoder's and pixel decoder's
            widths per resolution level; ``len(channels) - 1`` halvings set the token grid.
    Quantizer:
        num_stages (D), codebook_size (K), code_dim (d); EMA ``decay``, Laplace ``eps``,
        ``dead_threshold`` (an EMA count below it restarts the code), ``restart_every`` steps.
    Read-out depths:
        pixel_depth (Lpix): the pixel decoder renders the prefix after this many stages.
        semantic_depth (Lsem): the semantic decoder reads the prefix after this many stages.
    Semantic decoder: ``semantic_layers`` transformer layers of width ``semantic_width``, then
        Linear–Tanh–Linear to ``teacher_dim`` (the teacher's patch feature width).
    """

    image_size: int = 256
    encoder: str = "conv"
    encoder_name_or_path: str | None = None
    encoder_hf_config: dict | None = None
    channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True

    num_stages: int = 16
    codebook_size: int = 32768
    code_dim: int = 32
    decay: float = 0.99
    eps: float = 1e-5
    dead_threshold: float = 1.0
    restart_every: int = 1

    pixel_depth: int = 4
    semantic_depth: int = 16

    semantic_layers: int = 3
    semantic_width: int = 512
    semantic_heads: int = 8
    teacher_dim: int = 1024
    teacher: str | None = None
    teacher_sha256: str | None = None   # weights_digest of the teacher it was trained against (set by training)
    teacher_features_sha256: str | None = None  # its feature_digest: the weights its patch features depend on;
                                                # a teacher whose readout was refitted on them still matches

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if self.encoder not in ("conv", "hf"):
            raise ValueError(f"encoder must be 'conv' or 'hf', got {self.encoder!r}")
        if self.encoder == "hf" and not (self.encoder_name_or_path or self.encoder_hf_config):
            raise ValueError("encoder='hf' needs encoder_name_or_path (a hub id or folder)")
        for name in ("pixel_depth", "semantic_depth"):
            depth = getattr(self, name)
            if not 1 <= depth <= self.num_stages:
                raise ValueError(f"{name}={depth} must lie in 1..num_stages={self.num_stages}")
        if self.encoder == "conv" and self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by {self.downsample_factor}")
        if self.semantic_width % self.semantic_heads:
            raise ValueError("semantic_width must be divisible by semantic_heads")

    @property
    def downsample_factor(self) -> int:
        if self.encoder == "hf" and self.encoder_hf_config:
            return int(_vision_config(self.encoder_hf_config)["patch_size"])
        return 2 ** (len(self.channels) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor


def _vision_config(hf_config: dict) -> dict:
    return hf_config.get("vision_config", hf_config)


def reference_config(encoder_name_or_path: str = "google/siglip2-large-patch16-256", **overrides) -> EvoTokConfig:
    """DESIGN.md §1: SigLIP2-L/16 encoder and teacher, 256 px, 16×16 grid, 16 × 32,768 × 32 codes."""
    config = EvoTokConfig(
        image_size=256, encoder="hf", encoder_name_or_path=encoder_name_or_path,
        channels=(128, 128, 256, 256, 512), layers_per_block=2,
        num_stages=16, codebook_size=32768, code_dim=32, pixel_depth=4, semantic_depth=16,
        semantic_layers=3, semantic_width=1024, semantic_heads=16, teacher_dim=1024,
        teacher=encoder_name_or_path,
    )
    return replace(config, **overrides)


def small_config(**overrides) -> EvoTokConfig:
    """The bundled default: 64 px, 8×8 grid, 8 × 1,024 × 32 codes; trains on two CPU cores."""
    config = EvoTokConfig(
        image_size=64, encoder="conv", channels=(32, 64, 128, 128), layers_per_block=1,
        norm_num_groups=16, mid_block_attention=False,
        num_stages=8, codebook_size=1024, code_dim=32, pixel_depth=4, semantic_depth=8,
        semantic_layers=2, semantic_width=192, semantic_heads=4, teacher_dim=128,
        teacher="assets/teacher",
    )
    return replace(config, **overrides)


PRESETS = {"reference": reference_config, "small": small_config}
