"""Test harness for the Hugging Face interop tests (tools.import_hf / tools.export_hf).

The HF side (torch + transformers) runs in a separate Python 3.11 venv, `.venv-interop` (made by
`bash scripts/bootstrap.sh --interop`, which `make test` runs; its packages are pyproject.toml's `interop`
extra), through `tests/hf_side.py` in a subprocess: one call per batch of jobs, so a test module pays the
torch import once or twice. The project side runs here. Without the interop venv the tests skip (and fail
under CI=true, where the bootstrap must have made it). AXL_INTEROP_PYTHON overrides the interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_SIDE = os.path.join(REPO, "tests", "hf_side.py")


def interop_python() -> str | None:
    path = os.environ.get("AXL_INTEROP_PYTHON") or os.path.join(REPO, ".venv-interop", "bin", "python")
    return path if os.path.exists(path) else None


def run_interop(args: list[str], *, cwd: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`<interop python> args...` (output captured), offline and without this venv's PYTHON*/VIRTUAL_ENV/XLA_*
    variables. Without the interop venv the calling test skips (fails under CI=true)."""
    py = interop_python()
    if py is None:
        msg = "the interop venv (.venv-interop) is missing; create it with `bash scripts/bootstrap.sh --interop`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "XLA_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    return subprocess.run([py, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def hf_jobs(jobs: list[dict], workdir: str, timeout: float = 900) -> list[dict]:
    """Runs `jobs` (see tests/hf_side.py) in the interop venv; returns one info dict per job."""
    os.makedirs(workdir, exist_ok=True)
    jobs_path, result_path = os.path.join(workdir, "jobs.json"), os.path.join(workdir, "result.json")
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    proc = run_interop([HF_SIDE, jobs_path, result_path], cwd=workdir, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"tests/hf_side.py failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(result_path) as f:
        return json.load(f)["jobs"]


def project_logits(run_dir: str, tokens) -> np.ndarray:
    """float32 logits [B, S, V] of the latest checkpoint of run_dir (the model as the project runs it)."""
    import jax

    from axlearn_like import checkpoint

    task, variables, _ = checkpoint.load(run_dir)
    module = getattr(task, "module", task)
    v = {k: variables[k] for k in ("params", "stats") if variables.get(k)}
    apply = jax.jit(lambda v, t: module.apply(v, t, train=False, mutable=["intermediates"])[0])
    out = apply(v, np.asarray(tokens, np.int32))
    return np.asarray(out, np.float32)


def folder_tensors(folder: str) -> dict[str, np.ndarray]:
    """name -> tensor in its stored dtype, of an HF folder (single file or shards)."""
    from tools.hf.common import TensorReader

    r = TensorReader(folder)
    return {n: np.array(r.raw(n)) for n in r.names}


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> args...` in the project venv (a real command line, as a user runs it)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


CLEAN_LOADING = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


def assert_hf_loaded(info: dict, hf_class: str | None = None) -> None:
    """A tests/hf_side.py job's info: transformers loaded the folder with no missing, unexpected or mismatched
    keys (as `hf_class`, when given)."""
    if hf_class is not None:
        assert info["class"] == hf_class
    assert info["loading"] == CLEAN_LOADING


def assert_export_reloads(w: str, case: str, info: dict, hf_class: str) -> dict:
    """<w>/<case>.out, the export of the import of the HF folder <w>/<case>: transformers reloads it as `hf_class`
    cleanly (`info`: its job's answer) with the folder's logits (<case>.out.npy vs <case>.ref.npy, within 1e-5)
    and bit-equal tensors. Returns the export's config.json."""
    assert_hf_loaded(info, hf_class)
    assert np.abs(np.load(f"{w}/{case}.out.npy") - np.load(f"{w}/{case}.ref.npy")).max() <= 1e-5
    assert_same_tensors(f"{w}/{case}", f"{w}/{case}.out")
    with open(f"{w}/{case}.out/config.json") as f:
        return json.load(f)


def random_run(recipe: str, run_dir: str, overrides: list[str], seed: int = 0, preset: str | None = None):
    """A run of recipes.<recipe> (its `preset`, + overrides) whose every parameter is random, norms and biases
    included (initial values would hide a mis-mapped norm or bias). Returns its config."""
    import importlib

    import jax

    from axlearn_like import config as config_lib
    from axlearn_like.state_setup import build_state_setup
    from tools.import_safetensors import write_run

    mod = importlib.import_module(f"recipes.{recipe}")
    cfg = config_lib.apply_overrides(mod.PRESETS[preset]() if preset else mod.config(), overrides)
    abstract = build_state_setup(cfg).abstract_state.params
    rng = np.random.RandomState(seed)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.2).astype(np.float32), abstract)
    write_run(run_dir, cfg, params, source="test")
    return cfg


def assert_same_tensors(a_dir: str, b_dir: str) -> None:
    """Two HF folders hold the same tensor names, dtypes and values (bit for bit)."""
    a, b = folder_tensors(a_dir), folder_tensors(b_dir)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name


def assert_same_run(run_a: str, run_b: str, collections=("params",)) -> None:
    """The latest checkpoints of two run dirs hold equal arrays in `collections` and the same model config."""
    import dataclasses

    import jax

    from axlearn_like import checkpoint

    _, va, ca = checkpoint.load(run_a)
    _, vb, cb = checkpoint.load(run_b)
    for col in collections:
        la, lb = (jax.tree_util.tree_flatten_with_path(v[col])[0] for v in (va, vb))
        assert [p for p, _ in la] == [p for p, _ in lb], col
        for (p, xa), (_, xb) in zip(la, lb):
            assert np.array_equal(np.asarray(xa), np.asarray(xb)), (col, p)
    assert dataclasses.replace(cb.model, sample=ca.model.sample) == ca.model
