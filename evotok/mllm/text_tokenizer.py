"""The multimodal model's text side: a BPE trained on our own corpus, or a hub LM's tokenizer,
plus the special tokens the chat template and the image grid need, plus the list of words the
model has seen (so the app can warn about words it has never read)."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<pad>",
    "eos": "<eos>",
    "image": "<image>",      # one per grid cell: replaced by projected semantic features
    "boi": "<boi>",          # begin of a generated image grid
    "eoi": "<eoi>",          # end of it
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",        # closes every turn; the answer's stop token
}
WORDS_FILE = "corpus_words.json"
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
_SPECIAL_TEXT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS.values()))


def words_of(text: str) -> list[str]:
    """Lower-case words of ``text`` ("T-shirt, please!" -> ["t-shirt", "please"])."""
    return _WORD.findall(text.lower())


class TextTokenizer:
    """A transformers tokenizer with EvoTok's special tokens and the training corpus' word list.

    ``encode`` never lets user text produce a special token (typing ``<image>`` gives plain text).
    """

    def __init__(self, backend, corpus_words: dict[str, int] | None = None):
        self.backend = backend
        missing = [t for t in SPECIAL_TOKENS.values() if t not in backend.get_vocab()]
        if missing:
            raise ValueError(f"text tokenizer lacks the special tokens {missing}; build it with "
                             "TextTokenizer.train or TextTokenizer.from_lm")
        self.ids = {name: int(backend.convert_tokens_to_ids(tok)) for name, tok in SPECIAL_TOKENS.items()}
        self.corpus_words = dict(corpus_words or {})
        self.pretrained_size: int | None = None  # from_lm: the LM's own vocabulary, before our tokens

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 3000, min_frequency: int = 2) -> "TextTokenizer":
        """Train a byte-level BPE (lower-casing, NFKC) on ``texts``; any input stays encodable."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        texts = list(texts)
        if not texts:
            raise ValueError("cannot train a text tokenizer on an empty corpus")
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=list(SPECIAL_TOKENS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        backend = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL_TOKENS["pad"],
                                          eos_token=SPECIAL_TOKENS["eos"])
        return cls(backend, count_words(texts))

    @classmethod
    def from_lm(cls, name_or_path: str | os.PathLike, corpus_words: dict[str, int] | None = None) -> "TextTokenizer":
        """A pretrained LM's own tokenizer (hub id or folder) with EvoTok's special tokens added."""
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(name_or_path))
        size = len(backend)
        new = [t for t in SPECIAL_TOKENS.values() if t not in backend.get_vocab()]
        if new:
            backend.add_tokens(new, special_tokens=True)
        tok = cls(backend, corpus_words)
        tok.pretrained_size = size
        return tok

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save_pretrained(str(folder))
        (folder / WORDS_FILE).write_text(json.dumps(dict(sorted(self.corpus_words.items())), indent=0))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TextTokenizer":
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder} holds no text tokenizer (tokenizer.json / tokenizer_config.json)")
        backend = AutoTokenizer.from_pretrained(str(folder))
        words_file = folder / WORDS_FILE
        words = json.loads(words_file.read_text()) if words_file.is_file() else {}
        return cls(backend, words)

    def learn_words(self, texts: Iterable[str]) -> None:
        """Count the words of ``texts`` into the corpus word list, for a later training stage that
        asks in new words (the app then no longer warns about them); the BPE itself is unchanged."""
        for word, count in count_words(texts).items():
            self.corpus_words[word] = self.corpus_words.get(word, 0) + count

    # ------------------------------------------------------------------ use
    def __len__(self) -> int:
        return len(self.backend)

    def encode(self, text: str) -> list[int]:
        """Token ids of user or corpus text; special-token strings in it are dropped."""
        return list(self.backend.encode(_SPECIAL_TEXT.sub(" ", text), add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def known_words(self) -> list[str]:
        """Every word seen in the training corpus, sorted."""
        return sorted(self.corpus_words)

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` never seen in training, in order of appearance, without repeats.

        Empty when the corpus word list is unknown (e.g. a hub LM's tokenizer with no corpus).
        """
        if not self.corpus_words:
            return []
        seen: dict[str, None] = {}
        for word in words_of(text):
            if word not in self.corpus_words:
                seen.setdefault(word, None)
        return list(seen)


def count_words(texts: Iterable[str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(words_of(text))
    return dict(counts)
