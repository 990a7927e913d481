"""MLA (models/mla.py): the DeepSeek-V2 equations in float64 NumPy, packed documents, logical axes, config errors.
The comparison with Hugging Face's DeepseekV2Attention / DeepseekV3Attention is in tests/tools/test_hf_deepseek.py."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axlearn_like.config import ConfigError, validate_tree
from axlearn_like.params import Param
from axlearn_like.sharding import DEFAULT_RULES
from models.layers import yarn_frequencies
from models.mla import MLA, MLAConfig
from tests.oracle import assert_close


def _init(cfg, dtype=jnp.float32, b=2, s=11, d=24, seed=0):
    m = MLA(cfg, dtype, init_std=0.3, out_init_std=0.3)
    x = jax.random.normal(jax.random.key(seed), (b, s, d), jnp.float32).astype(dtype)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    boxed = m.init(jax.random.key(seed + 1), x, positions=pos, segment_ids=None)
    params = jax.tree.map(lambda p: p.value, boxed["params"], is_leaf=lambda p: isinstance(p, nn.Partitioned))
    return m, x, pos, boxed, params


def np_mla(p, x, pos, seg, cfg: MLAConfig):
    """DeepSeek-V2 Eq. 9-19 written out per head in float64 (half-split RoPE, latent RMSNorms, YaRN factors)."""
    f = lambda t: np.asarray(t, np.float64)
    x, pos = f(x), np.asarray(pos)
    h, dn, dr, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    eps = cfg.latent_norm_eps

    def rms(t, w):
        return t / np.sqrt(np.mean(t * t, -1, keepdims=True) + eps) * f(w)

    if cfg.q_lora_rank is None:
        q = np.einsum("bsd,dhk->bshk", x, f(p["query"]["kernel"]))
    else:
        cq = rms(x @ f(p["q_a"]["kernel"]), p["q_a_norm"]["scale"])
        q = np.einsum("bsr,rhk->bshk", cq, f(p["q_b"]["kernel"]))
    kv_a = x @ f(p["kv_a"]["kernel"])
    ckv = rms(kv_a[..., :r], p["kv_a_norm"]["scale"])
    kv = np.einsum("bsr,rhk->bshk", ckv, f(p["kv_b"]["kernel"]))
    if cfg.rope_factor == 1.0:
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, dr, 2) / dr)
        a, scale = 1.0, 1.0 / np.sqrt(dn + dr)
    else:
        inv, a = (np.asarray(t, np.float64) for t in yarn_frequencies(
            dr, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_len, mscale=cfg.yarn_mscale,
            mscale_all_dim=cfg.yarn_mscale_all_dim))
        m = 0.1 * cfg.yarn_mscale_all_dim * np.log(cfg.rope_factor) + 1.0
        scale = m * m / np.sqrt(dn + dr)
    ang = pos[..., None] * inv  # [B, S, dr/2]
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]

    def rope(t):
        t1, t2 = t[..., : dr // 2], t[..., dr // 2:]
        return a * np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    b, s = x.shape[:2]
    qf = np.concatenate([q[..., :dn], rope(q[..., dn:])], -1)
    kr = rope(kv_a[:, :, None, r:])
    kf = np.concatenate([kv[..., :dn], np.broadcast_to(kr, (b, s, h, dr))], -1)
    vf = kv[..., dn:]
    logits = np.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    allowed = np.tril(np.ones((s, s), bool))[None, None]
    if seg is not None:
        seg = np.asarray(seg)
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    logits = np.where(allowed, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, vf)
    return np.einsum("bshv,hvd->bsd", o, f(p["out"]["kernel"]))


CASES = {
    "q_lora, v narrower": MLAConfig(num_heads=3, kv_lora_rank=10, q_lora_rank=14, qk_nope_head_dim=6,
                                    qk_rope_head_dim=4, v_head_dim=5),
    "full-rank q, v wider": MLAConfig(num_heads=2, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=2,
                                      qk_rope_head_dim=4, v_head_dim=9),
    "yarn, equal dims": MLAConfig(num_heads=2, kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=4, qk_rope_head_dim=8,
                                  v_head_dim=12, rope_factor=8.0, rope_original_max_len=64, yarn_mscale=0.9,
                                  yarn_mscale_all_dim=0.7),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mla_matches_numpy_equations(name, dtype):
    cfg = CASES[name]
    validate_tree(cfg)
    m, x, pos, _, params = _init(cfg, dtype)
    seg = jnp.array([[1] * 4 + [2] * 7, [3] * 11])
    pos = jnp.array([list(range(4)) + list(range(7)), list(range(11))], jnp.int32)
    out = jax.jit(lambda p, x: m.apply({"params": p}, x, positions=pos, segment_ids=seg))(params, x)
    assert out.shape == x.shape and out.dtype == dtype
    ref = np_mla(params, x.astype(jnp.float32), pos, seg, cfg)
    assert_close(out.astype(jnp.float32), ref, dtype, f"mla ({name})")


def test_packed_documents_do_not_see_each_other():
    cfg = CASES["q_lora, v narrower"]
    m, x, _, _, params = _init(cfg, s=10)
    a, b = x[:1, :4], x[:1, 4:]
    seg = jnp.array([[0] * 4 + [1] * 6])
    pos = jnp.array([list(range(4)) + list(range(6))], jnp.int32)
    packed = m.apply({"params": params}, x[:1], positions=pos, segment_ids=seg)
    alone = [m.apply({"params": params}, t, positions=jnp.arange(t.shape[1])[None], segment_ids=None) for t in (a, b)]
    np.testing.assert_allclose(np.asarray(packed), np.concatenate([np.asarray(t) for t in alone], 1), atol=2e-6)


def test_every_param_has_logical_axes_known_to_the_sharding_rules():
    known = {k for k, _ in DEFAULT_RULES}
    for cfg in CASES.values():
        _, _, _, boxed, _ = _init(cfg)
        leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda p: isinstance(p, nn.Partitioned))
        assert leaves and all(isinstance(p, Param) for p in leaves)
        names = {n for p in leaves for n in p.names}
        assert names <= set(cfg.logical_axes) and names <= known, names


def test_gradients_are_finite_and_reach_every_param():
    cfg = CASES["yarn, equal dims"]
    m, x, pos, _, params = _init(cfg)
    g = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, positions=pos, segment_ids=None) ** 2))(params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("field,value,needle", [
    ("qk_rope_head_dim", 5, "qk_rope_head_dim"),
    ("q_lora_rank", 0, "q_lora_rank"),
    ("rope_factor", 0.5, "rope_factor"),
    ("yarn_beta_slow", 64.0, "yarn_beta_slow"),
    ("implementation", "flash", "implementation"),
])
def test_config_errors_are_one_line_naming_the_field(field, value, needle):
    with pytest.raises(ConfigError) as e:
        validate_tree(dataclasses.replace(MLAConfig(), **{field: value}))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_extra_flops_count_qk_and_v_widths():
    cfg = MLAConfig(num_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    assert cfg.extra_flops(64, 100) == 3.0 * 100 * 4 * (12 + 6)
