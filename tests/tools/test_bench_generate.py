"""tools.bench_generate runs end to end on CPU at a tiny size (ours only; the HF anchor needs a GPU)."""
import json

import pytest

from tools import bench_generate


def test_bench_generate_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "gen.json"
    argv = ["--recipe", "dense_lm", "--preset", "default", "--batch", "1,2", "--prompt-len", "6", "--new-tokens", "3",
            "--reps", "1", "--unroll", "2", "--no-anchor", "--out", str(out), "--set", "model.num_layers=1",
            "--set", "model.d_model=32", "--set", "model.layer_pattern.0.head_dim=8",
            "--set", "model.ffn_pattern.0.mlp_dim=32"]
    assert bench_generate.main(argv) == 0
    rows = json.loads(out.read_text())
    for b in (1, 2):
        ours = rows[f"batch{b}"]["ours"]
        assert ours["prefill_tok_s"] > 0 and ours["decode_tok_s"] > 0 and "hf" not in rows[f"batch{b}"]
    assert "skipped" in rows["anchor"]["note"] and rows["unroll"] == 2
    assert "| batch | prefill tok/s | decode tok/s |" in capsys.readouterr().out


def test_bench_generate_keeps_our_rows_when_the_hf_anchor_fails(tmp_path, monkeypatch, capsys):
    """An anchor that raises mid-run (on the GPU image: torch.compile's Triton without a cache directory) is
    recorded per batch; our numbers and the table stay."""
    def broken_anchor(*a, **k):
        raise RuntimeError("Could not create or locate cache dir")

    monkeypatch.setattr(bench_generate, "hf_anchor_setup", lambda *a: (object(), None, {"model_type": "llama"}))
    monkeypatch.setattr(bench_generate, "time_hf", broken_anchor)
    out = tmp_path / "gen.json"
    argv = ["--recipe", "dense_lm", "--preset", "default", "--batch", "1", "--prompt-len", "6", "--new-tokens", "3",
            "--reps", "1", "--out", str(out), "--set", "model.num_layers=1", "--set", "model.d_model=32",
            "--set", "model.layer_pattern.0.head_dim=8", "--set", "model.ffn_pattern.0.mlp_dim=32"]
    assert bench_generate.main(argv) == 0
    row = json.loads(out.read_text())["batch1"]
    assert row["ours"]["decode_tok_s"] > 0 and "hf" not in row
    assert row["anchor_error"] == "HF anchor failed: RuntimeError: Could not create or locate cache dir"
    assert "| - | - | anchor failed |" in capsys.readouterr().out


def test_bench_generate_vs_recompute_ebt_candidates(tmp_path, capsys):
    """--vs-recompute times Task.generate cached and recomputed for the EBT (no HF export), with --candidates."""
    out = tmp_path / "gen.json"
    argv = ["--recipe", "ebt", "--preset", "text", "--batch", "1", "--prompt-len", "5", "--new-tokens", "3",
            "--reps", "1", "--no-anchor", "--vs-recompute", "--candidates", "2", "--out", str(out),
            "--set", "model.num_layers=1", "--set", "model.d_model=32", "--set", "model.layer_pattern.0.head_dim=8",
            "--set", "model.ffn_pattern.0.mlp_dim=32"]
    assert bench_generate.main(argv) == 0
    g = json.loads(out.read_text())["batch1"]["generate"]
    assert g["cached"]["tok_s"] > 0 and g["recompute"]["tok_s"] > 0 and g["speedup"] > 0
    assert "cached vs recompute" in capsys.readouterr().out


def test_bench_generate_candidates_needs_a_generate_that_takes_them():
    with pytest.raises(SystemExit, match="LanguageModel.generate takes no num_candidates"):
        bench_generate.main(["--recipe", "dense_lm", "--preset", "default", "--no-anchor", "--vs-recompute",
                             "--candidates", "2"])


def test_bench_generate_all_one_table_from_its_preset_processes():
    """--all runs each preset in its own process (faked here: it writes the preset's JSON or fails) without
    initialising a device backend in the parent first, and prints one table: per batch, ours and HF's decode and
    their ratio, the anchor's skip note where there is none, the failure's last line for a failed preset."""
    import os
    import subprocess
    import sys

    code = """
import json, subprocess, sys
from jax._src import xla_bridge
from tools import bench_generate
seen = []
def fake_run(cmd, **kw):
    seen.append(xla_bridge.backends_are_initialized())
    preset = cmd[cmd.index("--preset") + 1]
    if preset == "gpu_340m":
        return subprocess.CompletedProcess(cmd, 1, "", "RESOURCE_EXHAUSTED: out of memory")
    ours = {"prefill_tok_s": 1000.0, "decode_tok_s": 700.0, "decode_ms_per_step": 1.43}
    row = {"anchor": {"note": "HF anchor skipped: no export"}, "batch1": {"ours": ours}}
    if preset == "deepseek_v3_gpu":
        row["batch1"]["anchor_error"] = "HF anchor failed: RuntimeError: no cache dir"
    if preset == "gpu_1b":
        row["batch1"]["hf"] = {"decode_tok_s": 350.0}
        row["batch1"]["decode_speedup_vs_hf"] = 2.0
    json.dump(row, open(cmd[cmd.index("--out") + 1], "w"))
    return subprocess.CompletedProcess(cmd, 0, "", "")
subprocess.run = fake_run
only = "dense_lm:gpu_1b,ebt:gpu,mamba2:gpu_340m,moe:deepseek_v3_gpu"
rc = bench_generate.main(["--all", "--only", only, "--batch", "1"])
print("SEEN", seen, "RC", rc)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = p.stdout
    assert "SEEN [False, False, False, False] RC 1" in out, out + p.stderr
    assert "| dense_lm:gpu_1b | 1 | 1000 | 700 | 1.43 | 350 | 2.00x |" in out, out
    assert "| ebt:gpu | 1 | 1000 | 700 | 1.43 | - | HF anchor skipped: no export |" in out, out
    assert "| mamba2:gpu_340m | failed: RESOURCE_EXHAUSTED: out of memory |" in out, out
    assert "| moe:deepseek_v3_gpu | 1 | 1000 | 700 | 1.43 | - | HF anchor failed: RuntimeError: no cache dir |" \
        in out, out


def test_bench_generate_all_only_rejects_an_unknown_entry():
    with pytest.raises(SystemExit, match=r"--only dense_lm:nope not in ALL"):
        bench_generate.main(["--all", "--only", "dense_lm:nope"])
