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
