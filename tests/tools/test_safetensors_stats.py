"""tools.export_safetensors / tools.import_safetensors carry the `stats` collection: a MoE model's aux-loss-free
routing bias round-trips, so the imported run computes the same logits (issue 17 item 3)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.hf_interop import project_logits


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A moe-recipe run with random params and routing biases large enough to change which experts are chosen."""
    import jax

    from axlearn_like.state_setup import build_state_setup
    from recipes import moe
    from tools import export_safetensors
    from tools.import_safetensors import write_run

    w = tmp_path_factory.mktemp("st_stats")
    cfg = moe.config()
    state = build_state_setup(cfg).abstract_state
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.2).astype(np.float32), state.params)
    stats = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), state.stats)
    write_run(str(w / "run"), cfg, params, source="test", stats=stats)
    tokens = rng.randint(0, cfg.model.vocab_size, (2, 16))
    assert export_safetensors.main([str(w / "run"), str(w / "export")]) == 0  # once; tests damage copies of it
    return w, tokens, project_logits(str(w / "run"), tokens)


def _export_copy(w, name: str) -> str:
    """A copy of the module's export folder -> path of its model.safetensors."""
    import shutil

    shutil.copytree(w / "export", w / name)
    return str(w / name / "model.safetensors")


def test_moe_round_trip_keeps_the_routing_bias(moe_run):
    from axlearn_like import checkpoint
    from tools import import_safetensors
    from tools.export_safetensors import STATS_PREFIX

    w, tokens, logits = moe_run
    names = import_safetensors.read_safetensors(str(w / "export" / "model.safetensors"))
    assert any(n.startswith(STATS_PREFIX) and n.endswith(".router.bias") for n in names)
    assert import_safetensors.main([str(w / "export"), str(w / "back")]) == 0
    a, b = checkpoint.load(str(w / "run"))[1]["stats"], checkpoint.load(str(w / "back"))[1]["stats"]
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) > 0 and all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert np.array_equal(logits, project_logits(str(w / "back"), tokens))


def test_a_file_without_stats_imports_with_a_note_and_the_bias_matters(moe_run, capsys):
    """An export written without stats (as before) still imports, says so, and its logits differ: the bias
    changes the routing, so dropping it is the data loss the round trip above prevents."""
    from safetensors.numpy import load_file, save_file

    from tools import import_safetensors
    from tools.export_safetensors import STATS_PREFIX

    w, tokens, logits = moe_run
    path = _export_copy(w, "export2")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith(STATS_PREFIX)}, path)
    capsys.readouterr()
    assert import_safetensors.main([str(w / "export2"), str(w / "nostats")]) == 0
    assert "holds no stats tensors" in capsys.readouterr().out
    diff = np.abs(logits - project_logits(str(w / "nostats"), tokens)).max()
    assert diff > 1e-3


def test_stats_names_must_match(moe_run, capsys):
    from safetensors.numpy import load_file, save_file

    from tools import import_safetensors
    from tools.export_safetensors import STATS_PREFIX

    w, _, _ = moe_run
    path = _export_copy(w, "export3")
    flat = load_file(path)
    drop = next(k for k in flat if k.startswith(STATS_PREFIX))
    save_file({k: v for k, v in flat.items() if k != drop}, path)
    capsys.readouterr()
    assert import_safetensors.main([str(w / "export3"), str(w / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and drop in err


@pytest.mark.parametrize("config,needle", [
    ({"model_type": "llama", "hidden_size": 8}, "is a Hugging Face model folder (model_type 'llama'); import it with "
                                                "python -m tools.import_hf"),
    ({"architectures": ["X"], "hidden_size": 8}, "is not a saved axlearn_like config"),
    ({"_type": "models.decoder:DecoderConfig"}, "holds a DecoderConfig, not an experiment config"),
    ([1, 2], "is not a saved axlearn_like config"),
])
def test_foreign_folders_are_one_line_errors(tmp_path, capsys, config, needle):
    """A folder that is not an export of this project (an HF folder, a foreign config.json, a config of a model
    rather than of a run) is one error line, never a traceback (it used to be `AttributeError: 'dict' object
    has no attribute 'run_dir'`)."""
    import json

    from safetensors.numpy import save_file

    from tools import import_safetensors

    d = tmp_path / "in"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file({"a": np.zeros(3, np.float32)}, str(d / "model.safetensors"))
    assert import_safetensors.main([str(d), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "run").exists()
