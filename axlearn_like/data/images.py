"""In-memory image datasets as grain pipelines (scikit-learn's bundled 8x8 digits), for continuous-data tasks.

Batch layout (per process, b = global_batch_size / process_count rows; process p holds global rows
[p*b, (p+1)*b)): images float32 [b, H, W] with pixels in [0, 1], weights float32 [b] (1 for an image, 0 for
a padding row of the last eval batch). Splits: a permutation of all images drawn from `seed`; the first
`eval_examples` are held out. Train rows are reshuffled every epoch; the iterator state is the next batch
index ({"next_index"}), the same in every process, so checkpoints resume exactly on any process count.
"""
from __future__ import annotations

import functools

import grain.python as gp
import numpy as np

from axlearn_like.config import ConfigError, config_class, require

DATASETS = ("digits",)
_READ_OPTIONS = gp.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@functools.lru_cache(maxsize=4)
def _load(dataset: str) -> np.ndarray:
    if dataset == "digits":
        from sklearn.datasets import load_digits

        return (load_digits().images / 16.0).astype(np.float32)  # 1797 x 8 x 8, 17 grey levels
    raise ValueError(f"unknown image dataset {dataset!r}")


@config_class
class ImageDataConfig:
    """dataset: one of DATASETS; eval_examples: images held out for split="eval"; seed: split and order."""

    dataset: str = "digits"
    global_batch_size: int = 64
    eval_examples: int = 297
    seed: int = 0

    def validate(self) -> None:
        require(self.dataset in DATASETS, "data.dataset", f"{self.dataset!r} is not one of {list(DATASETS)}")
        require(self.global_batch_size >= 1, "data.global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        n = len(_load(self.dataset))
        require(0 < self.eval_examples < n, "data.eval_examples", f"must be in (0, {n}), got {self.eval_examples}")
        require(n - self.eval_examples >= self.global_batch_size, "data.global_batch_size",
                f"{self.global_batch_size} is more than the {n - self.eval_examples} training images; lower it or "
                "data.eval_examples")

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(_load(self.dataset).shape[1:])

    def split(self, split: str) -> np.ndarray:
        """All images of a split, float32 [N, H, W]."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r} must be 'train' or 'eval'")
        images = _load(self.dataset)
        order = np.random.default_rng(self.seed).permutation(len(images))
        return images[order[: self.eval_examples]] if split == "eval" else images[order[self.eval_examples:]]

    def make_iterator(self, *, split: str = "train", process_index: int = 0, process_count: int = 1):
        """This process's grain iterator (module doc); train: infinite, eval: one pass, last batch padded."""
        self.validate()
        g = self.global_batch_size
        if g % process_count:
            raise ConfigError(f"data.global_batch_size: {g} is not divisible by process_count={process_count}")
        images = self.split(split)
        rows = gp.MapDataset.range(len(images))
        if split == "train":
            rows = rows.shuffle(seed=self.seed).repeat(None)  # grain reseeds the shuffle per epoch
            num_batches = len(rows) // g
        else:
            num_batches = -(-len(rows) // g)
        total, b = len(rows), g // process_count
        offs = process_index * b + np.arange(b)

        def batch(i: int) -> dict[str, np.ndarray]:
            k = i * g + offs
            idx = np.array([rows[int(j)] if j < total else -1 for j in k], np.int64)
            ok = idx >= 0
            return {"images": np.where(ok[:, None, None], images[np.maximum(idx, 0)], 0.0).astype(np.float32),
                    "weights": ok.astype(np.float32)}

        return iter(gp.MapDataset.range(num_batches).map(batch).to_iter_dataset(_READ_OPTIONS))
