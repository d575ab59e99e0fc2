"""EvoTok: one residual token sequence per image, pixels in its first stages, semantics in its last.

    from evotok import EvoTok
    tok = EvoTok.from_pretrained("assets/tokenizer")

Names are imported on first use, so ``import evotok.data`` does not pay for diffusers.
"""
from importlib import import_module

_EXPORTS = {
    "EvoTok": "evotok.model", "EvoTokOutput": "evotok.model",
    "EvoTokConfig": "evotok.config", "reference_config": "evotok.config", "small_config": "evotok.config",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evotok' has no attribute {name!r}")
