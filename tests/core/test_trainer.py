"""In-process trainer tests on 8 simulated CPU devices: sharding follows the rules, a sharded run matches a
1-device run, non-finite steps never reach the state, user errors are one line."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from axlearn_like import cli, params as params_lib, sharding as sharding_lib, trainer
from axlearn_like.data import make_iterator
from axlearn_like.evaluation import global_batch
from axlearn_like.state_setup import is_axes, sharding_for
from recipes import dense_lm
from tests.core import helpers


def _setup(cfg, devices):
    mesh = sharding_lib.make_mesh(cfg.mesh, devices=devices)
    setup = trainer.build_state_setup(cfg, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
        step, batch_sh = trainer.make_train_step(setup, cfg)
        state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.PRNGKey(0))
    return setup, step, batch_sh, state


@pytest.fixture(scope="module")
def single():
    """One compiled 1-device setup shared by several tests (compiles dominate this file's time)."""
    cfg = helpers.tiny_config(["mesh.data=1"])
    setup, step, batch_sh, state = _setup(cfg, jax.devices()[:1])
    return cfg, setup, step, batch_sh, jax.tree.map(np.asarray, state)


def _fresh(single):
    cfg, setup, step, batch_sh, host_state = single
    return jax.device_put(host_state, setup.state_sharding)


def _batches(cfg, n):
    it = make_iterator(cfg.data, split="train")
    return [next(it) for _ in range(n)]


def test_params_and_batch_are_sharded_as_the_rules_say():
    assert jax.device_count() == 8
    cfg = helpers.tiny_config(["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
    setup, step, batch_sh, state = _setup(cfg, jax.devices())
    boxed = jax.eval_shape(lambda: setup.task.init(
        jax.random.PRNGKey(0), {k: jnp.zeros(v.shape, v.dtype) for k, v in setup.batch_spec.items()}))
    axes = params_lib.logical_axes(boxed["params"])
    split = 0
    for (path, ax), leaf in zip(jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)[0],
                                jax.tree.leaves(state.params)):
        want = sharding_for(leaf.shape, ax, setup.mesh, setup.rules).spec
        assert leaf.sharding.spec == want, (jax.tree_util.keystr(path), ax, leaf.sharding.spec, want)
        if "embed" in ax and leaf.shape[ax.index("embed")] % 4 == 0:
            assert "fsdp" in str(want), (path, want)
        if leaf.addressable_shards[0].data.shape != leaf.shape:
            split += 1
    assert split >= 3, "expected several parameters to be split across devices"
    batch = global_batch(_batches(cfg, 1)[0], batch_sh)
    assert batch["inputs"].sharding.spec == P(("fsdp",), None) or batch["inputs"].sharding.spec == P("fsdp", None)
    assert batch["inputs"].addressable_shards[0].data.shape[0] == cfg.data.global_batch_size // 4


def test_sharded_run_matches_single_device(single):
    cfg8 = helpers.tiny_config(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    batches = _batches(cfg8, 3)
    out = {}
    for name in ("8", "1"):
        if name == "8":
            setup, step, batch_sh, state = _setup(cfg8, jax.devices())
        else:
            _, setup, step, batch_sh, _ = single
            state = _fresh(single)
        losses = []
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            for b in batches:
                state, m = step(state, global_batch(b, batch_sh))
                losses.append(float(m["objective"]))
        out[name] = losses
    np.testing.assert_allclose(out["8"], out["1"], rtol=1e-5)


def test_grad_accumulation_matches_one_big_batch(single):
    base = single[0]
    acc = helpers.tiny_config(["mesh.data=1", "trainer.grad_accum=2"])
    batches = _batches(base, 2)
    res = {}
    for name, cfg in (("base", base), ("acc", acc)):
        if name == "base":
            _, setup, step, batch_sh, _ = single
            state = _fresh(single)
        else:
            setup, step, batch_sh, state = _setup(cfg, jax.devices()[:1])
        norms = []
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            for b in batches:
                state, m = step(state, global_batch(b, batch_sh))
                norms.append(float(m["grad_norm"]))
        res[name] = (float(m["objective"]), jax.tree.leaves(state.params)[0], norms)
    np.testing.assert_allclose(res["acc"][0], res["base"][0], rtol=2e-3)
    np.testing.assert_allclose(res["acc"][1], res["base"][1], rtol=1e-3, atol=1e-5)
    # the gradient itself, before clipping and Adam (which hide its scale from the params): the mean over
    # micro-batches is the big batch's gradient
    np.testing.assert_allclose(res["acc"][2], res["base"][2], rtol=2e-3)


def test_nonfinite_step_leaves_state_untouched(single):
    cfg, setup, step, batch_sh, _ = single
    state = _fresh(single)
    b = dict(_batches(cfg, 1)[0])
    b["loss_mask"] = b["loss_mask"].copy()
    b["loss_mask"][0, 0] = np.nan
    before = jax.tree.map(np.asarray, state.params)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        state, m = step(state, global_batch(b, batch_sh))
    assert not bool(m["finite"])
    assert int(state.step) == 1
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_bf16_params_with_float32_masters(single, tmp_path):
    """optimizer.param_dtype=bfloat16: params stored in bf16, float32 masters in the optimizer state, params ==
    bf16(master) bit for bit after every step, the loss tracks the float32 run, and a checkpoint restores both
    exactly (2 devices: the masters take the params' shardings), and safetensors export/import carries the
    masters."""
    from axlearn_like import config as config_lib
    from axlearn_like.checkpoint import CheckpointConfig, Checkpointer, checkpoint_dir, load
    from axlearn_like.optimizers import MasterWeightsState
    from tools import export_safetensors, import_safetensors

    cfg = helpers.tiny_config(["mesh.data=-1", "optimizer.param_dtype=bfloat16"])  # -1: 2 here, 8 on load
    setup, step, batch_sh, state = _setup(cfg, jax.devices()[:2])
    _, base_setup, base_step, base_sh, _ = single
    base = _fresh(single)
    batches = _batches(cfg, 3)
    with jax.set_mesh(base_setup.mesh), nn.logical_axis_rules(base_setup.rules):
        for b in batches:
            base, bm = base_step(base, global_batch(b, base_sh))
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        for b in batches:
            state, m = step(state, global_batch(b, batch_sh))
            master = state.opt_state.master
            assert isinstance(state.opt_state, MasterWeightsState)
            for p, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(master)):
                assert p.dtype == jnp.bfloat16 and w.dtype == jnp.float32
                np.testing.assert_array_equal(np.asarray(p), np.asarray(w.astype(jnp.bfloat16)))
                assert p.sharding == w.sharding
    assert float(m["objective"]) == pytest.approx(float(bm["objective"]), rel=2e-2)
    # the masters moved by less than bf16's resolution somewhere: they are not just the bf16 params again
    assert any(np.any(np.asarray(w) != np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32)))
               for w in jax.tree.leaves(state.opt_state.master))
    run = tmp_path / "run"
    ck = Checkpointer(checkpoint_dir(str(run)), CheckpointConfig(async_save=False))
    ck.save(3, state, None, config_lib.to_dict(cfg), {})
    restored = ck.restore(3, setup.abstract_state)
    ck.close()
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # safetensors export carries the float32 masters; importing them gives the same masters and bf16 params
    export_safetensors.export(str(run), str(tmp_path / "st"))
    import_safetensors.import_(str(tmp_path / "st"), str(tmp_path / "imported"), step=0)
    _, back, _ = load(str(tmp_path / "imported"), masters=True)
    _, back_params, _ = load(str(tmp_path / "imported"))
    for w, b, p in zip(jax.tree.leaves(state.opt_state.master), jax.tree.leaves(back["params"]),
                       jax.tree.leaves(back_params["params"])):
        np.testing.assert_array_equal(np.asarray(w), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(w.astype(jnp.bfloat16)), np.asarray(p))


def _cli(argv, capsys):
    code = cli.main(dense_lm.config, argv, presets=dense_lm.PRESETS)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("sets, fragment", [
    (["data.paths=/definitely/not/here/*.txt"], "data.paths"),
    (["data.seq_len=100000000", "data.max_bytes=20000"], "seq_len"),
    (["data.global_batch_size=6", "mesh.data=-1"], "divisible"),
    (["mesh.data=3", "mesh.fsdp=1"], "mesh"),
    (["model.layer_pattern.attention.num_heads=5"], "num_heads"),
    (["trainer.nan_policy=ignore"], "trainer.nan_policy"),
    (["optimizer.param_dtype=float16"], "optimizer.param_dtype"),
    (["model.no_such_field=1"], "unknown config key"),
    (['trainer.xla_options={"xla_gpu_enable_triton_gemmm": false}'], "trainer.xla_options: "),
    (['trainer.xla_options={"xla_gpu_enable_triton_gemm": "maybe"}'], "trainer.xla_options: "),
])
def test_user_errors_are_one_line(sets, fragment, capsys, tmp_path):
    argv = ["--run-dir", str(tmp_path / "r")]
    for s in helpers.TINY + sets:
        argv += ["--set", s]
    code, err = _cli(argv, capsys)
    assert code == 2, err
    assert err.startswith("error:") and "\n" not in err and fragment in err, err


def test_xla_options_reach_the_compiled_train_and_eval_steps(tmp_path):
    """trainer.xla_options go to XLA with the steps: an xla_dump_to there makes XLA write both modules."""
    cfg = helpers.tiny_config(["mesh.data=1", f'trainer.xla_options={{"xla_dump_to": "{tmp_path}"}}'])
    setup, step, batch_sh, state = _setup(cfg, jax.devices()[:1])
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        batch = global_batch(_batches(cfg, 1)[0], batch_sh)
        state, _ = step(state, batch)
        trainer.make_eval_step(setup, batch_sh, cfg.trainer.xla_options)(state, batch)
    dumped = " ".join(os.listdir(tmp_path))
    assert "jit_train_step" in dumped and "jit_eval_step" in dumped, dumped


def test_unwritable_run_dir_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["--run-dir", str(blocker / "sub")]
    for s in helpers.TINY:
        argv += ["--set", s]
    code, err = _cli(argv, capsys)
    assert code == 2 and "not writable" in err and "\n" not in err, err
    assert not os.path.exists(blocker / "sub")


def test_unknown_recipe_lists_recipes():
    r = helpers.run([helpers.sys.executable, "-m", "recipes", "nope"])
    assert r.returncode == 2 and "unknown recipe 'nope'" in r.stderr and "dense_lm" in r.stderr
