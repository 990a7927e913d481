"""`DataConfig`: what the trainer asks of the data pipeline (source, tokenizer, shapes, split, order)."""
from __future__ import annotations

import dataclasses
from typing import Any

from axlearn_like.config import config_class, require

SOURCES = ("text", "arrayrecord", "task")
MODES = ("shuffled", "tbtt")


@config_class
class DataConfig:
    """Data pipeline config (see `make_iterator` for the batch layout).

    Attributes:
      source: "text" (local files/globs/dirs), "arrayrecord" (records of text or np.save'd token arrays),
        or "task" (a generated task from `TASKS`).
      paths: files, globs or directories; "stdlib" = the interpreter's standard-library *.py sources;
        "python_install" = the whole installation's sources and docs, site-packages included
        (`sources.python_install_files`).
      max_bytes: cap on corpus bytes read (the first files/records in sorted order).
      tokenizer: "byte", or a path to a HF `tokenizers` .json or a SentencePiece .model.
      task: registry name in `TASKS` (source="task"); task_kwargs: its keyword arguments, plus
        "num_examples" (size of the index space the examples are drawn from; default 100_000).
      seq_len, global_batch_size: each batch is [global_batch_size, seq_len] across all processes.
      eval_fraction: fraction of documents (or task examples) held out for split="eval".
      packing: pack documents into full rows (False: one document piece per row, padded).
        Generated tasks always hold one example per row. See `multi_document_rows`.
      mode: "shuffled" (rows shuffled per epoch) or "tbtt" (row r is one continuous stream across steps).
      seed: fixes document split, row order and generated examples.
    """

    source: str = "text"
    paths: tuple[str, ...] = ("stdlib",)
    max_bytes: int = 4_000_000
    tokenizer: str = "byte"
    task: str = "copy"
    task_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    seq_len: int = 128
    global_batch_size: int = 16
    eval_fraction: float = 0.05
    packing: bool = True
    mode: str = "shuffled"
    seed: int = 0

    def validate(self) -> None:
        require(self.source in SOURCES, "data.source", f"{self.source!r} is not one of {list(SOURCES)}")
        require(self.mode in MODES, "data.mode", f"{self.mode!r} is not one of {list(MODES)}")
        require(self.seq_len >= 1, "data.seq_len", f"must be >= 1, got {self.seq_len}")
        require(self.global_batch_size >= 1, "data.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        require(self.max_bytes >= 1, "data.max_bytes", f"must be >= 1, got {self.max_bytes}")
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        require(0 <= self.seed < 2**32, "data.seed", f"must be in [0, 2**32), got {self.seed}")
        if self.source in ("text", "arrayrecord"):
            require(len(self.paths) > 0, "data.paths", "is empty; give files, globs or directories (or 'stdlib')")
            require(self.tokenizer != "", "data.tokenizer", "is empty; use 'byte' or a tokenizer file path")
        if self.source == "task":
            from axlearn_like.data.tasks import check_task_kwargs  # lazy: tasks imports numpy only

            check_task_kwargs(self.task, self.task_kwargs)
            require(self.mode == "shuffled", "data.mode", "generated tasks only support mode='shuffled'")

    @property
    def multi_document_rows(self) -> bool:
        """Whether a row can hold pieces of more than one document: packed rows and tbtt streams (documents
        concatenated). False (packing=False, generated tasks): each row is at most one document, starting at its
        first position, then padding. The default `Task.batch_spec` then leaves `segment_ids` out of the
        step's batch: for a causal model the mask changes nothing at a real (loss-bearing) position, and it
        costs attention a dense [B, 1, S, S] mask."""
        if self.mode == "tbtt":
            return True
        return self.packing and self.source != "task"

    def make_iterator(self, *, split: str = "train", process_index: int = 0, process_count: int = 1):
        """This process's grain iterator (axlearn_like.data.make_iterator). The trainer asks any root `data`
        config for its batches through this method, so a task with other data brings its own config."""
        from axlearn_like.data.pipeline import make_iterator

        return make_iterator(self, split=split, process_index=process_index, process_count=process_count)


