"""Generated tasks for the papers' evaluations: copy, passkey retrieval, Dyck languages.

A task is `fn(rng, tokenizer, seq_len, **kwargs) -> (tokens int32[n], loss_weights float32[n])` with
n <= seq_len + 1, the example ending in EOS; `loss_weights[i]` weights predicting token i (so the batch's
loss_mask at position i is loss_weights[i + 1]). Example `index` of a task is drawn from
`np.random.default_rng([seed, index])`, so it is the same in every process, split and run.
Register new tasks by adding them to `TASKS`.
"""
from __future__ import annotations

import inspect
from typing import Callable

import numpy as np

from axlearn_like.config import ConfigError

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_BRACKETS = ("()", "[]", "{}", "<>")
_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _pieces(tokenizer, pieces: tuple[str, ...]) -> list[np.ndarray]:
    """Token ids of each string encoded on its own (cached on the tokenizer: tasks call this per example)."""
    cache = tokenizer.__dict__.setdefault("_task_piece_cache", {})
    if pieces not in cache:
        cache[pieces] = [np.asarray(tokenizer.encode(p), dtype=np.int32) for p in pieces]
    return cache[pieces]


def _concat(parts: list[np.ndarray], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.concatenate(parts).astype(np.int32)
    lw = np.concatenate([np.full(len(p), w, np.float32) for p, w in zip(parts, weights)])
    return tokens, lw


def copy_task(rng: np.random.Generator, tokenizer, seq_len: int, *, num_symbols: int = 16,
              min_length: int | None = None, max_length: int | None = None):
    """`x | x EOS` for x a random string of `num_symbols` symbols; loss only on the copied x.

    max_length (symbols) defaults to the longest that fits seq_len; min_length defaults to max_length.
    """
    if not 2 <= num_symbols <= len(_ALPHABET):
        raise ValueError(f"copy: num_symbols={num_symbols} must be in [2, {len(_ALPHABET)}]")
    sym = _pieces(tokenizer, tuple(_ALPHABET[:num_symbols]))
    (sep,) = _pieces(tokenizer, ("|",))
    per = max(len(s) for s in sym)
    if max_length is None:
        max_length = (seq_len - len(sep)) // (2 * per)
    min_length = max_length if min_length is None else min_length
    if not 1 <= min_length <= max_length:
        raise ValueError(f"copy: need 1 <= min_length <= max_length, got {min_length}, {max_length} "
                         f"(seq_len={seq_len}); raise data.seq_len or lower the lengths in data.task_kwargs")
    n = int(rng.integers(min_length, max_length + 1))
    x = np.concatenate([sym[s] for s in rng.integers(0, num_symbols, n)])
    eos = np.array([tokenizer.eos_id], np.int32)
    return _concat([x, sep, x, eos], [0.0, 0.0, 1.0, 0.0])


def passkey_example(rng: np.random.Generator, length: int, depth: float, tokenizer):
    """Filler text with a 5-digit pass key hidden at `depth` (0 = start, 1 = end of the filler), then the question.

    Returns (tokens int32[length], loss_weights float32[length]); the weights are 1 exactly on the answer's
    tokens (the key after "The pass key is"), so `tokenizer.decode(tokens[weights > 0])` is " <key>".
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey: depth={depth} must be in [0, 1] (fraction of filler before the key)")
    key = int(rng.integers(10_000, 100_000))
    key_ids, q_ids, a_ids = (np.asarray(tokenizer.encode(s), np.int32) for s in (
        f" The pass key is {key}. Remember it. {key} is the pass key.",
        " What is the pass key? The pass key is", f" {key}"))
    (filler,) = _pieces(tokenizer, (_FILLER,))
    fixed = len(key_ids) + len(q_ids) + len(a_ids) + 1
    n_fill = length - fixed
    if n_fill < 0:
        raise ValueError(f"passkey: length={length} is shorter than the {fixed} tokens of key, question and "
                         f"answer; use length >= {fixed} (and data.seq_len >= length - 1)")
    filler = np.tile(filler, n_fill // max(len(filler), 1) + 1)
    before = int(round(depth * n_fill))
    eos = np.array([tokenizer.eos_id], np.int32)
    return _concat([filler[:before], key_ids, filler[before:n_fill], q_ids, a_ids, eos],
                   [0.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def passkey_task(rng: np.random.Generator, tokenizer, seq_len: int, *, length: int | None = None,
                 depth: float | None = None):
    """Passkey retrieval; length (tokens) defaults to seq_len + 1, depth to uniform in [0, 1] per example."""
    depth = float(rng.uniform()) if depth is None else float(depth)
    return passkey_example(rng, seq_len + 1 if length is None else int(length), depth, tokenizer)


def dyck_task(rng: np.random.Generator, tokenizer, seq_len: int, *, num_types: int = 3, max_depth: int = 8,
              min_length: int = 2, max_length: int | None = None):
    """A random balanced string over `num_types` bracket pairs, nesting <= max_depth; next-token loss everywhere.

    Length (brackets, even) is uniform in [min_length, max_length]; max_length defaults to what fits seq_len.
    """
    if not 1 <= num_types <= len(_BRACKETS):
        raise ValueError(f"dyck: num_types={num_types} must be in [1, {len(_BRACKETS)}]")
    if max_depth < 1:
        raise ValueError(f"dyck: max_depth={max_depth} must be >= 1")
    opens = _pieces(tokenizer, tuple(b[0] for b in _BRACKETS[:num_types]))
    closes = _pieces(tokenizer, tuple(b[1] for b in _BRACKETS[:num_types]))
    per = max(len(p) for p in opens + closes)
    if max_length is None:
        max_length = seq_len // per
    lo, hi = (min_length + 1) // 2, max_length // 2  # in pairs
    if not 1 <= lo <= hi:
        raise ValueError(f"dyck: need 2 <= min_length <= max_length, got {min_length}, {max_length} "
                         f"(seq_len={seq_len}); raise data.seq_len or lower the lengths in data.task_kwargs")
    n = 2 * int(rng.integers(lo, hi + 1))
    coins = rng.random(n)
    kinds = rng.integers(0, num_types, n)
    stack: list[int] = []
    parts = []
    for i in range(n):
        d = len(stack)
        if d > 0 and (d == n - i or d == max_depth or coins[i] < 0.5):
            parts.append(closes[stack.pop()])
        else:
            stack.append(int(kinds[i]))
            parts.append(opens[stack[-1]])
    parts.append(np.array([tokenizer.eos_id], np.int32))
    return _concat(parts, [1.0] * len(parts))


TASKS: dict[str, Callable] = {"copy": copy_task, "passkey": passkey_task, "dyck": dyck_task}

# Pipeline-level task kwargs (not passed to the task function).
PIPELINE_KWARGS = {"num_examples": 100_000}


def check_task_kwargs(task: str, kwargs: dict) -> None:
    """ConfigError naming data.task / data.task_kwargs for an unknown task or argument."""
    if task not in TASKS:
        raise ConfigError(f"data.task: {task!r} is not a registered task (known: {', '.join(sorted(TASKS))}); "
                          "add new ones to axlearn_like.data.TASKS")
    if not isinstance(kwargs, dict):
        raise ConfigError(f"data.task_kwargs: expected a dict, got {kwargs!r}")
    params = inspect.signature(TASKS[task]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY] + list(PIPELINE_KWARGS)
    for k in kwargs:
        if k not in accepted:
            raise ConfigError(f"data.task_kwargs: task {task!r} has no argument {k!r} (accepts: {', '.join(accepted)})")
    n = kwargs.get("num_examples", PIPELINE_KWARGS["num_examples"])
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"data.task_kwargs: num_examples must be a positive integer, got {n!r}")


def task_example(task: str, kwargs: dict, seed: int, index: int, tokenizer, seq_len: int):
    """Example `index` of `task` (deterministic per (seed, index))."""
    fn_kwargs = {k: v for k, v in kwargs.items() if k not in PIPELINE_KWARGS}
    return TASKS[task](np.random.default_rng([seed, index]), tokenizer, seq_len, **fn_kwargs)
