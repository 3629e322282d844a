"""A text tokenizer that works offline: byte-level BPE trained on a project's own captions with the
Hugging Face ``tokenizers`` library (extra ``gvit[vl]``), saved as one JSON file beside the model.

Token ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, ``[EOS]`` 3, then the learned vocabulary. Encoded
captions are ``[BOS] tokens [EOS]`` padded with ``[PAD]`` to ``length`` (cut to fit, keeping ``[EOS]``),
with an attention mask; a CLIP text tower built for it pools at ``[EOS]`` (``eos_token_id = 3``).
Text is lower-cased.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..files import atomic_path

__all__ = ["TextTokenizer", "SPECIAL_TOKENS", "PAD_ID", "BOS_ID", "EOS_ID"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def _tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the text tokenizer needs Hugging Face tokenizers: pip install 'gvit[vl]'") from None
    return tokenizers


class TextTokenizer:
    """Wraps a ``tokenizers.Tokenizer``; build one with :meth:`train` or :meth:`load`."""

    def __init__(self, tokenizer):
        for i, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != i:
                raise ValueError(f"text tokenizer: {token} must have id {i}")
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 1000) -> "TextTokenizer":
        """Byte-level BPE of at most ``vocab_size`` tokens (specials included) learned from ``texts``."""
        if not texts:
            raise ValueError("text tokenizer: no texts to learn from")
        tk = _tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE(unk_token="[UNK]"))
        tokenizer.normalizer = tk.normalizers.Lowercase()
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        try:
            tokenizer = _tokenizers().Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type on bad files
            raise ValueError(
                f"{path}: not a text tokenizer file ({str(exc).splitlines()[0] if str(exc) else exc})"
            ) from None
        return cls(tokenizer)

    @classmethod
    def from_str(cls, text: str) -> "TextTokenizer":
        """From the JSON text of :meth:`to_str` (how checkpoints keep it)."""
        try:
            tokenizer = _tokenizers().Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises its own Exception type on bad JSON
            raise ValueError(f"not a text tokenizer ({str(exc).splitlines()[0] if str(exc) else exc})") from None
        return cls(tokenizer)

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(Path(path)) as tmp:
            self.tokenizer.save(str(tmp))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: list[str], length: int) -> tuple[Tensor, Tensor]:
        """``len(texts)`` captions -> ids ``[N, length]`` int64 and attention mask ``[N, length]``."""
        if length < 3:
            raise ValueError(f"text length must be >= 3 ([BOS], a token, [EOS]), got {length}")
        ids = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(texts))):
            tokens = [BOS_ID, *encoding.ids[: length - 2], EOS_ID]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, (ids != PAD_ID).long()

    def decode(self, ids: Tensor) -> list[str]:
        return [self.tokenizer.decode([i for i in row.tolist() if i >= len(SPECIAL_TOKENS)]).strip() for row in ids]
