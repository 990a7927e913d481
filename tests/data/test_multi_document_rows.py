"""DataConfig.multi_document_rows: the fact matches the rows the pipeline yields, and the default Task.batch_spec
leaves segment_ids out of the step's batch exactly when rows hold at most one document."""
import numpy as np
import pytest

from axlearn_like.data import DataConfig, make_iterator
from tests.models.model_helpers import small_cfg


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """30 documents of 1..80 characters: many fit a row of 16 several times over, some span rows."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(5)
    for k in range(30):
        (d / f"doc{k:02d}.txt").write_text(chr(65 + k % 26) * int(rng.integers(1, 80)) + "\n")
    return str(d)


def _cases(corpus_dir):
    text = dict(source="text", paths=(corpus_dir,), seq_len=16, global_batch_size=4, eval_fraction=0.2)
    return {
        "packed": (DataConfig(**text), True),
        "unpacked": (DataConfig(**text, packing=False), False),
        "tbtt": (DataConfig(**text, mode="tbtt"), True),
        "tbtt_unpacked": (DataConfig(**text, mode="tbtt", packing=False), True),  # tbtt concatenates regardless
        "task": (DataConfig(source="task", task="copy", task_kwargs={"num_examples": 64}, seq_len=48,
                            global_batch_size=4, eval_fraction=0.25), False),
    }


@pytest.mark.parametrize("name", ["packed", "unpacked", "tbtt", "tbtt_unpacked", "task"])
def test_fact_matches_the_rows(corpus_dir, name):
    cfg, multi = _cases(corpus_dir)[name]
    assert cfg.multi_document_rows is multi
    for split in ("train", "eval"):
        batches = [b for _, b in zip(range(8), make_iterator(cfg, split=split))]
        seg = np.concatenate([b["segment_ids"] for b in batches])
        pos = np.concatenate([b["positions"] for b in batches])
        if multi:
            if split == "train":  # the fact is needed: some row holds (pieces of) two documents
                assert (seg.max(axis=1) >= 2).any()
            continue
        # at most one document per row, from position 0, then only padding (which carries no loss)
        real = seg > 0
        assert set(np.unique(seg)) <= {0, 1}
        assert (real[:, :-1] >= real[:, 1:]).all(), "padding before a real token"
        n = real.sum(axis=1)
        assert (pos == np.where(real, np.arange(cfg.seq_len), 0)).all()
        assert (np.concatenate([b["loss_mask"] for b in batches])[~real] == 0).all()
        assert (n > 0).any()


def test_batch_spec_leaves_segment_ids_out_for_one_document_rows(corpus_dir):
    task = small_cfg().build()
    full = {"inputs", "targets", "loss_mask", "positions", "segment_ids"}
    for name, (cfg, multi) in _cases(corpus_dir).items():
        spec = task.batch_spec(cfg)
        assert set(spec) == (full if multi else full - {"segment_ids"}), name
        assert spec["inputs"].shape == (cfg.global_batch_size, cfg.seq_len)

    class OtherData:  # a data config without the fact (another task's data): the spec is untouched
        global_batch_size, seq_len = 2, 8

    assert set(task.batch_spec(OtherData())) == full
