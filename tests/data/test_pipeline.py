"""Data pipeline: determinism, splits, exact resume, process sharding, packing, tasks, tokenizers, sources, errors."""
import io
import json

import numpy as np
import pytest

from axlearn_like.config import ConfigError
from axlearn_like.data import TASKS, DataConfig, make_dataset, make_iterator, make_tokenizer, passkey_example, sources
from axlearn_like.data.pipeline import _CorpusRowSource

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """40 documents of varied lengths; doc k only uses the letter chr(65 + k % 26) (+ digits for k >= 26)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(123)
    for k in range(40):
        letter = chr(65 + k % 26) if k < 26 else chr(97 + k % 26)
        n = int(rng.integers(1, 300))
        (d / f"doc{k:02d}.txt").write_text(letter * n + "\n")
    return str(d)


def _cfg(corpus_dir, **kw):
    base = dict(source="text", paths=(corpus_dir,), seq_len=17, global_batch_size=4, eval_fraction=0.2, seed=3)
    base.update(kw)
    return DataConfig(**base)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _eq(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS) and len(a) == len(b)


def test_layout_and_determinism(corpus_dir):
    cfg = _cfg(corpus_dir)
    a, b = _take(make_iterator(cfg), 6), _take(make_iterator(cfg), 6)
    assert _eq(a, b)
    for k, dt in zip(KEYS, (np.int32, np.int32, np.float32, np.int32, np.int32)):
        assert a[0][k].shape == (4, 17) and a[0][k].dtype == dt
    other = _take(make_iterator(_cfg(corpus_dir, seed=4)), 6)
    assert not _eq(a, other)


def test_eval_disjoint_from_train_and_fixed(corpus_dir):
    cfg = _cfg(corpus_dir)
    tok = make_tokenizer(cfg)
    special = {tok.eos_id, tok.pad_id, ord("\n")}
    train = {int(t) for b in make_iterator(cfg, num_epochs=1) for t in np.unique(b["inputs"])} - special
    ev_batches = list(make_iterator(cfg, split="eval"))
    ev = {int(t) for b in ev_batches for t in np.unique(b["inputs"])} - special
    assert train and ev and not (train & ev)
    assert len(train | ev) == 40  # every document lands in exactly one split
    assert _eq(ev_batches, list(make_iterator(cfg, split="eval")))
    # The eval pass covers every eval row once; padding rows carry no loss.
    corpus = sources.load_corpus("text", (corpus_dir,), cfg.max_bytes, tok)
    _, eval_docs = sources.split_docs(corpus.num_docs, cfg.eval_fraction, cfg.seed)
    n_rows = _CorpusRowSource(corpus.select(eval_docs), cfg.seq_len, tok.pad_id, True).num_rows
    assert len(ev_batches) == -(-n_rows // 4)
    assert sum(int((b["segment_ids"][:, 0] > 0).sum()) for b in ev_batches) == n_rows


@pytest.mark.parametrize("mode,k", [("shuffled", 3), ("shuffled", 0), ("tbtt", 5)])
def test_resume_exact(corpus_dir, mode, k):
    cfg = _cfg(corpus_dir, mode=mode)
    ds = make_dataset(cfg, num_epochs=3)
    per_epoch = len(ds) // 3
    ref = _take(make_iterator(cfg), 2 * per_epoch + 2)
    # Resume mid-epoch 0, and just before the epoch boundary so the remaining batches cross it.
    for start in (k, per_epoch - 1):
        it = make_iterator(cfg)
        _take(it, start)
        state = json.loads(json.dumps(it.get_state()))
        it2 = make_iterator(cfg)
        it2.set_state(state)
        assert _eq(_take(it2, len(ref) - start), ref[start:])
    # Later epochs are reshuffled (train), not a replay of epoch 0.
    assert not _eq(ref[:per_epoch], ref[per_epoch:2 * per_epoch])


def test_finite_epochs_and_eval_end(corpus_dir):
    cfg = _cfg(corpus_dir)
    n1 = len(list(make_iterator(cfg, num_epochs=1)))
    assert n1 == len(make_dataset(cfg, num_epochs=1))
    assert len(list(make_iterator(cfg, num_epochs=2))) in (2 * n1, 2 * n1 + 1)  # batches may straddle epochs


@pytest.mark.parametrize("kw", [dict(mode="shuffled"), dict(mode="tbtt"), dict(packing=False),
                                dict(source="task", task="copy", task_kwargs={"num_examples": 64})])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_process_sharding(corpus_dir, kw, split):
    cfg = _cfg(corpus_dir, **kw)
    full = _take(make_iterator(cfg, split=split), 3)
    parts = [_take(make_iterator(cfg, split=split, process_index=p, process_count=2), 3) for p in range(2)]
    for t in range(3):
        for key in KEYS:
            assert parts[0][t][key].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([parts[0][t][key], parts[1][t][key]]), full[t][key])


def _check_rows(b, eos, pad):
    """Invariants every batch satisfies: segments, positions, targets and loss mask consistent."""
    inp, tgt, lm, seg, pos = (b[k] for k in KEYS)
    for r in range(inp.shape[0]):
        valid = seg[r] > 0
        n = int(valid.sum())
        assert valid[:n].all() and not valid[n:].any()  # padding only at the end
        assert (inp[r, n:] == pad).all() and (tgt[r, n:] == pad).all() and (lm[r, n:] == 0).all()
        assert (pos[r, n:] == 0).all() and (tgt[r, :n] != pad).all() and (inp[r, :n] != pad).all()
        # targets are the next token: tgt[i] == inp[i+1] inside the row.
        np.testing.assert_array_equal(tgt[r, :n - 1], inp[r, 1:n])
        for i in range(1, n):
            if inp[r, i - 1] == eos:  # a new document starts after EOS
                assert seg[r, i] == seg[r, i - 1] + 1 and pos[r, i] == 0
            else:
                assert seg[r, i] == seg[r, i - 1] and pos[r, i] == pos[r, i - 1] + 1
        np.testing.assert_array_equal(lm[r, :n], (inp[r, :n] != eos).astype(np.float32))
        assert seg[r, 0] in (0, 1)


@pytest.mark.parametrize("packing", [True, False])
def test_packing_correctness(corpus_dir, packing):
    cfg = _cfg(corpus_dir, packing=packing)
    tok = make_tokenizer(cfg)
    corpus = sources.load_corpus("text", (corpus_dir,), cfg.max_bytes, tok)
    train_docs, _ = sources.split_docs(corpus.num_docs, cfg.eval_fraction, cfg.seed)
    tr = corpus.select(train_docs)
    src = _CorpusRowSource(tr, cfg.seq_len, tok.pad_id, packing)
    batches = list(make_iterator(cfg, num_epochs=1))
    seen = []
    for b in batches:
        _check_rows(b, tok.eos_id, tok.pad_id)
        if not packing:
            assert (b["segment_ids"] <= 1).all() and (b["segment_ids"][:, 0] == 1).all()
        for r in range(4):  # every row is a window of the train stream (stride seq_len)
            n = int((b["segment_ids"][r] > 0).sum())
            row = np.concatenate([b["inputs"][r, :n], b["targets"][r, n - 1:n]])
            hits = [i for i, st in enumerate(src.starts)
                    if np.array_equal(tr.tokens[st:st + n + 1], row[:n + 1])]
            assert hits
            seen.append(hits)
    # One epoch = a permutation of the rows (drop_remainder drops < global_batch_size of them).
    chosen = set()
    for hits in seen:
        chosen.add(next(h for h in hits if h not in chosen))
    assert len(chosen) == 4 * len(batches) >= src.num_rows - 3
    if packing:  # every token of the stream is a target exactly once across all rows
        assert src.num_rows == (tr.num_tokens - 1) // cfg.seq_len


def test_tbtt_streams_are_continuous(corpus_dir):
    cfg = _cfg(corpus_dir, mode="tbtt", global_batch_size=2, seq_len=8)
    tok = make_tokenizer(cfg)
    bs = list(make_iterator(cfg, num_epochs=1))
    assert len(bs) >= 3
    for b in bs:
        _check_rows(b, tok.eos_id, tok.pad_id)
    assert (bs[0]["positions"][:, 0] == 0).all()  # each stream starts a fresh context
    for t in range(1, len(bs)):
        prev, cur = bs[t - 1], bs[t]
        np.testing.assert_array_equal(cur["inputs"][:, 0], prev["targets"][:, -1])  # chunk t continues chunk t-1
        cont = prev["inputs"][:, -1] != tok.eos_id
        np.testing.assert_array_equal(cur["positions"][cont, 0], prev["positions"][cont, -1] + 1)
        assert (cur["positions"][~cont, 0] == 0).all()


def test_stdlib_default_corpus():
    cfg = DataConfig(max_bytes=200_000)
    files = sources.stdlib_files()
    assert files == sorted(files) and all("site-packages" not in f and "/test/" not in f for f in files)
    b = next(make_iterator(cfg))
    assert b["inputs"].shape == (16, 128) and b["inputs"].max() <= 256
    corpus = sources.load_corpus("text", ("stdlib",), 200_000, make_tokenizer(cfg))
    assert corpus.num_tokens == 200_000 + corpus.num_docs  # capped bytes + one EOS per file


# ----------------------------------------------------------------------------------------------- tasks

def test_copy_task():
    tok = make_tokenizer("byte")
    cfg = DataConfig(source="task", task="copy", seq_len=33, global_batch_size=4,
                     task_kwargs={"num_examples": 50, "min_length": 3, "max_length": 16, "num_symbols": 5})
    b = next(make_iterator(cfg))
    _check_rows({**b, "loss_mask": (b["segment_ids"] > 0).astype(np.float32) * (b["inputs"] != tok.eos_id)},
                tok.eos_id, tok.pad_id)
    for r in range(4):
        n = int(b["segment_ids"][r].sum())
        text = tok.decode(b["inputs"][r, :n]) + tok.decode(b["targets"][r, n - 1:n])
        x, _, y = text.partition("|")
        assert x == y and 3 <= len(x) <= 16 and set(x) <= set("abcde")
        lm = b["loss_mask"][r]
        assert tok.decode(b["targets"][r][lm > 0]) == x and lm.sum() == len(x)
    a2 = next(make_iterator(cfg))
    assert np.array_equal(a2["inputs"], b["inputs"])


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_example(depth):
    tok = make_tokenizer("byte")
    toks, lw = passkey_example(np.random.default_rng(7), 400, depth, tok)
    assert toks.shape == lw.shape == (400,) and toks[-1] == tok.eos_id
    key = tok.decode(toks[lw > 0]).strip()
    assert len(key) == 5 and key.isdigit()
    text = tok.decode(toks)
    where = text.index(f"The pass key is {key}")
    filler_len = 400 - (len(tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key."))
                        + len(" What is the pass key? The pass key is") + 6 + 1)
    assert abs(where - 1 - depth * filler_len) <= 1
    assert text.endswith(f"What is the pass key? The pass key is {key}")
    with pytest.raises(ValueError, match="length >= "):
        passkey_example(np.random.default_rng(0), 20, 0.5, tok)


def test_passkey_task_rows():
    tok = make_tokenizer("byte")
    cfg = DataConfig(source="task", task="passkey", seq_len=200, global_batch_size=2,
                     task_kwargs={"num_examples": 10, "length": 150, "depth": 0.25})
    b = next(make_iterator(cfg))
    assert (b["segment_ids"].sum(1) == 149).all()
    for r in range(2):
        ans = tok.decode(b["targets"][r][b["loss_mask"][r] > 0])
        assert len(ans.strip()) == 5 and ans.strip() in tok.decode(b["inputs"][r, :100])


def test_dyck_task():
    tok = make_tokenizer("byte")
    cfg = DataConfig(source="task", task="dyck", seq_len=64, global_batch_size=8,
                     task_kwargs={"num_examples": 100, "num_types": 2, "max_depth": 3})
    b = next(make_iterator(cfg))
    pairs = {"(": ")", "[": "]"}
    for r in range(8):
        n = int(b["segment_ids"][r].sum())
        s = tok.decode(b["inputs"][r, :n])
        stack, deepest = [], 0
        for c in s:
            if c in pairs:
                stack.append(pairs[c])
                deepest = max(deepest, len(stack))
            else:
                assert stack.pop() == c
        assert not stack and deepest <= 3 and len(s) % 2 == 0 and b["targets"][r, n - 1] == tok.eos_id
        np.testing.assert_array_equal(b["loss_mask"][r], (b["segment_ids"][r] > 0).astype(np.float32))


def test_task_split_and_registry():
    assert set(TASKS) >= {"copy", "passkey", "dyck"}
    cfg = DataConfig(source="task", task="copy", seq_len=21, global_batch_size=2, eval_fraction=0.5,
                     task_kwargs={"num_examples": 8})
    tr = [b["inputs"] for b in make_iterator(cfg, num_epochs=1)]
    ev = [b["inputs"] for b in make_iterator(cfg, split="eval")]
    assert len(tr) == len(ev) == 2
    rows = lambda bs: {r.tobytes() for b in bs for r in b}  # noqa: E731
    assert not rows(tr) & rows(ev)


# ------------------------------------------------------------------------------------------ tokenizers

_TEXTS = ["hello world, this is a tiny corpus", "the quick brown fox jumps over the lazy dog",
          "copy passkey dyck ()[]{} 0123456789"] * 10


def _roundtrip_pipeline(tmp_path, tok_path):
    tok = make_tokenizer(tok_path)
    assert tok.decode(tok.encode("the quick brown fox")).strip() == "the quick brown fox"
    assert len({tok.eos_id, tok.pad_id}) == 2 and max(tok.eos_id, tok.pad_id) < tok.vocab_size
    (tmp_path / "c").mkdir()
    for i, t in enumerate(_TEXTS):
        (tmp_path / "c" / f"{i:02d}.txt").write_text(t)
    cfg = DataConfig(paths=(str(tmp_path / "c"),), tokenizer=tok_path, seq_len=8, global_batch_size=2)
    b = next(make_iterator(cfg))
    assert b["inputs"].max() < tok.vocab_size
    assert tok.bytes_per_token > 1.0  # set from the corpus, for bits-per-byte metrics
    _check_rows(b, tok.eos_id, tok.pad_id)


def test_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(_TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path / "tok.json")
    t.save(path)
    tok = make_tokenizer(path)
    assert tok.eos_id == t.token_to_id("</s>") and tok.pad_id == t.get_vocab_size()  # PAD appended
    _roundtrip_pipeline(tmp_path, path)


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_TEXTS), model_writer=buf, vocab_size=60,
                                   hard_vocab_limit=False, model_type="bpe", minloglevel=2)
    path = tmp_path / "sp.model"
    path.write_bytes(buf.getvalue())
    tok = make_tokenizer(str(path))
    assert tok.eos_id == 2  # SentencePiece's default </s>
    _roundtrip_pipeline(tmp_path, str(path))


def test_byte_tokenizer():
    tok = make_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    ids = tok.encode("héllo")
    assert ids == list("héllo".encode()) and tok.decode(ids + [256, 257]) == "héllo"


# ---------------------------------------------------------------------------------------- arrayrecord

def test_arrayrecord_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "data.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    arrays = [np.arange(i, i + 30, dtype=np.int32) % 200 for i in range(6)]
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, a)
        w.write(buf.getvalue())
    w.write("zzzz text record".encode())
    w.close()
    cfg = DataConfig(source="arrayrecord", paths=(path,), seq_len=10, global_batch_size=2, eval_fraction=0.0)
    corpus = sources.load_corpus("arrayrecord", (path,), cfg.max_bytes, make_tokenizer(cfg))
    assert corpus.num_docs == 7
    np.testing.assert_array_equal(corpus.tokens[:31], np.append(arrays[0], 256))
    assert bytes(corpus.tokens[corpus.doc_starts[6]:-1].astype(np.uint8)) == b"zzzz text record"
    b = next(make_iterator(cfg))
    _check_rows(b, 256, 257)
    bad = tmp_path / "bad.array_record"
    w = ArrayRecordWriter(str(bad), "group_size:1")
    buf = io.BytesIO()
    np.save(buf, np.array([1, 999], np.int32))
    w.write(buf.getvalue())
    w.close()
    with pytest.raises(ValueError, match="outside"):
        sources.load_corpus("arrayrecord", (str(bad),), 100, make_tokenizer("byte"))


# --------------------------------------------------------------------------------------------- errors

def _one_line_error(fn, exc, *needles):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_bad_inputs(tmp_path, corpus_dir):
    it = lambda **kw: make_iterator(_cfg(corpus_dir, **kw))  # noqa: E731
    _one_line_error(lambda: it(paths=(str(tmp_path / "nope.txt"),)), ConfigError, "data.paths", "nope.txt")
    _one_line_error(lambda: it(paths=(str(tmp_path / "*.zzz"),)), ConfigError, "data.paths", "matched nothing")
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(lambda: it(paths=(str(tmp_path / "empty.txt"),)), ConfigError, "data.paths", "no data")
    (tmp_path / "small.txt").write_text("x" * 50)
    (tmp_path / "small2.txt").write_text("y" * 50)
    msg = _one_line_error(lambda: it(paths=(str(tmp_path / "small*.txt"),), seq_len=64, eval_fraction=0.0),
                          ConfigError, "102 tokens", "seq_len <= 25", "global_batch_size <= 1")
    assert "data.seq_len" in msg
    _one_line_error(lambda: it(paths=(str(tmp_path / "small*.txt"),), seq_len=64, eval_fraction=0.0, mode="tbtt"),
                    ConfigError, "102 tokens", "seq_len <= 24")
    _one_line_error(lambda: make_iterator(_cfg(corpus_dir), process_count=3), ConfigError,
                    "data.global_batch_size", "process_count=3")
    _one_line_error(lambda: it(source="task", task="sort"), ConfigError, "data.task", "copy")
    _one_line_error(lambda: it(source="task", task="copy", task_kwargs={"lenght": 3}), ConfigError,
                    "data.task_kwargs", "lenght")
    _one_line_error(lambda: it(source="task", task="copy", seq_len=8, task_kwargs={"max_length": 20}), ValueError,
                    "data.task_kwargs", "seq_len")
    _one_line_error(lambda: it(tokenizer="gpt7"), ConfigError, "data.tokenizer", "gpt7")
    (tmp_path / "bad.json").write_text("{not json")
    _one_line_error(lambda: it(tokenizer=str(tmp_path / "bad.json")), ConfigError, "data.tokenizer", "bad.json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    _one_line_error(lambda: it(tokenizer=str(tmp_path / "bad.model")), ConfigError, "data.tokenizer", "bad.model")
    _one_line_error(lambda: make_iterator(_cfg(corpus_dir, eval_fraction=0.0), split="eval"),
                    ConfigError, "data.eval_fraction")
    _one_line_error(lambda: it(mode="bptt"), ConfigError, "data.mode")
    _one_line_error(lambda: it(source="parquet"), ConfigError, "data.source")
    _one_line_error(lambda: it(seq_len=0), ConfigError, "data.seq_len")
