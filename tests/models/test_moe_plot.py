"""tools.plot_moe on a synthetic metrics.jsonl."""
import json

import numpy as np

from tools import plot_moe


def test_plot_moe_writes_png(tmp_path):
    r = np.random.default_rng(0)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(0, 50, 5):
            rec = {"step": step, "train/loss": 1.0}
            for layer in ("decoder/layer_1/moe", "decoder/layer_3/moe"):
                load = r.dirichlet(np.ones(8) * (1 + step))
                rec[f"train/{layer}/expert_load"] = load.tolist()
            f.write(json.dumps(rec) + "\n")
        f.write("\n")
    loads = plot_moe.read_loads(str(tmp_path / "metrics.jsonl"))
    assert list(loads) == ["train/decoder/layer_1/moe", "train/decoder/layer_3/moe"]
    steps, vals = loads["train/decoder/layer_1/moe"]
    assert steps == list(range(0, 50, 5)) and np.asarray(vals).shape == (10, 8)
    assert plot_moe.main([str(tmp_path)]) == 0
    png = (tmp_path / "moe_expert_load.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plot_moe_errors(tmp_path, capsys):
    assert plot_moe.main([str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n")
    assert plot_moe.main([str(tmp_path)]) == 2
    assert "no '*/expert_load'" in capsys.readouterr().err
