"""Train a byte-level BPE tokenizer (HF `tokenizers`) on a text corpus; writes a tokenizer.json for data.tokenizer.

    python -m tools.train_tokenizer --out runs/tok/tokenizer.json [--paths python_install] [--vocab-size 32768]
                                    [--max-bytes 100000000]

`--paths` takes what `data.paths` takes (files, globs, directories, "stdlib", "python_install"). When the corpus
is larger than `--max-bytes`, an evenly spaced subset of its files (every k-th in sorted order) is used, so
every part of the installation is represented. The model: GPT-2-style byte-level BPE (no unknown token; every
byte is in the initial alphabet), special tokens `<|endoftext|>` (id 0, the EOS / document separator) and
`<pad>` (id 1); `vocab_size` counts them. Deterministic: the same files and arguments give a byte-identical
tokenizer.json (the trainer breaks count ties by pair order; files are read in sorted order). The file is
written atomically; a summary (files, bytes, vocabulary, bytes per token on the sample) is printed.
"""
from __future__ import annotations

import argparse
import os
import sys

from axlearn_like.cli import tool_main

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")


def sample_files(files: list[str], max_bytes: int) -> list[str]:
    """Every k-th file (sorted order) with k chosen so the subset holds about `max_bytes`; all if they fit."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    if total <= max_bytes:
        return list(files)
    stride = -(-total // max_bytes)  # ceil
    return [f for i, f in enumerate(files) if i % stride == 0]


def _docs(files: list[str], max_bytes: int):
    total = 0
    for f in files:
        if total >= max_bytes:
            return
        with open(f, "rb") as fh:
            raw = fh.read(max_bytes - total)
        total += len(raw)
        yield raw.decode("utf-8", errors="replace")


def train(paths, out: str, *, vocab_size: int = 32768, max_bytes: int = 100_000_000, min_frequency: int = 2,
          stream=None) -> dict:
    """Trains and saves the tokenizer at `out`; returns a summary dict."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from axlearn_like.data.sources import resolve_paths

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab-size {vocab_size}: byte-level BPE needs >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if max_bytes < 1:
        raise ValueError(f"--max-bytes must be >= 1, got {max_bytes}")
    all_files = resolve_paths(paths)
    files = sample_files(all_files, max_bytes)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = list(_docs(files, max_bytes))
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    tok.save(tmp, pretty=False)
    os.replace(tmp, out)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    probe = docs[:: max(1, len(docs) // 200)]  # bytes/token on ~200 documents of the sample
    ntok = sum(len(e.ids) for e in tok.encode_batch(probe, add_special_tokens=False))
    summary = {"out": out, "files": len(files), "files_in_corpus": len(all_files), "bytes": nbytes,
               "vocab_size": tok.get_vocab_size(with_added_tokens=True),
               "bytes_per_token": sum(len(d.encode("utf-8")) for d in probe) / max(ntok, 1)}
    print(f"wrote {out}: vocab {summary['vocab_size']}, trained on {len(files)} of {len(all_files)} files "
          f"({nbytes / 1e6:.1f} MB), {summary['bytes_per_token']:.2f} bytes/token", file=stream)
    return summary


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_tokenizer", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="tokenizer.json path to write")
    p.add_argument("--paths", default="python_install", help="comma-separated data.paths entries")
    p.add_argument("--vocab-size", type=int, default=32768, help="including the 2 special tokens")
    p.add_argument("--max-bytes", type=int, default=100_000_000, help="training sample size (bytes)")
    p.add_argument("--min-frequency", type=int, default=2)
    a = p.parse_args(argv)
    train([x for x in a.paths.split(",") if x], a.out, vocab_size=a.vocab_size, max_bytes=a.max_bytes,
          min_frequency=a.min_frequency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
