"""Corpus sources: local text files, ArrayRecord files, tokenized once and cached in memory.

A `Corpus` is every document's tokens followed by EOS, concatenated, plus document boundaries; the
train/eval split is by document (a seeded choice of `eval_fraction` of the documents).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import io
import os
import site
import sysconfig

import numpy as np

from axlearn_like.config import ConfigError

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """tokens: int32[N], every document followed by EOS; doc_starts: int64[D+1] (doc d = tokens[s[d]:s[d+1]]).

    loss_weights: optional float32[N] (None = 1 everywhere): weight of predicting that token.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray
    loss_weights: np.ndarray | None = None

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, docs: np.ndarray) -> "Corpus":
        """The corpus made of documents `docs`, in that order."""
        docs = np.asarray(docs, dtype=np.int64)
        lens = self.doc_starts[docs + 1] - self.doc_starts[docs]
        starts = np.zeros(len(docs) + 1, np.int64)
        np.cumsum(lens, out=starts[1:])
        # Flat gather index: start of each source doc repeated over its length, plus the offset inside it.
        idx = np.repeat(self.doc_starts[docs] - starts[:-1], lens) + np.arange(starts[-1])
        lw = None if self.loss_weights is None else self.loss_weights[idx]
        return Corpus(self.tokens[idx], starts, lw)

    def doc_ids_and_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Per token: int32 document index and int32 position inside that document."""
        lens = np.diff(self.doc_starts)
        doc_id = np.repeat(np.arange(self.num_docs, dtype=np.int32), lens)
        pos = (np.arange(self.num_tokens) - np.repeat(self.doc_starts[:-1], lens)).astype(np.int32)
        return doc_id, pos


def stdlib_files() -> list[str]:
    """The running interpreter's standard-library *.py sources, sorted, without site-packages and test dirs."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out)


# "python_install": the text of the whole Python installation (sources and docs, site-packages included).
PYTHON_INSTALL_SUFFIXES = (".py", ".pyi", ".rst", ".md", ".txt")
PYTHON_INSTALL_MAX_FILE_BYTES = 1_000_000  # larger files are generated tables / data dumps, not prose or code


def installation_roots() -> list[str]:
    """The running interpreter's stdlib and site-packages directories (sysconfig's and `site`'s), sorted."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # some embedded / virtualenv builds have no getsitepackages
        pass
    return sorted(r for r in roots if os.path.isdir(r))


def python_install_files() -> list[str]:
    """The running interpreter's installation as a text corpus: every *.py, *.pyi, *.rst, *.md, *.txt and
    dist-info METADATA (package READMEs) under the stdlib, the site-packages (sysconfig's and `site`'s) and
    their subdirectories, tests included, hidden dirs and __pycache__ skipped, files over 1 MB skipped;
    deduplicated by real path, sorted. Its size depends on what is installed (a CUDA image with torch,
    transformers, jax: hundreds of MB)."""
    seen: dict[str, str] = {}
    for root in installation_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            for f in filenames:
                if not (f.endswith(PYTHON_INSTALL_SUFFIXES) or (f == "METADATA" and dirpath.endswith(".dist-info"))):
                    continue
                full = os.path.join(dirpath, f)
                try:
                    if not os.path.isfile(full) or os.path.getsize(full) > PYTHON_INSTALL_MAX_FILE_BYTES:
                        continue
                except OSError:
                    continue
                seen.setdefault(os.path.realpath(full), full)
    return sorted(seen.values())


def resolve_paths(paths) -> list[str]:
    """Expands "stdlib", "python_install" (`python_install_files`), directories (recursively, hidden names
    skipped) and globs into a sorted file list."""
    files: set[str] = set()
    for p in paths:
        if p == "stdlib":
            found = stdlib_files()
        elif p == "python_install":
            found = python_install_files()
        elif os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
        elif os.path.isfile(p):
            found = [p]
        else:
            found = [f for f in glob.glob(os.path.expanduser(p), recursive=True) if os.path.isfile(f)]
        if not found:
            what = "directory has no files" if os.path.isdir(p) else "no such file, and as a glob it matched nothing"
            raise ConfigError(f"data.paths: {p!r}: {what}; point data.paths at existing text files, globs or dirs")
        files.update(found)
    return sorted(files)


def _read_text_docs(files: list[str], max_bytes: int) -> list[str]:
    docs, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        try:
            with open(f, "rb") as fh:
                raw = fh.read(max_bytes - total)
        except OSError as e:
            raise ConfigError(f"data.paths: cannot read {f!r} ({e.strerror}); fix permissions or drop it") from None
        total += len(raw)
        docs.append(raw.decode("utf-8", errors="replace"))
    return docs


def _read_arrayrecord_docs(files: list[str], max_bytes: int) -> list[str | np.ndarray]:
    import grain.python as gp

    try:
        src = gp.ArrayRecordDataSource(files)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"data.paths: cannot open ArrayRecord files {files[:3]} ({first}); "
                          "give files written by array_record's ArrayRecordWriter") from None
    docs, total = [], 0
    for i in range(len(src)):
        if total >= max_bytes:
            break
        rec = src[i]
        total += len(rec)
        if rec[:6] == b"\x93NUMPY":  # np.save'd token array
            docs.append(np.load(io.BytesIO(rec), allow_pickle=False).reshape(-1))
        else:
            docs.append(rec.decode("utf-8", errors="replace"))
    return docs


_ENCODE_DOCS = 256  # documents per encode_batch call in _tokenize


def _tokenize(docs, tokenizer) -> Corpus:
    encoded: list[np.ndarray] = [None] * len(docs)  # type: ignore[list-item]
    text_idx = [i for i, d in enumerate(docs) if isinstance(d, str)]
    if hasattr(tokenizer, "encode_array"):
        for i in text_idx:
            encoded[i] = tokenizer.encode_array(docs[i])
    elif text_idx:
        # In pieces: one encode_batch over a whole corpus holds ~170 bytes per token (Encoding objects, then
        # Python int lists) before the int32 arrays exist; pieces of _ENCODE_DOCS documents bound that.
        for lo in range(0, len(text_idx), _ENCODE_DOCS):
            part = text_idx[lo:lo + _ENCODE_DOCS]
            for i, ids in zip(part, tokenizer.encode_batch([docs[i] for i in part])):
                encoded[i] = np.asarray(ids, dtype=np.int32)
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            arr = np.asarray(d)
            v = tokenizer.vocab_size
            if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= v):
                raise ValueError(f"ArrayRecord record {i} holds token ids outside [0, {v}) of tokenizer "
                                 f"{getattr(tokenizer, 'name', '?')!r}; set data.tokenizer to the one that wrote them")
            encoded[i] = arr
    lens = np.array([len(e) + 1 for e in encoded], dtype=np.int64)
    starts = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(lens, out=starts[1:])
    tokens = np.full(int(starts[-1]), tokenizer.eos_id, dtype=np.int32)
    for s, e in zip(starts[:-1], encoded):
        tokens[s:s + len(e)] = e
    return Corpus(tokens, starts)


_CORPUS_CACHE: "collections.OrderedDict[tuple, Corpus]" = collections.OrderedDict()
_CACHE_SIZE = 4


def load_corpus(source: str, paths, max_bytes: int, tokenizer) -> Corpus:
    """Reads and tokenizes the whole corpus (cached in memory by files, sizes, mtimes and tokenizer)."""
    files = resolve_paths(paths)
    stats = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    key = (source, stats, max_bytes, getattr(tokenizer, "name", type(tokenizer).__name__), tokenizer.vocab_size)
    if key in _CORPUS_CACHE:
        _CORPUS_CACHE.move_to_end(key)
        return _CORPUS_CACHE[key]
    docs = _read_text_docs(files, max_bytes) if source == "text" else _read_arrayrecord_docs(files, max_bytes)
    if not docs or all(len(d) == 0 for d in docs):
        raise ConfigError(f"data.paths: the {len(files)} file(s) matched by {list(paths)} hold no data; "
                          "point data.paths at non-empty files")
    corpus = _tokenize(docs, tokenizer)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs if isinstance(d, str))
    lens = np.diff(corpus.doc_starts) - 1
    text_tokens = int(sum(lens[i] for i, d in enumerate(docs) if isinstance(d, str)))
    if text_tokens and not hasattr(type(tokenizer), "bytes_per_token"):
        # For bits-per-byte metrics: the corpus's UTF-8 bytes per token (the last corpus loaded wins).
        tokenizer.bytes_per_token = text_bytes / text_tokens
    _CORPUS_CACHE[key] = corpus
    while len(_CORPUS_CACHE) > _CACHE_SIZE:
        _CORPUS_CACHE.popitem(last=False)
    return corpus


def split_docs(num_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_docs, eval_docs), each sorted: a seeded choice of round(eval_fraction * D) (>= 1) eval docs."""
    n_eval = 0
    if eval_fraction > 0 and num_docs >= 2:
        n_eval = min(num_docs - 1, max(1, int(round(eval_fraction * num_docs))))
    perm = np.random.default_rng([seed, 0x5EED]).permutation(num_docs)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])
