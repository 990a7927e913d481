"""Run directories written before layer kinds were typed configs still load and resume.

tests/fixtures/legacy_runs/<case> were written by the old code (string layer patterns, the `attention` /
`mlp_dim` / `simplicial` / `moe` / `ssm` sections; see generate.py there): each holds a step-2 checkpoint,
the outputs the old code computed from it on fixed inputs, and the objective of one more step the old code
trained from it. Here, in one 1-device subprocess (the device count the fixtures were written with):
`checkpoint.load` rebuilds each model through the migrated config and must restore every saved parameter
bitwise and reproduce the outputs; `python -m recipes.<name> --run-dir COPY --set trainer.steps=3` continues
the run from its saved (migrated) config and must reproduce the old step-3 objective.

Outputs and objectives are compared to float32 rounding (rtol 1e-5), not bitwise: XLA:CPU generates code for
the host's vector ISA, so the same program on another CPU (the fixtures were written on another machine) can
differ in the last bit of a matmul. The parameters, which the migration must carry over, compare bitwise.

The EBT fixture also predates the paired replay buffer (its `stats.replay` holds only `logits` and `count`):
the EBT declares the buffer a resettable cache (`EBT.resettable_stats`), so the load and the resume restore
everything else and start it empty, printing one note line. Its step-3 objective cannot be the old code's:
that code replayed stored logits onto the first rows of the fresh batch (the fidelity bug the new buffer
fixes), so its number depends on that algorithm. The resumed objective must instead equal this code's loss
on the step-3 batch from the saved parameters and an all-zero buffer, computed here without the trainer. A
difference outside the declared buffer (a changed d_model) must still fail the resume in one line.
"""
import json
import os
import shutil

import numpy as np
import pytest

from tests.core import helpers

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "legacy_runs")
CASES = sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d)))

_SCRIPT = r"""
import contextlib, io, json, os, shutil, sys
import jax, jax.numpy as jnp, numpy as np
from axlearn_like import checkpoint, cli
from axlearn_like.metrics import train_losses

out = {}
def one(case, run_dir, recipe):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        task, v, cfg = checkpoint.load(run_dir)
    vocab = cfg.model.vocab_size
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (2, 16)), jnp.int32)
    if hasattr(task, "energy"):
        probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, vocab)), jnp.float32))
        y = task.energy(v["params"], tokens, probs)
    else:
        y = task.apply(v, {"inputs": tokens})[0]
    np.save(run_dir + ".outputs.npy", np.asarray(y, np.float32))
    saved = checkpoint_params(run_dir)
    loaded = {jax.tree_util.keystr(k): np.asarray(x) for k, x in
              jax.tree_util.tree_flatten_with_path(jax.device_get(v["params"]))[0]}
    params_bitwise = sorted(saved) == sorted(loaded) and all(np.array_equal(saved[k], loaded[k]) for k in saved)
    kinds = [type(m).__name__ for m in cfg.model.layer_pattern] + [type(f).__name__ for f in cfg.model.ffn_pattern]
    out = {"load_printed": printed.getvalue()}
    if task.resettable_stats():  # before the resume, which replaces step 2 (max_to_keep=1)
        out.update(declared_caches(task, v, cfg, run_dir, recipe))
    rc = cli.recipe_main(recipe, ["--run-dir", run_dir, "--set", "trainer.steps=3"])
    rows = [json.loads(ln) for ln in open(run_dir + "/metrics.jsonl")]
    return {**out, "kinds": kinds, "rc": rc, "objective": train_losses(run_dir).get(3),
            "step3": next((r for r in rows if r.get("step") == 3), {}), "params_bitwise": params_bitwise}

def declared_caches(task, v, cfg, run_dir, recipe):
    import orbax.checkpoint as ocp
    stats = {jax.tree_util.keystr(k): float(np.abs(np.asarray(x)).sum())
             for k, x in jax.tree_util.tree_flatten_with_path(jax.device_get(v["stats"]))[0]}
    # The oracle of the resumed step: this code's loss on the step-3 batch (global batch index 2) from the saved
    # params and an all-zero stats tree (the empty buffer), with the trainer's key fold_in(fold_in(rng, 2), 0).
    raw = ocp.StandardCheckpointer().restore(run_dir + "/checkpoints/2/state")
    it = cfg.data.make_iterator(split="train", process_index=0, process_count=1)
    it.set_state({"next_index": 2})
    batch = {k: jnp.asarray(x) for k, x in next(it).items()}
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(raw["rng"])), 2), 0)
    empty = jax.tree.map(jnp.zeros_like, v["stats"])  # this code's layout, every array zero (count 0)
    loss = lambda p, s, b, r: task.loss({"params": p, "stats": s, "carry": {}}, b, r, train=True)[0]
    oracle = float(jax.jit(loss)(raw["params"], empty, batch, rng))
    return {"stats_abs_sums": stats, "objective_oracle": oracle}

def changed_d_model(run_dir, recipe):  # resumes a copy with d_model changed (outside the declared caches)
    bad = run_dir + ".d_model"
    shutil.copytree(run_dir, bad)
    before = sorted(os.listdir(bad + "/checkpoints")), open(bad + "/metrics.jsonl").read()
    err, printed = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(printed):
        rc = cli.recipe_main(recipe, ["--run-dir", bad, "--set", "trainer.steps=3", "--set", "model.d_model=32"])
    after = sorted(os.listdir(bad + "/checkpoints")), open(bad + "/metrics.jsonl").read()
    return {"rc": rc, "stderr": err.getvalue(), "stdout": printed.getvalue(), "unchanged": before == after}

def checkpoint_params(run_dir):  # the step-2 checkpoint's params as saved (raw arrays, no model)
    import orbax.checkpoint as ocp
    raw = ocp.StandardCheckpointer().restore(run_dir + "/checkpoints/2/state")
    return {jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree_util.tree_flatten_with_path(raw["params"])[0]}

for case, run_dir, recipe in json.loads(sys.argv[1]):
    if case == "ebt":  # first: `one` resumes the run dir
        try:
            out["ebt_d_model"] = changed_d_model(run_dir, recipe)
        except Exception as e:
            out["ebt_d_model"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        out[case] = one(case, run_dir, recipe)
    except Exception as e:  # reported by the case's test
        out[case] = {"error": f"{type(e).__name__}: {e}"}
print("RESULTS " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    jobs = []
    for case in CASES:
        shutil.copytree(os.path.join(FIXTURES, case), root / case)
        with open(root / case / "expected.json") as f:
            jobs.append((case, str(root / case), json.load(f)["recipe"]))
    r = helpers.run([helpers.sys.executable, "-c", _SCRIPT, json.dumps(jobs)], devices=1, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return root, json.loads(line[len("RESULTS "):])


def test_fixtures_present():
    assert set(CASES) == {"dense_lm", "ebt", "mamba2", "moe_scanned", "simplicial"}
    with open(os.path.join(FIXTURES, "simplicial", "config.json")) as f:
        saved = json.load(f)["model"]
    assert saved["layer_pattern"] == ["attention", "simplicial"] and "simplicial" in saved  # the old layout


@pytest.mark.parametrize("case", CASES)
def test_old_run_dir_loads_and_resumes(results, case):
    root, res = results
    r = res[case]
    assert "error" not in r, r["error"]
    expected_kinds = {
        "dense_lm": ["AttentionConfig", "MLPConfig"],
        "ebt": ["System2AttentionConfig", "MLPConfig"],
        "mamba2": ["Mamba2Config", "MLPConfig"],
        "moe_scanned": ["AttentionConfig", "MLPConfig", "MoEConfig"],
        "simplicial": ["AttentionConfig", "SimplicialConfig", "MLPConfig"],
    }[case]
    assert r["kinds"] == expected_kinds
    assert r["params_bitwise"]
    got = np.load(str(root / case) + ".outputs.npy")
    want = np.load(os.path.join(FIXTURES, case, "expected_outputs.npy"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with open(os.path.join(FIXTURES, case, "expected.json")) as f:
        expected = json.load(f)
    assert r["rc"] == 0
    if case != "ebt":
        assert r["load_printed"] == "", r["load_printed"]  # nothing was reset
        assert r["objective"] == pytest.approx(expected["step3_train_objective"], rel=1e-5), (r["objective"], expected)
        return
    # The old replay buffer (logits and count only) was not restored: one note line, the buffer empty ...
    note = r["load_printed"].strip()
    assert "\n" not in note, note
    assert note.startswith("note: checkpoint step 2: stats.replay was saved in another layout ("), note
    assert "5 arrays not in the checkpoint: stats.replay.inputs" in note and note.endswith("starting it empty"), note
    assert r["stats_abs_sums"] and set(r["stats_abs_sums"].values()) == {0.0}, r["stats_abs_sums"]
    # ... and the resume trained step 3 from the saved params with that empty buffer (see the module doc for why
    # the old code's objective is not the target).
    assert r["step3"]["train/replay_rows"] == 0.0, r["step3"]
    assert r["objective"] == pytest.approx(r["objective_oracle"], rel=1e-5), (r["objective"], r["objective_oracle"])


def test_old_ebt_run_with_a_changed_d_model_still_fails_in_one_line(results):
    """Only differences inside the declared replay buffer start it empty: with d_model changed too, the
    resume of the old EBT run dir fails with the one-line mismatch error and writes nothing."""
    m = results[1]["ebt_d_model"]
    assert "error" not in m, m["error"]
    errors = [ln for ln in m["stderr"].splitlines() if ln.startswith("error:")]
    assert m["rc"] == 2 and len(errors) == 1, m
    assert "does not fit this config" in errors[0] and "params." in errors[0], errors[0]
    assert "model.d_model (16 -> 32)" in errors[0], errors[0]
    assert "starting it empty" not in m["stdout"] + m["stderr"], m
    assert m["unchanged"], "the failed resume changed the run dir"
