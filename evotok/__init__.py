"""EvoTok: one residual token sequence per image, pixels in its first stages, semantics in its last."""
from .config import EvoTokConfig, reference_config, small_config
from .model import EvoTok, EvoTokOutput

__all__ = ["EvoTok", "EvoTokConfig", "EvoTokOutput", "reference_config", "small_config"]
__version__ = "0.1.0"
