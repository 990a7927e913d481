"""Tokenizers behind one small interface: byte-level (default), HF `tokenizers` JSON, SentencePiece.

Every tokenizer has `vocab_size`, `encode(str) -> list[int]`, `decode(list[int]) -> str`, `eos_id`, `pad_id`.
When a loaded tokenizer defines no EOS/PAD token, they are appended after its vocabulary (ids vocab, vocab+1)
and `vocab_size` grows to cover them, so the model's embedding table always fits every id the pipeline emits.
"""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from axlearn_like.config import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are bytes, 256 = EOS (document separator), 257 = PAD; vocab_size 258."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257
    name = "byte"
    bytes_per_token = 1.0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for corpora: uint8 view of the UTF-8 bytes (no Python list)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class HFTokenizer:
    """A HF `tokenizers` JSON file (special tokens are not added by encode)."""

    def __init__(self, path: str):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust error is multi-line; keep its first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"data.tokenizer: cannot read HF tokenizers JSON {path!r} ({first}); "
                              "give a tokenizer.json saved by tokenizers.Tokenizer.save or 'byte'") from None
        self.name = path
        base = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eos = next((vocab[n] for n in _EOS_NAMES if n in vocab), None)
        pad = next((vocab[n] for n in _PAD_NAMES if n in vocab), None)
        self.eos_id = base if eos is None else eos
        self.pad_id = (base + (eos is None)) if pad is None else pad
        self.vocab_size = max(base, self.eos_id + 1, self.pad_id + 1)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        base = self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.decode([int(i) for i in ids if int(i) < base and int(i) not in (self.eos_id, self.pad_id)])


class SentencePieceTokenizer:
    """A SentencePiece .model file (no BOS/EOS added by encode)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"data.tokenizer: cannot read SentencePiece model {path!r} ({first}); "
                              "give a .model file written by SentencePieceTrainer or 'byte'") from None
        self.name = path
        base = self._sp.get_piece_size()
        eos, pad = self._sp.eos_id(), self._sp.pad_id()
        self.eos_id = base if eos < 0 else eos
        self.pad_id = (base + (eos < 0)) if pad < 0 else pad
        self.vocab_size = max(base, self.eos_id + 1, self.pad_id + 1)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids) -> str:
        base = self._sp.get_piece_size()
        return self._sp.decode([int(i) for i in ids if int(i) < base and int(i) not in (self.eos_id, self.pad_id)])


_CACHE: dict[tuple, Tokenizer] = {}


def make_tokenizer(cfg_or_name) -> Tokenizer:
    """Tokenizer for `cfg.tokenizer` (or a name/path string): "byte", *.json (HF) or *.model (SentencePiece)."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.tokenizer
    if name == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer: {name!r} is neither 'byte' nor an existing tokenizer file "
                          "(a HF tokenizers .json or a SentencePiece .model)")
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    if path.endswith(".json"):
        tok = HFTokenizer(path)
    elif path.endswith(".model"):
        tok = SentencePieceTokenizer(path)
    else:
        try:  # unknown suffix: sniff (SentencePiece models are protobuf, HF tokenizers are JSON)
            with open(path, "rb") as f:
                head = f.read(64).lstrip()
        except OSError as e:
            raise ConfigError(f"data.tokenizer: cannot read {name!r} ({e.strerror})") from None
        tok = HFTokenizer(path) if head.startswith(b"{") else SentencePieceTokenizer(path)
    _CACHE[key] = tok
    return tok
