"""tools.bench_mamba_torch (issue 18's PyTorch + mamba_ssm anchor) without mamba_ssm, torch or a GPU: the config
mapping and its one-line refusals, the PyTorch model's parameter count (closed formula over mamba_ssm's module
shapes) against our JAX model's, the tool's exit 2 without sources, and bench_train --all's anchor row and ratio
from faked subprocesses."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from models.attention import AttentionConfig
from models.kinds import NoFFNConfig
from models.layers import MLPConfig
from recipes import mamba2
from tools import bench_mamba_torch as bmt, bench_train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GPU_340M = {
    "d_model": 1024, "n_layer": 24, "d_intermediate": 2048, "vocab_size": 32768, "pad_vocab_size_multiple": 1,
    "tie_embeddings": True, "rms_norm": True, "fused_add_norm": True, "residual_in_fp32": True,
    "attn_layer_idx": [], "attn_cfg": {},
    "ssm_cfg": {"layer": "Mamba2", "d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1,
                "chunk_size": 256, "dt_min": 1e-3, "dt_max": 0.1, "dt_init_floor": 1e-4, "A_init_range": (1.0, 16.0),
                "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False, "bias": False, "conv_bias": True,
                "use_mem_eff_path": False},
}


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def _model(**changes):
    m = mamba2.gpu_340m().model
    return dataclasses.replace(m, **changes)


def test_torch_config_maps_gpu_340m():
    assert bmt.torch_config(mamba2.gpu_340m().model) == GPU_340M


@pytest.mark.parametrize("changes, match", [
    (dict(layer_pattern=(mamba2.gpu_340m().model.layer_pattern[0], AttentionConfig())),
     r"model.layer_pattern\[1\] to mamba_ssm: AttentionConfig: only Mamba-2"),
    (dict(ffn_pattern=(MLPConfig(mlp_dim=2000),)), r"mlp_dim to mamba_ssm: 2000: .* multiple of 128"),
    (dict(ffn_pattern=(MLPConfig(mlp_dim=2048), NoFFNConfig())), r"model.ffn_pattern to mamba_ssm: entries differ"),
    (dict(z_loss_weight=1e-4), r"model.z_loss_weight"),
    (dict(dtype="float16"), r"model.dtype"),
])
def test_torch_config_refuses_what_it_cannot_map_in_one_line(changes, match):
    with pytest.raises(bmt.AnchorError, match=match) as e:
        bmt.torch_config(_model(**changes))
    assert "\n" not in str(e.value)


def test_torch_config_refuses_mixer_fields_it_cannot_map():
    m = mamba2.gpu_340m().model
    for change, match in ((dict(initial_state="state_passing"), "initial_state"),
                          (dict(ngroups=3), "ngroups: 32 heads are not a multiple of ngroups=3")):
        with pytest.raises(bmt.AnchorError, match=match):
            bmt.torch_config(dataclasses.replace(m, layer_pattern=(dataclasses.replace(m.layer_pattern[0], **change),)))
    two = (dataclasses.replace(m.layer_pattern[0]), dataclasses.replace(m.layer_pattern[0], d_state=64))
    with pytest.raises(bmt.AnchorError, match=r"layer_pattern\[1\] .* differs"):
        bmt.torch_config(dataclasses.replace(m, layer_pattern=two))


@pytest.mark.parametrize("cfg", [mamba2.gpu_340m(), mamba2.config(), mamba2.repro_lengthgen()],
                         ids=["gpu_340m", "default", "repro_lengthgen"])
def test_torch_param_count_equals_our_jax_model(cfg):
    ours, _ = bmt.jax_model(cfg)
    assert bmt.torch_param_count(bmt.torch_config(cfg.model)) == ours
    if cfg.name == "mamba2_340m":
        assert ours == 343_000_320


def test_torch_param_count_untied_and_ngroups():
    m = _model(tie_embeddings=False, num_layers=2, d_model=256, vocab_size=1000)
    m = dataclasses.replace(m, layer_pattern=(dataclasses.replace(m.layer_pattern[0], ngroups=2, d_state=32),))
    cfg = mamba2.gpu_340m()
    cfg.model = m
    assert bmt.torch_param_count(bmt.torch_config(m)) == bmt.jax_model(cfg)[0]


@pytest.mark.parametrize("make", [lambda d: None, lambda d: (d / "mamba_ssm").mkdir()], ids=["missing", "incomplete"])
def test_tool_exits_2_with_one_line_without_sources(tmp_path, make):
    make(tmp_path)
    src = tmp_path if (tmp_path / "mamba_ssm").exists() else tmp_path / "nope"
    p = subprocess.run([sys.executable, "-m", "tools.bench_mamba_torch", "--src", str(src)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --src {src}") and "fetch_anchors.sh" in lines[0], lines


def _fake_run(calls, anchor_rc=0, timeouts=None):
    def run(cmd, **kw):
        calls.append(cmd)
        if timeouts is not None:
            timeouts.append(kw.get("timeout"))
        path = cmd[cmd.index("--json") + 1]
        if "tools.bench_mamba_torch" in cmd:
            if anchor_rc:
                return subprocess.CompletedProcess(cmd, anchor_rc, "", "error: no CUDA device: mamba_ssm's Triton ...")
            res = {"recipe": "mamba2", "preset": "gpu_340m", "step_s": 0.4, "tokens_per_s": 80_000.0,
                   "model_tflops_per_device": 174.0, "peak_memory_bytes": 40 * 2**30, "conv1d": "torch fallback",
                   "params": 343_000_320, "params_jax": 343_000_320}
        else:
            res = {"recipe": "mamba2", "preset": "gpu_340m", "step_s": 0.32, "tokens_per_s": 100_000.0,
                   "model_tflops_per_device": 217.4, "mfu": 0.22, "peak_memory_bytes": 30 * 2**30, "hot_op": None}
        with open(path, "w") as f:
            json.dump(res, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_bench_train_all_adds_the_anchor_row_and_ratio(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls))
    out = tmp_path / "all.json"
    rc = bench_train.main(["--all", "--only", "mamba2:gpu_340m", "--steps", "3", "--no-anchor", "--mamba-anchor",
                           str(tmp_path), "--set", "data.global_batch_size=8", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert [c[2] for c in calls] == ["tools.bench_train", "tools.bench_mamba_torch"]  # right after the preset
    anchor_cmd = calls[1]
    for flag, value in (("--src", str(tmp_path)), ("--steps", "3"), ("--preset", "gpu_340m"),
                        ("--set", "data.global_batch_size=8")):
        assert anchor_cmd[anchor_cmd.index(flag) + 1] == value
    row = "| mamba2:gpu_340m (PyTorch + mamba_ssm Triton, conv1d torch fallback) | 400.0 ms | 80,000 | 174.0 |"
    assert row in text, text
    assert "mamba2:gpu_340m tokens/s vs the PyTorch anchor: 1.25x (goal >= 1.3x)" in text
    res = json.loads(out.read_text())
    assert res["mamba2_vs_pytorch"] == pytest.approx(1.25)
    assert [r.get("anchor") for r in res["presets"]] == [None, "pytorch+mamba_ssm"]


def test_bench_train_all_gives_the_anchor_time_to_autotune(tmp_path, monkeypatch, capsys):
    """--preset-timeout 80 (enough for our preset) killed the anchor during mamba_ssm's ~80 s autotuning on an
    H100: the anchor gets at least ANCHOR_MIN_TIMEOUT."""
    calls, timeouts = [], []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls, timeouts=timeouts))
    bench_train.main(["--all", "--only", "mamba2:gpu_340m", "--no-anchor", "--mamba-anchor", str(tmp_path),
                      "--preset-timeout", "80"])
    assert timeouts == [80.0, bench_train.ANCHOR_MIN_TIMEOUT] and bench_train.ANCHOR_MIN_TIMEOUT >= 200


def test_bench_train_all_keeps_a_failed_anchor_as_a_row(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls, anchor_rc=2))
    rc = bench_train.main(["--all", "--only", "mamba2:gpu_340m", "--no-anchor", "--mamba-anchor", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 1
    assert "| mamba2:gpu_340m (PyTorch + mamba_ssm Triton, conv1d torch fallback) | failed: error: no CUDA" in text
    assert "vs the PyTorch anchor: n/a (a row failed) (goal >= 1.3x)" in text


def test_bench_train_all_runs_no_anchor_when_off_or_preset_absent(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "run", _fake_run(calls))
    bench_train.main(["--all", "--only", "mamba2:gpu_340m", "--no-anchor", "--mamba-anchor", "none"])
    assert [c[2] for c in calls] == ["tools.bench_train"]
    assert "PyTorch anchor" not in capsys.readouterr().out
    assert bench_train.mamba_anchor_src("none") is None and bench_train.mamba_anchor_src("x/y") == "x/y"
    assert bench_train.mamba_anchor_src(None) == (bench_train.MAMBA_ANCHOR_SRC
                                                  if os.path.isdir(bench_train.MAMBA_ANCHOR_SRC) else None)


def test_bench_train_all_starts_no_backend_before_the_anchor_runs():
    """The PyTorch anchor's process needs the GPU's memory too: the --all parent must not have initialised a JAX
    backend when it starts (as for the presets)."""
    code = """
import subprocess, sys
from jax._src import xla_bridge
from tools import bench_train
seen = []
def fake_run(cmd, **kw):
    seen.append((cmd[2], xla_bridge.backends_are_initialized()))
    return subprocess.CompletedProcess(cmd, 1, "", "failed")
subprocess.run = fake_run
bench_train.main(["--all", "--only", "mamba2:gpu_340m", "--mamba-anchor", "/nonexistent"])
print("SEEN", seen)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "SEEN [('tools.bench_train', False), ('tools.bench_mamba_torch', False)]" in p.stdout, p.stdout + p.stderr
