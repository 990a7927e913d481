"""tools.bench_generate runs end to end on CPU at a tiny size (ours only; the HF anchor needs a GPU)."""
import json

from tools import bench_generate


def test_bench_generate_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "gen.json"
    argv = ["--recipe", "dense_lm", "--preset", "default", "--batch", "1,2", "--prompt-len", "6", "--new-tokens", "3",
            "--reps", "1", "--unroll", "2", "--no-anchor", "--out", str(out), "--set", "model.num_layers=1", "--set", "model.d_model=32",
            "--set", "model.layer_pattern.0.head_dim=8", "--set", "model.ffn_pattern.0.mlp_dim=32"]
    assert bench_generate.main(argv) == 0
    rows = json.loads(out.read_text())
    for b in (1, 2):
        ours = rows[f"batch{b}"]["ours"]
        assert ours["prefill_tok_s"] > 0 and ours["decode_tok_s"] > 0 and "hf" not in rows[f"batch{b}"]
    assert "skipped" in rows["anchor"]["note"] and rows["unroll"] == 2
    assert "| batch | prefill tok/s | decode tok/s |" in capsys.readouterr().out
