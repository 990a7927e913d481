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
import json, sys
import jax, jax.numpy as jnp, numpy as np
from axlearn_like import checkpoint, cli
from axlearn_like.metrics import train_losses

out = {}
def one(case, run_dir, recipe):
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
    rc = cli.recipe_main(recipe, ["--run-dir", run_dir, "--set", "trainer.steps=3"])
    return {"kinds": kinds, "rc": rc, "objective": train_losses(run_dir).get(3), "params_bitwise": params_bitwise}

def checkpoint_params(run_dir):  # the step-2 checkpoint's params as saved (raw arrays, no model)
    import orbax.checkpoint as ocp
    raw = ocp.StandardCheckpointer().restore(run_dir + "/checkpoints/2/state")
    return {jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree_util.tree_flatten_with_path(raw["params"])[0]}

for case, run_dir, recipe in json.loads(sys.argv[1]):
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


# The EBT case fails to restore since the EBT replay buffer gained state arrays (stats.replay.inputs, ...):
# that change needs its own migration of old 'stats'; strict, so this marker goes when it lands.
_EBT_REPLAY = pytest.mark.xfail(strict=True, reason="EBT replay-buffer state changed; old stats need a migration")


@pytest.mark.parametrize("case", [pytest.param(c, marks=_EBT_REPLAY) if c == "ebt" else c for c in CASES])
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
    assert r["objective"] == pytest.approx(expected["step3_train_objective"], rel=1e-5), (r["objective"], expected)
