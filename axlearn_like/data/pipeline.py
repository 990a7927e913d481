"""grain MapDataset pipelines: rows -> shuffle(seed, reshuffled per epoch) -> repeat -> global batch -> this
process's slice, so the iterator state is one integer (the next batch index) and resume is bitwise exact.

Batch layout (per process, b = global_batch_size / process_count rows; process p holds global rows
[p*b, (p+1)*b), so the global batch at a step is the same for every process_count):
  inputs int32[b, S], targets int32[b, S] (= the next token), loss_mask float32[b, S],
  segment_ids int32[b, S] (1, 2, ... per document within the row; 0 = padding; when rows hold at most one
  document, `DataConfig.multi_document_rows` False, the trainer's batch spec leaves them out of the step),
  positions int32[b, S] (position within the document as far as the model can see it: a document cut by
  the row start counts from the row start (from the stream start in tbtt mode), so positions == 0 exactly
  where a model's context / recurrent state for a document begins).
loss_mask is 0 on padding and on targets in another document than their input (the EOS -> next document
step), and carries the task's loss weights for generated tasks.

Rows (mode="shuffled"): packing=True cuts the document stream (each document + EOS) into windows of
S+1 tokens with stride S (every token is a target once); packing=False cuts each document alone the same
way, padding its last window. mode="tbtt": the epoch's documents (reshuffled per epoch) are concatenated
and split into global_batch_size contiguous streams; batch t row r is chunk t of stream r.
"""
from __future__ import annotations

import sys

import grain.python as gp
import numpy as np

from axlearn_like.config import ConfigError
from axlearn_like.data import sources, tasks
from axlearn_like.data.config import DataConfig
from axlearn_like.data.tokenizer import make_tokenizer

# Data is in memory and rows are cheap numpy gathers: no reader threads (avoids GIL contention).
_READ_OPTIONS = gp.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class _TokenRows:
    """Row gathers over a tokenized corpus (tokens, per-token doc id / position / loss weight)."""

    def __init__(self, corpus: sources.Corpus, seq_len: int, pad_id: int):
        self.tokens = corpus.tokens
        self.doc_id, self.pos = corpus.doc_ids_and_positions()
        self.lw = corpus.loss_weights
        self.seq_len, self.pad_id = seq_len, pad_id

    def gather(self, starts: np.ndarray, valid: np.ndarray, origins: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of tokens[start : start + valid] (valid <= S+1, rest padded); positions count from `origins`."""
        s = self.seq_len
        n = self.tokens.shape[0]
        idx = np.minimum(starts[:, None] + np.arange(s + 1), n - 1)
        m = np.arange(s + 1)[None, :] < valid[:, None]
        tok = np.where(m, self.tokens[idx], self.pad_id).astype(np.int32)
        d, p = self.doc_id[idx], self.pos[idx]
        o = np.minimum(origins, n - 1)
        od, op = self.doc_id[o][:, None], self.pos[o][:, None]
        in_ok = m[:, 1:]  # an input counts only if its target exists (the last valid token is a target only)
        seg = np.where(in_ok, d[:, :-1] - d[:, :1] + 1, 0)
        pos = np.where(in_ok, np.where(d[:, :-1] == od, p[:, :-1] - op, p[:, :-1]), 0)
        mask = in_ok & (d[:, 1:] == d[:, :-1])
        lw = mask.astype(np.float32)
        if self.lw is not None:
            lw *= self.lw[idx[:, 1:]]
        return {"inputs": np.where(in_ok, tok[:, :-1], self.pad_id), "targets": tok[:, 1:], "loss_mask": lw,
                "segment_ids": seg.astype(np.int32), "positions": pos.astype(np.int32)}


class _CorpusRowSource:
    """Fixed rows over one split's corpus; row index -1 is an all-padding row."""

    def __init__(self, corpus: sources.Corpus, seq_len: int, pad_id: int, packing: bool):
        self._g = _TokenRows(corpus, seq_len, pad_id)
        n, s = corpus.num_tokens, seq_len
        if packing:
            self.starts = np.arange(max(n - 1, 0) // s, dtype=np.int64) * s
            self.valid = np.full(len(self.starts), s + 1, np.int64)
        else:
            ds = corpus.doc_starts
            lens = np.diff(ds)
            chunks = np.where(lens >= 2, (lens - 2) // s + 1, 0)  # ceil((L-1)/S) windows with a target
            doc = np.repeat(np.arange(len(lens)), chunks)
            j = np.arange(chunks.sum()) - np.repeat(np.cumsum(chunks) - chunks, chunks)
            self.starts = ds[doc] + j * s
            self.valid = np.minimum(s + 1, ds[doc + 1] - self.starts)
        self.num_rows = len(self.starts)
        self.num_tokens = n

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        ok = indices >= 0
        i = np.where(ok, indices, 0)
        starts = self.starts[i] if self.num_rows else np.zeros_like(i)
        valid = np.where(ok, self.valid[i] if self.num_rows else 0, 0)
        return self._g.gather(starts, valid, starts)


class _TaskRowSource:
    """One generated example per row, left-aligned and padded."""

    def __init__(self, cfg: DataConfig, tokenizer, first: int, count: int):
        self.cfg, self.tok, self.first, self.num_rows = cfg, tokenizer, first, count
        self.num_tokens = None

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        s, b = self.cfg.seq_len, len(indices)
        pad = self.tok.pad_id
        out = {"inputs": np.full((b, s), pad, np.int32), "targets": np.full((b, s), pad, np.int32),
               "loss_mask": np.zeros((b, s), np.float32), "segment_ids": np.zeros((b, s), np.int32),
               "positions": np.zeros((b, s), np.int32)}
        for r, i in enumerate(indices):
            if i < 0:
                continue
            tok, lw = tasks.task_example(self.cfg.task, self.cfg.task_kwargs, self.cfg.seed, self.first + int(i),
                                         self.tok, s)
            n = len(tok) - 1
            if n > s:
                raise ValueError(f"data.task_kwargs: a {self.cfg.task!r} example has {n + 1} tokens but rows hold "
                                 f"seq_len+1={s + 1}; raise data.seq_len to >= {n} or shorten the task's length kwargs")
            out["inputs"][r, :n], out["targets"][r, :n] = tok[:-1], tok[1:]
            out["loss_mask"][r, :n] = lw[1:]
            out["segment_ids"][r, :n] = 1
            out["positions"][r, :n] = np.arange(n)
        return out


def _too_small(what: str, n_tokens: int | None, rows: int, cfg: DataConfig, tbtt: bool = False) -> ConfigError:
    g, s = cfg.global_batch_size, cfg.seq_len
    if n_tokens is None:
        return ConfigError(f"data.task_kwargs: the {what} split has {rows} examples, fewer than one global batch "
                           f"(global_batch_size={g}); raise num_examples or lower data.global_batch_size")
    if tbtt:
        fit_s, fit_g = n_tokens // g - 1, n_tokens // (s + 1)
    else:
        fit_s, fit_g = (n_tokens - 1) // g, rows
    # Only fixes that can work: a bound below 1 is no advice.
    fixes = ([f"seq_len <= {fit_s} with global_batch_size={g}"] if fit_s >= 1 else []) + (
        [f"global_batch_size <= {fit_g} with seq_len={s}"] if fit_g >= 1 else [])
    more = f"raise data.eval_fraction (now {cfg.eval_fraction}) or add data" if what == "eval" else "add data"
    return ConfigError(
        f"data.seq_len/data.global_batch_size: the {what} split has {n_tokens} tokens ({rows} rows of "
        f"seq_len+1={s + 1}), too few for one global batch of {g} rows; "
        f"{'use ' + ', or '.join(fixes) + ', or ' if fixes else ''}{more} (data.paths / data.max_bytes)")


def _split_corpus(cfg: DataConfig, tokenizer, split: str) -> sources.Corpus:
    corpus = sources.load_corpus(cfg.source, cfg.paths, cfg.max_bytes, tokenizer)
    train_docs, eval_docs = sources.split_docs(corpus.num_docs, cfg.eval_fraction, cfg.seed)
    docs = train_docs if split == "train" else eval_docs
    if len(docs) == 0:
        raise ConfigError(f"data.eval_fraction: split={split!r} has no documents ({corpus.num_docs} document(s), "
                          f"eval_fraction={cfg.eval_fraction}); set data.eval_fraction > 0 and give >= 2 documents")
    return corpus if len(docs) == corpus.num_docs else corpus.select(docs)


def _check_args(cfg: DataConfig, split: str, process_index: int, process_count: int, num_epochs):
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if cfg.global_batch_size % process_count:
        raise ConfigError(f"data.global_batch_size: {cfg.global_batch_size} is not divisible by process_count="
                          f"{process_count}; use a multiple of {process_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None (infinite)")


def _shuffled_batches(src, cfg: DataConfig, split: str, process_index: int, b: int, num_epochs) -> gp.MapDataset:
    g = cfg.global_batch_size
    rows = gp.MapDataset.range(src.num_rows)
    if split == "train":
        # grain reseeds the shuffle per epoch (seed + epoch) for indices past the first epoch.
        rows = rows.shuffle(seed=cfg.seed).repeat(num_epochs)
        num_batches = len(rows) // g
    else:
        rows = rows.repeat(num_epochs)
        num_batches = -(-len(rows) // g)  # the last batch is padded with empty rows (loss_mask 0)
    total, n = len(rows), src.num_rows
    offs = process_index * b + np.arange(b)

    def batch(i: int) -> dict[str, np.ndarray]:
        k = i * g + offs
        return src.rows(np.array([rows[int(j)] % n if j < total else -1 for j in k], np.int64))

    return gp.MapDataset.range(num_batches).map(batch)


class _TbttEpochs:
    """Per-epoch concatenation of the documents (train: reshuffled per epoch), cut into G streams."""

    def __init__(self, corpus: sources.Corpus, cfg: DataConfig, tokenizer, shuffle: bool):
        self.corpus, self.cfg, self.tok, self.shuffle = corpus, cfg, tokenizer, shuffle
        self.stream_len = corpus.num_tokens // cfg.global_batch_size
        self.chunks = (self.stream_len - 1) // cfg.seq_len
        self._cache: dict[int, _TokenRows] = {}

    def rows(self, epoch: int) -> _TokenRows:
        if epoch not in self._cache:
            c = self.corpus
            if self.shuffle:
                c = c.select(np.random.default_rng([self.cfg.seed, epoch]).permutation(c.num_docs))
            self._cache = {epoch: _TokenRows(c, self.cfg.seq_len, self.tok.pad_id)}  # keep one epoch
        return self._cache[epoch]


def _tbtt_batches(corpus, cfg: DataConfig, tokenizer, split: str, process_index: int, b: int, num_epochs):
    ep = _TbttEpochs(corpus, cfg, tokenizer, shuffle=split == "train")
    if ep.chunks < 1:
        raise _too_small(split, corpus.num_tokens, corpus.num_tokens // (cfg.seq_len + 1), cfg, tbtt=True)
    s = cfg.seq_len
    origins = (process_index * b + np.arange(b, dtype=np.int64)) * ep.stream_len
    num_batches = sys.maxsize if num_epochs is None else ep.chunks * num_epochs

    def batch(i: int) -> dict[str, np.ndarray]:
        epoch, t = divmod(i, ep.chunks)
        starts = origins + t * s
        return ep.rows(epoch).gather(starts, np.full(b, s + 1, np.int64), origins)

    return gp.MapDataset.range(num_batches).map(batch)


def make_dataset(cfg: DataConfig, *, split: str = "train", process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None) -> gp.MapDataset:
    """The MapDataset of this process's batches (len = number of batches; sys.maxsize-ish when infinite)."""
    cfg.validate()
    _check_args(cfg, split, process_index, process_count, num_epochs)
    if split == "eval":
        num_epochs = num_epochs or 1
    tokenizer = make_tokenizer(cfg)
    b = cfg.global_batch_size // process_count
    if cfg.source == "task":
        n = cfg.task_kwargs.get("num_examples", tasks.PIPELINE_KWARGS["num_examples"])
        n_eval = 0 if cfg.eval_fraction == 0 else min(n - 1, max(1, int(round(cfg.eval_fraction * n))))
        first, count = (0, n - n_eval) if split == "train" else (n - n_eval, n_eval)
        if count == 0:
            raise ConfigError(f"data.eval_fraction: split='eval' has no examples (eval_fraction={cfg.eval_fraction},"
                              f" num_examples={n}); set data.eval_fraction > 0")
        src = _TaskRowSource(cfg, tokenizer, first, count)
        src.rows(np.array([0]))  # surface bad task kwargs now, not at the first next()
    else:
        corpus = _split_corpus(cfg, tokenizer, split)
        if cfg.mode == "tbtt":
            return _tbtt_batches(corpus, cfg, tokenizer, split, process_index, b, num_epochs)
        src = _CorpusRowSource(corpus, cfg.seq_len, tokenizer.pad_id, cfg.packing)
    if src.num_rows == 0 or (split == "train" and src.num_rows < cfg.global_batch_size):
        raise _too_small(split, src.num_tokens, src.num_rows, cfg)
    return _shuffled_batches(src, cfg, split, process_index, b, num_epochs)


def make_iterator(cfg: DataConfig, *, split: str = "train", process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> gp.DatasetIterator:
    """grain iterator of this process's rows of each global batch (see the module docstring for the layout).

    split="train": infinite (reshuffled each epoch) unless num_epochs; split="eval": one pass in fixed order,
    last batch padded with empty rows. `get_state()` is a JSON-ready dict; `set_state` resumes at the next batch.
    """
    ds = make_dataset(cfg, split=split, process_index=process_index, process_count=process_count,
                      num_epochs=num_epochs)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))
