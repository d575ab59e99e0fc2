"""Optional compiled kernels. Everything here imports cleanly without Triton installed."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` can be imported (it is only useful with a CUDA device, or with
    ``TRITON_INTERPRET=1`` for testing on CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must not break the library
        return False
    return True


__all__ = ["triton_available"]
