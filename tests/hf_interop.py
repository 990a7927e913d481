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


def hf_jobs(jobs: list[dict], workdir: str, timeout: float = 900) -> list[dict]:
    """Runs `jobs` (see tests/hf_side.py) in the interop venv; returns one info dict per job."""
    py = interop_python()
    if py is None:
        msg = "the interop venv (.venv-interop) is missing; create it with `bash scripts/bootstrap.sh --interop`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    os.makedirs(workdir, exist_ok=True)
    jobs_path, result_path = os.path.join(workdir, "jobs.json"), os.path.join(workdir, "result.json")
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "XLA_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    proc = subprocess.run([py, HF_SIDE, jobs_path, result_path], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)
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
    out = jax.jit(lambda v, t: module.apply(v, t, train=False, mutable=["intermediates"])[0])(v, np.asarray(tokens, np.int32))
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
