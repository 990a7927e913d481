"""Mamba-2 (`Mamba2ForCausalLM`) <-> the mamba2 recipe with mixer-only blocks, against transformers itself.

Cases: the mamba2-130m layout (n_groups 1, tied, float32) and n_groups 2 (untied, bf16, sharded). For
n_groups > 1 the reference is transformers with its gated norm normalising per group as its CUDA kernels
and mamba_ssm do (tests/hf_side.py "mamba2_group_norm"); its CPU path normalises all of d_inner, and a test
pins that this differs. Then export -> from_pretrained(OUT) logits and bit-equal tensors, a project-run
round trip, and one-line errors.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.hf_interop import (
    assert_export_reloads,
    assert_hf_loaded,
    assert_same_run,
    hf_jobs,
    project_logits,
    random_run,
)

BASE = dict(model_type="mamba2", vocab_size=300, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16,
            num_heads=8, expand=2, conv_kernel=4, chunk_size=8, layer_norm_epsilon=1e-5)
CASES = {
    "m130m_layout": (dict(BASE, n_groups=1, tie_word_embeddings=True), "float32", None, None),
    "groups2_bf16_sharded": (dict(BASE, n_groups=2, tie_word_embeddings=False), "bfloat16", "40KB",
                             "mamba2_group_norm"),
}
TOKENS = np.random.RandomState(0).randint(0, 300, (2, 19)).tolist()  # 19: chunks of 8 plus a partial one


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tools.hf.common import export_hf, import_hf

    w = str(tmp_path_factory.mktemp("hf_mamba2"))
    jobs = [dict(op="build", config=c, dir=f"{w}/{k}", dtype=dt, max_shard_size=shard, patch=patch, tokens=TOKENS,
                 logits=f"{w}/{k}.ref.npy") for k, (c, dt, shard, patch) in CASES.items()]
    jobs.append(dict(op="logits", dir=f"{w}/groups2_bf16_sharded", tokens=TOKENS, logits=f"{w}/cpu_path.npy"))
    built = hf_jobs(jobs, f"{w}/hf1")
    ours = {}
    for k in CASES:
        import_hf(f"{w}/{k}", f"{w}/{k}.run")
        ours[k] = project_logits(f"{w}/{k}.run", TOKENS)
        export_hf(f"{w}/{k}.run", f"{w}/{k}.out")
    # project run (mixer-only mamba2 recipe) -> export
    random_run("mamba2", f"{w}/project.run", ["model.ffn_pattern=models.kinds:NoFFNConfig", "model.vocab_size=300",
                                              "model.layer_pattern.mamba2.ngroups=2"])
    ours["project"] = project_logits(f"{w}/project.run", TOKENS)
    export_hf(f"{w}/project.run", f"{w}/project.out")
    jobs = [dict(op="logits", dir=f"{w}/{k}.out", tokens=TOKENS, logits=f"{w}/{k}.out.npy", patch=CASES[k][3])
            for k in CASES]
    jobs.append(dict(op="logits", dir=f"{w}/project.out", tokens=TOKENS, logits=f"{w}/project.out.npy",
                     patch="mamba2_group_norm"))
    reloaded = hf_jobs(jobs, f"{w}/hf2")
    import_hf(f"{w}/project.out", f"{w}/project.back")
    return dict(dir=w, built=dict(zip(CASES, built)), ours=ours, reloaded=dict(zip([*CASES, "project"], reloaded)))


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_hf_logits(work, case):
    ref = np.load(f"{work['dir']}/{case}.ref.npy")
    assert_hf_loaded(work["built"][case])
    assert np.abs(work["ours"][case] - ref).max() <= 1e-4
    assert ref.std() > 0.05


def test_cpu_path_of_transformers_ignores_groups(work):
    """Why the n_groups > 1 reference is patched: transformers' CPU gated norm is over all of d_inner."""
    w = work["dir"]
    cpu = np.load(f"{w}/cpu_path.npy")
    assert np.abs(cpu - np.load(f"{w}/groups2_bf16_sharded.ref.npy")).max() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_hf_with_same_logits_and_tensors(work, case):
    w = work["dir"]
    out = assert_export_reloads(w, case, work["reloaded"][case], "Mamba2ForCausalLM")
    for key, value in CASES[case][0].items():
        assert out[key] == value, key


def test_imported_model_is_mixer_only(work):
    from axlearn_like import checkpoint
    from models.kinds import NoFFNConfig

    _, variables, cfg = checkpoint.load(f"{work['dir']}/m130m_layout.run")
    assert all(type(f) is NoFFNConfig for f in cfg.model.ffn_pattern) and cfg.model.tie_embeddings
    assert set(variables["params"]["stack"]["layer_0"]) == {"mixer_norm", "mixer"}
    assert cfg.model.norm_eps == 1e-5 and cfg.model.layer_pattern[0].ngroups == 1


def test_round_trip_from_a_project_run(work):
    w = work["dir"]
    assert_hf_loaded(work["reloaded"]["project"])
    assert np.abs(np.load(f"{w}/project.out.npy") - work["ours"]["project"]).max() <= 1e-4
    assert_same_run(f"{w}/project.run", f"{w}/project.back")


@pytest.mark.parametrize("config,needle", [
    (dict(use_bias=True), "use_bias"),
    (dict(use_conv_bias=False), "use_conv_bias"),
    (dict(time_step_limit=[0.0, 0.1]), "time_step_limit"),
    (dict(num_heads=4), "num_heads"),
])
def test_unsupported_fields_are_one_line_errors(tmp_path, capsys, config, needle):
    from tools import import_hf
    from tools.hf.common import write_safetensors

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**BASE, "n_groups": 1, **config}))
    write_safetensors(str(d / "model.safetensors"), {"backbone.embeddings.weight": np.zeros((4, 4), np.float32)})
    assert import_hf.main([str(d), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_mamba2_with_mlp_is_not_a_mamba2_export(tmp_path):
    from recipes import mamba2 as recipe
    from tools.hf import mamba2

    assert "granitemoehybrid" in mamba2.accepts(recipe.config().model)
