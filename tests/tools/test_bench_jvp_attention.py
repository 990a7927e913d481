"""tools.bench_jvp_attention runs end to end on CPU (the xla rows; Triton and the cuDNN anchor need a GPU)."""
import json

from tools import bench_jvp_attention


def test_bench_writes_every_pass(tmp_path, capsys):
    out = tmp_path / "attn.json"
    assert bench_jvp_attention.main(["--shape", "1,24,2,1,16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    for name in bench_jvp_attention.UNITS:
        assert rows[f"xla_{name}_ms"] > 0
    assert "| xla | grad-of-jvp |" in capsys.readouterr().out
