"""tools.length_eval / effrem / passkey_eval / generate on a tiny trained Mamba-2 checkpoint (in-process)."""
import os

import numpy as np
import pytest

from tests.core import helpers


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from axlearn_like import config as config_lib, trainer
    from recipes import mamba2

    d = tmp_path_factory.mktemp("m2_tools")
    cfg = config_lib.apply_overrides(mamba2.config(), [
        "model.d_model=32", "model.num_layers=1", "model.ffn_pattern.mlp.mlp_dim=32",
        "model.layer_pattern.mamba2.d_state=8", "model.layer_pattern.mamba2.head_dim=16",
        "model.layer_pattern.mamba2.chunk_size=16", "data.seq_len=32", "data.global_batch_size=8",
        "data.max_bytes=200000", "trainer.steps=2", "model.sample.tokens=0", "trainer.progress=false",
        "trainer.eval_batches=1", "optimizer.warmup_steps=1", f"run_dir={d}", "checkpoint.async_save=false",
    ])
    trainer.run(cfg)
    return str(d)


def test_length_eval(run_dir, tmp_path, capsys):
    from tools import length_eval

    out = str(tmp_path / "len.png")
    res = length_eval.evaluate([run_dir], [64, 160], num_seqs=2, chunk=48, out=out)
    helpers.assert_png(out)
    r = res[run_dir]
    assert [row["length"] for row in r["rows"]] == [64, 160] and r["loss"].shape == (160,)
    assert all(np.isfinite(row["mean_loss"]) and 0 < row["mean_loss"] < 10 for row in r["rows"])
    # chunking does not change the numbers (the state is carried across pieces)
    task, variables, cfg = length_eval.load_run(run_dir)
    batch = length_eval.held_out(cfg, 160, 2)
    one, _ = length_eval.per_position_loss(task, variables, batch, 160)
    np.testing.assert_allclose(one, r["loss"], rtol=1e-4, atol=1e-5)
    assert "x train" in capsys.readouterr().out


def test_effrem(run_dir, tmp_path):
    from tools import effrem

    out = str(tmp_path / "eff.png")
    res = effrem.run([run_dir], 40, points=6, num_seqs=2, chunk=16, out=out)[run_dir]
    helpers.assert_png(out)
    e = np.asarray(res["effrem"])
    assert res["t"][0] == 0 and e[0] == 0.0
    assert np.all((e >= 0) & (e <= 1)) and e[-1] > 0


def test_effrem_suffix_trick_matches_direct_forward(run_dir):
    """p(.|x[t:T]) read from a right-padded row == the last logits of a forward on x[t:T] alone."""
    import jax.numpy as jnp

    from tools import effrem, length_eval

    task, variables, cfg = length_eval.load_run(run_dir)
    seq = length_eval.held_out(cfg, 24, 1)["inputs"][0]
    ts = np.array([0, 5, 17])
    e = effrem.effrem(task, variables, seq, ts, chunk=7)
    p = [effrem._softmax(np.asarray(task.apply(variables, {"inputs": jnp.asarray(seq[None, t:])})[0])[0, -1])
         for t in ts]
    np.testing.assert_allclose(e, [0.5 * np.abs(q - p[0]).sum() for q in p], atol=1e-5)


def test_passkey_eval(run_dir, tmp_path):
    from tools import passkey_eval

    out = str(tmp_path / "pk.png")
    acc = passkey_eval.run(run_dir, [110, 150], [0.0, 1.0], trials=2, chunk=64, out=out)
    helpers.assert_png(out)
    assert acc.shape == (2, 2) and np.all((acc >= 0) & (acc <= 1))


def test_generate_recurrent_and_cli_errors(run_dir, capsys):
    from tools import generate

    text, how = generate.sample(run_dir, "def ", 8, temperature=0.0)
    assert how == "recurrent" and len(text) > 0
    text_rc, how_rc = generate.sample(run_dir, "def ", 8, temperature=0.0, recurrent=False)
    assert how_rc == "recompute" and text_rc == text  # greedy: recurrent decode == full recompute
    assert generate.main([os.path.join(run_dir, "nope")]) == 2
    assert "error:" in capsys.readouterr().err
