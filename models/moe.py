"""DeepSeek-style mixture of experts (DeepSeekMoE V1 2401.06066, V2 2405.04434, V3 2412.19437).

    h = sum_{s<K_s} FFN_s(u) + sum_i g_i FFN_i(u)        (the decoder adds the residual u)

Fine-grained routed SwiGLU experts plus always-on shared experts. Routing (`route`): V3 sigmoid or V1/V2
softmax affinities, group/device-limited selection, Top-K on score + bias (auxiliary-loss-free balancing,
Wang et al. 2408.15664), weights from the unbiased scores. The bias is a `RoutingBias` StepStatistic in
the `stats` collection: the training apply adds the micro-batch's expert load, the trainer's
`finalize(step)` applies b <- b + gamma * sign(mean(load) - load) once per optimizer step.

Dispatch: "grouped" sorts the (token, expert) assignments by expert and runs the experts as grouped
matmuls (kernels.grouped_matmul); with an `expert` mesh axis > 1 the experts are sharded over it and the
rows travel with two all-to-alls inside `jax.shard_map`. "dense" (every expert on every token, one-hot
combine) is the test reference only. See docs/notes/moe.md.
"""
from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from axlearn_like import sharding as shd
from axlearn_like.config import config_class, require
from axlearn_like.params import param_init
from axlearn_like.state import StepStatistic
from kernels.grouped_matmul import IMPLEMENTATIONS as GROUPED_MATMUL_IMPLEMENTATIONS, grouped_matmul
from models.kinds import FFNConfig, LayerContext, check_implementation

_SCORE_FUNCS = ("sigmoid", "softmax")
_GROUP_SCORES = ("top2_sum", "max")


# ----------------------------------------------------------------------------------------------- routing
def affinity(logits: jax.Array, score_func: str) -> jax.Array:
    """Token-to-expert affinity s [tokens, experts] in float32: sigmoid (V3) or softmax over experts (V1/V2)."""
    logits = logits.astype(jnp.float32)
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    if score_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    raise ValueError(f"route: score_func={score_func!r}; choose one of {_SCORE_FUNCS}")


def _check_route_args(num_experts, top_k, num_groups, topk_groups, group_score, score_func):
    if score_func not in _SCORE_FUNCS:
        raise ValueError(f"route: score_func={score_func!r}; choose one of {_SCORE_FUNCS}")
    if group_score not in _GROUP_SCORES:
        raise ValueError(f"route: group_score={group_score!r}; choose one of {_GROUP_SCORES}")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"route: num_groups={num_groups} must divide num_experts={num_experts}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"route: topk_groups={topk_groups} must lie in [1, num_groups={num_groups}]")
    per = num_experts // num_groups
    if num_groups > 1 and group_score == "top2_sum" and per < 2:
        raise ValueError(f"route: group_score='top2_sum' needs >= 2 experts per group, got {per}; use 'max'")
    if not 1 <= top_k <= topk_groups * per:
        raise ValueError(
            f"route: top_k={top_k} must lie in [1, topk_groups * experts_per_group = {topk_groups * per}]"
        )


def _route(logits, bias, *, top_k, score_func, num_groups, topk_groups, group_score, route_scale, normalize):
    """route() plus the affinities s [T, E] (for the balance losses and capacity ranking)."""
    t, e = logits.shape
    _check_route_args(e, top_k, num_groups, topk_groups, group_score, score_func)
    s = affinity(logits, score_func)
    biased = s if bias is None else s + jax.lax.stop_gradient(bias.astype(jnp.float32))[None, :]
    biased = jax.lax.stop_gradient(biased)  # selection only; weights come from s below
    if num_groups > 1:
        grouped = biased.reshape(t, num_groups, e // num_groups)
        if group_score == "top2_sum":
            gscore = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        else:
            gscore = jnp.max(grouped, axis=-1)
        _, gidx = jax.lax.top_k(gscore, topk_groups)
        gmask = jnp.sum(jax.nn.one_hot(gidx, num_groups, dtype=jnp.int32), axis=1) > 0  # [T, G]
        emask = jnp.repeat(gmask, e // num_groups, axis=1)
        biased = jnp.where(emask, biased, -jnp.inf)
    _, ids = jax.lax.top_k(biased, top_k)
    w = jnp.take_along_axis(s, ids, axis=-1)
    if normalize:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), (w * route_scale).astype(jnp.float32), s


def route(
    logits: jax.Array,
    bias: jax.Array | None,
    *,
    top_k: int,
    score_func: str = "sigmoid",
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
    route_scale: float = 1.0,
    normalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """DeepSeek gate. logits [T, E], bias [E] or None -> (expert_ids int32 [T, K], weights float32 [T, K]).

    s = sigmoid(logits) (V3) or softmax(logits) (V1/V2). Experts form `num_groups` contiguous groups; each
    group is scored on the biased scores s + b by "top2_sum" (V3) or "max" (V2) and the best `topk_groups`
    are kept; Top-K of s + b among their experts is selected. Weights g_i = s_i (unbiased), divided by
    their sum if `normalize`, times `route_scale`. The selection carries no gradient; the weights do.
    """
    ids, w, _ = _route(
        logits, bias, top_k=top_k, score_func=score_func, num_groups=num_groups, topk_groups=topk_groups,
        group_score=group_score, route_scale=route_scale, normalize=normalize,
    )
    return ids, w


def capacity_keep(ids: jax.Array, score: jax.Array, *, num_experts: int, num_devices: int, capacity: int):
    """Token dropping (V2): per device (contiguous block of num_experts/num_devices experts) keep the
    `capacity` assignments of highest affinity `score`; ties go to the earlier token.
    ids, score [T, K] -> keep bool [T, K]."""
    flat_dev = (ids // (num_experts // num_devices)).reshape(-1)
    flat_score = score.reshape(-1).astype(jnp.float32)
    order = jnp.lexsort((-flat_score, flat_dev))  # by device, then descending affinity (stable)
    sdev = flat_dev[order]
    counts = jnp.zeros((num_devices,), jnp.int32).at[flat_dev].add(1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(flat_dev.shape[0], dtype=jnp.int32) - starts[sdev]
    keep = jnp.zeros(flat_dev.shape, bool).at[order].set(rank < capacity)
    return keep.reshape(ids.shape)


# ------------------------------------------------------------------------------------------ bias state
class RoutingBias(StepStatistic):
    """Aux-loss-free balancing state. bias [E] f32 (added to scores for selection only), load [E] f32
    (assignments counted over this optimizer step's micro-batches, whole global batch)."""

    bias: jax.Array
    load: jax.Array
    gamma: float = flax.struct.field(pytree_node=False, default=1e-3)
    gamma_zero_after_step: int | None = flax.struct.field(pytree_node=False, default=None)

    def finalize(self, step: jax.Array) -> "RoutingBias":
        """b <- b + gamma(step) * sign(mean(load) - load); load <- 0. gamma(step) = 0 from
        `gamma_zero_after_step` on (V3 stops the update for its last tokens)."""
        gamma = jnp.float32(self.gamma)
        if self.gamma_zero_after_step is not None:
            gamma = jnp.where(step >= self.gamma_zero_after_step, 0.0, gamma)
        # Mean over experts only: under scan_layers the stats of all layers are stacked as [layers, E].
        delta = jnp.sign(jnp.mean(self.load, axis=-1, keepdims=True) - self.load)
        return self.replace(bias=self.bias + gamma * delta, load=jnp.zeros_like(self.load))


# ------------------------------------------------------------------------------------------------ config
@config_class
class MoEConfig(FFNConfig):
    """The "moe" FFN kind: a DeepSeek MoE layer. Defaults: a tiny V3-style layer (sigmoid gate, aux-loss-free
    bias)."""

    kind: ClassVar[str] = "moe"
    logical_axes: ClassVar[tuple[str, ...]] = ("embed", "expert", "expert_mlp", "mlp")

    num_experts: int = 8
    top_k: int = 2
    num_shared: int = 1
    expert_dim: int = 64  # width of one routed (and one shared) expert
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    num_groups: int = 1
    topk_groups: int = 1
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    route_scale: float = 1.0
    normalize: bool = True
    # None, or M: groups = the experts on each device of the `expert` mesh axis, keep the best M devices
    # (overrides num_groups/topk_groups whenever that axis has more than one device).
    device_limited_m: int | None = None
    capacity_factor: float | None = None  # None = dropless; else per-device capacity, training only
    gamma: float = 1e-3  # bias update speed; 0 disables aux-loss-free balancing
    # The router's init: None = fan-in scaling (std 1/sqrt(D)); DeepSeek-V2/V3 draw every parameter at std 0.006
    # (tried for balance in docs/results/moe_balance.md: more imbalanced at our sizes, so not a preset's choice).
    router_init_std: float | None = None
    gamma_zero_after_step: int | None = None
    seq_aux_alpha: float = 1e-4  # V3 Eq. 17-20
    expert_aux_alpha: float = 0.0  # V1/V2 expert-level
    device_aux_alpha: float = 0.0  # V1/V2 device-level
    comm_aux_alpha: float = 0.0  # V2 communication
    dispatch: Literal["grouped", "dense"] = "grouped"
    implementation: str | None = None  # grouped_matmul implementation (None = best for the backend)

    def validate(self) -> None:
        require(self.num_experts >= 1, "num_experts", "must be >= 1")
        require(1 <= self.top_k <= self.num_experts, "top_k", f"must lie in [1, num_experts={self.num_experts}]")
        require(self.num_shared >= 0, "num_shared", "must be >= 0")
        require(self.expert_dim >= 1, "expert_dim", "must be >= 1")
        require(self.num_groups >= 1 and self.num_experts % self.num_groups == 0, "num_groups",
                f"must divide num_experts={self.num_experts}")
        require(1 <= self.topk_groups <= self.num_groups, "topk_groups",
                f"must lie in [1, num_groups={self.num_groups}]")
        require(self.top_k <= self.topk_groups * (self.num_experts // self.num_groups), "top_k",
                "must be <= topk_groups * experts per group")
        require(self.device_limited_m is None or self.device_limited_m >= 1, "device_limited_m", "must be None or >= 1")
        require(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor", "must be None or > 0")
        require(self.gamma >= 0, "gamma", "must be >= 0")
        require(self.router_init_std is None or self.router_init_std > 0, "router_init_std", "must be None or > 0")
        check_implementation(self.implementation, GROUPED_MATMUL_IMPLEMENTATIONS, "grouped_matmul")

    def build(self, ctx: LayerContext, name: str) -> nn.Module:
        return MoE(self, d_model=ctx.d_model, dtype=ctx.dtype, name=name)

    def extra_flops(self, d_model: int, seq_len: int) -> float:
        """6 x params counts every routed expert; a token runs only top_k of them (3 matrices of D x F each)."""
        del seq_len
        return -6.0 * (self.num_experts - self.top_k) * 3 * d_model * self.expert_dim


# ------------------------------------------------------------------------------------------ expert math
def _swiglu_grouped(xs, w_gate, w_up, w_down, group_sizes, implementation):
    """Routed experts on rows sorted by expert: [A, D] -> [A, D] (rows past sum(group_sizes) give 0).
    Three grouped matmuls; SwiGLU in one XLA fusion (a fused gate+up kernel lost on the H200, notes)."""
    h = grouped_matmul(xs, w_gate, group_sizes, implementation=implementation)
    u = grouped_matmul(xs, w_up, group_sizes, implementation=implementation)
    a = jax.nn.silu(h) * u
    return grouped_matmul(a, w_down, group_sizes, implementation=implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch_rows(x, order, inv, k):
    """xs[i] = x[order[i] // k]: x [T, D], order a permutation of [T*k] -> [T*k, D]. The backward is the
    gather dx[t] = sum_j dxs[inv[t*k + j]] (inv = order^-1), not XLA's atomic scatter-add over [T*k, D]."""
    return x[order // k]


def _dispatch_fwd(x, order, inv, k):
    return x[order // k], (order, inv)


def _dispatch_bwd(k, res, g):
    order, inv = res
    t = inv.shape[0] // k
    dx = jnp.sum(g[inv].reshape(t, k, g.shape[1]).astype(jnp.float32), axis=1).astype(g.dtype)
    return dx, None, None


_dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _permute_rows(y, idx, inv):
    """y[idx] for a permutation idx of y's rows (inv = idx^-1); the backward is the gather g[inv]."""
    return y[idx]


_permute_rows.defvjp(lambda y, idx, inv: (y[idx], (idx, inv)), lambda res, g: (g[res[1]], None, None))


def _grouped_local(x, ids, w, w_gate, w_up, w_down, implementation):
    """Sort-based dispatch on one device (or under pjit sharding propagation). x [T, D], ids/w [T, K]
    (w already zero where dropped; dropped ids are num_experts, so they sort last and cost nothing).

    Gather-only data movement: rows go to expert order through `order` and come back through its inverse;
    the combine is a weighted sum over each token's K rows (no scatter-add in forward or backward)."""
    t, k = ids.shape
    e = w_gate.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
    # compare-and-count (one reduce fusion) instead of 49152 atomic adds onto 64 addresses; id e (dropped)
    # matches no expert
    gs = jnp.sum(flat[:, None] == jnp.arange(e, dtype=flat.dtype)[None, :], axis=0, dtype=jnp.int32)
    y = _swiglu_grouped(_dispatch_rows(x, order, inv, k), w_gate, w_up, w_down, gs, implementation)
    y_tok = _permute_rows(y, inv, order).reshape(t, k, -1)  # row t*k + j: token t's j-th expert
    # multiply + reduce over K (one XLA fusion; an einsum would become a tiny batched dot)
    return jnp.sum(y_tok.astype(jnp.float32) * w[:, :, None], axis=1)


def _dense_reference(x, ids, w, w_gate, w_up, w_down):
    """Every expert on every token, combined by the one-hot routing weights (test reference)."""
    t = x.shape[0]
    e = w_gate.shape[0]
    combine = jnp.zeros((t, e + 1), jnp.float32).at[jnp.arange(t)[:, None], ids].add(w)[:, :e]
    cd = x.dtype
    h = jnp.einsum("td,edf->etf", x, w_gate.astype(cd), preferred_element_type=jnp.float32)
    u = jnp.einsum("td,edf->etf", x, w_up.astype(cd), preferred_element_type=jnp.float32)
    a = (jax.nn.silu(h) * u).astype(cd)
    y = jnp.einsum("etf,efd->etd", a, w_down.astype(cd), preferred_element_type=jnp.float32)
    return jnp.einsum("te,etd->td", combine, y.astype(cd).astype(jnp.float32))


def _expert_parallel(x, ids, w, w_gate, w_up, w_down, *, token_axes, ep, slot, implementation):
    """Experts sharded on the `expert` mesh axis; rows exchanged with all-to-all (inside jax.shard_map).

    Per device: sort its assignments by destination device, pack them into [ep, slot, D] (slot = rows a
    device may send to one peer: all its assignments when dropless, min(that, capacity) when dropping),
    all_to_all, grouped matmuls over the local experts, all_to_all back, weighted combine.
    """
    e = w_gate.shape[0]
    e_loc = e // ep

    def body(x, ids, w, w_gate, w_up, w_down):
        t, k = ids.shape
        d = x.shape[1]
        flat = ids.reshape(-1)  # dropped assignments carry id e -> device ep (sent nowhere)
        order = jnp.argsort(flat, stable=True)
        skey = flat[order]
        sdev = skey // e_loc
        counts = jnp.zeros((ep,), jnp.int32).at[sdev].add(1, mode="drop")
        starts = jnp.cumsum(counts) - counts
        rank = jnp.arange(t * k, dtype=jnp.int32) - starts[jnp.minimum(sdev, ep - 1)]
        ok = (sdev < ep) & (rank < slot)
        dst = jnp.where(ok, sdev, ep)  # out of range -> dropped by the scatter
        tok = order // k
        send_x = jnp.zeros((ep, slot, d), x.dtype).at[dst, rank].set(x[tok], mode="drop")
        send_e = jnp.full((ep, slot), e_loc, jnp.int32).at[dst, rank].set(skey % e_loc, mode="drop")
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0).reshape(ep * slot, d)
        recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0).reshape(ep * slot)
        o2 = jnp.argsort(recv_e, stable=True)
        gs = jnp.zeros((e_loc,), jnp.int32).at[recv_e].add(1, mode="drop")
        y_sorted = _swiglu_grouped(recv_x[o2], w_gate, w_up, w_down, gs, implementation)
        y = jnp.zeros_like(y_sorted).at[o2].set(y_sorted).reshape(ep, slot, d)
        back = jax.lax.all_to_all(y, "expert", 0, 0)
        y_assign = back[jnp.minimum(sdev, ep - 1), jnp.minimum(rank, slot - 1)].astype(jnp.float32)
        wy = y_assign * jnp.where(ok, w.reshape(-1)[order], 0.0)[:, None]
        return jnp.zeros((t, d), jnp.float32).at[tok].add(wy)

    tspec = P(token_axes, None)
    wspec = P("expert", None, None)
    return jax.shard_map(body, in_specs=(tspec, tspec, tspec, wspec, wspec, wspec), out_specs=tspec)(
        x, ids, w, w_gate, w_up, w_down
    )


# ----------------------------------------------------------------------------------------- balance losses
def _fp(ids, s_norm, num_experts, top_k):
    """f_i = E/(K T) * #assignments to i, P_i = mean_t s'_{i,t}; ids [..., T, K], s_norm [..., T, E]."""
    t = ids.shape[-2]
    counts = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=(-3, -2))
    f = counts * num_experts / (top_k * t)
    p = jnp.mean(s_norm, axis=-2)
    return f, p


def maxvio(load) -> np.ndarray:
    """MaxVio (Wang et al. 2408.15664) = (max_i Load_i - mean Load) / mean Load over the last axis of load [..., E]."""
    load = np.asarray(load, np.float64)
    return load.max(-1) / np.maximum(load.mean(-1), 1e-30) - 1.0


def maxvio_global(mean_metrics: dict[str, Any]) -> dict[str, float]:
    """MaxVio_global: MaxVio of the expert loads counted over a whole eval set (not per batch), per MoE layer.

    mean_metrics: the eval metrics averaged over the eval batches; each MoE layer's "<path>/expert_load" (load
    fractions [E], or [layers, E] from a scanned stack) averages to the set's load fractions because every eval
    batch routes the same number of tokens. -> {"<path>/maxvio_global" (or "<path>/maxvio_global/<layer>"),
    "maxvio_global": mean over the MoE layers, "maxvio_global_max": their maximum}.
    """
    out, every = {}, []
    for key, load in mean_metrics.items():
        if not key.endswith("/expert_load"):
            continue
        path = key[: -len("expert_load")]
        vio = maxvio(load)
        if vio.ndim == 0:
            out[f"{path}maxvio_global"] = float(vio)
        else:
            out.update({f"{path}maxvio_global/{i}": float(v) for i, v in enumerate(vio)})
        every.extend(np.atleast_1d(vio).tolist())
    if every:
        out["maxvio_global"], out["maxvio_global_max"] = float(np.mean(every)), float(np.max(every))
    return out


def balance_losses(ids, s, *, cfg: MoEConfig, batch: int, num_devices: int, m: int) -> dict[str, jax.Array]:
    """Unweighted balance losses. ids [T, K], s [T, E] with T = batch * seq (sequence-major).

    sequence (V3 Eq. 17-20): mean over sequences of sum_i f_i P_i with s' = s / sum_j s_j and f from the
    actual (bias-influenced) assignment; expert (V1/V2): the same over the whole micro-batch; device:
    sum_d f'_d P'_d (f' = mean f over the device's experts, P' = sum P); communication (V2):
    sum_d f''_d P''_d with f''_d = D/(M T) * #tokens sending to device d, P'' = P'.
    "Devices" = the expert-parallel devices, or the routing groups without expert parallelism.
    """
    e, k = cfg.num_experts, cfg.top_k
    t_all = ids.shape[0]
    s_norm = s / (jnp.sum(s, axis=-1, keepdims=True) + 1e-20)
    out = {}
    if cfg.seq_aux_alpha:
        seq = t_all // batch
        f, p = _fp(ids.reshape(batch, seq, k), s_norm.reshape(batch, seq, e), e, k)
        out["seq"] = jnp.mean(jnp.sum(f * p, axis=-1))
    if cfg.expert_aux_alpha or cfg.device_aux_alpha or cfg.comm_aux_alpha:
        f, p = _fp(ids, s_norm, e, k)
        if cfg.expert_aux_alpha:
            out["expert"] = jnp.sum(f * p)
        p_dev = jnp.sum(p.reshape(num_devices, -1), axis=-1)
        if cfg.device_aux_alpha:
            out["device"] = jnp.sum(jnp.mean(f.reshape(num_devices, -1), axis=-1) * p_dev)
        if cfg.comm_aux_alpha:
            dev_hit = jnp.max(jax.nn.one_hot(ids // (e // num_devices), num_devices, dtype=jnp.float32), axis=-2)
            f2 = jnp.sum(dev_hit, axis=0) * num_devices / (m * t_all)
            out["comm"] = jnp.sum(f2 * p_dev)
    return out


# ------------------------------------------------------------------------------------------------ layer
def _expert_axis_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or "expert" not in mesh.axis_names:
        return 1
    return int(mesh.shape["expert"])


def _token_axes(ep: int) -> tuple[str, ...]:
    """Mesh axes the flattened tokens are split over inside the expert-parallel shard_map: the batch
    axes of the active logical rules, plus `expert` (each expert peer must hold different tokens)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules() or shd.DEFAULT_RULES
    spec = shd.logical_to_spec(("batch",), rules, mesh)[0]
    axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    return axes if "expert" in axes else axes + ("expert",)


class MoE(nn.Module):
    """DeepSeek MoE FFN: x [B, S, D] -> [B, S, D] (shared + routed experts; no residual).

    Variables: params gate [D, E], w_gate/w_up [E, D, F], w_down [E, F, D], shared_{gate,up} [D, K_s F],
    shared_down [K_s F, D]; stats router: RoutingBias. Sows intermediates aux_loss (weighted sum of the
    enabled balance losses) and metrics {expert_load [E], maxvio_batch, dropped_fraction, aux/*}.
    """

    config: MoEConfig
    d_model: int
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        b, s_len, d = x.shape
        if d != self.d_model:
            raise ValueError(f"MoE: input has d_model={d} but the layer was built with d_model={self.d_model}")
        e, k, f = cfg.num_experts, cfg.top_k, cfg.expert_dim
        ep = _expert_axis_size()
        if ep > 1 and e % ep:
            raise ValueError(f"MoE: num_experts={e} must be divisible by the expert mesh axis size {ep}")
        init3 = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                 batch_axis=(0,))
        init2 = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        init_gate = init2 if cfg.router_init_std is None else nn.initializers.normal(cfg.router_init_std)
        gate = self.param("gate", param_init(init_gate, ("embed", None)), (d, e), jnp.float32)
        w_gate = self.param("w_gate", param_init(init3, ("expert", "embed", "expert_mlp")), (e, d, f), jnp.float32)
        w_up = self.param("w_up", param_init(init3, ("expert", "embed", "expert_mlp")), (e, d, f), jnp.float32)
        w_down = self.param("w_down", param_init(init3, ("expert", "expert_mlp", "embed")), (e, f, d), jnp.float32)
        stat = self.variable(
            "stats", "router",
            lambda: RoutingBias(bias=jnp.zeros((e,), jnp.float32), load=jnp.zeros((e,), jnp.float32),
                                gamma=cfg.gamma, gamma_zero_after_step=cfg.gamma_zero_after_step),
        )

        tokens = x.reshape(b * s_len, d).astype(self.dtype)
        t = tokens.shape[0]
        # The gate runs in float32 (routing decisions are sensitive to rounding).
        logits = jnp.dot(tokens.astype(jnp.float32), gate)
        if cfg.device_limited_m is not None and ep > 1:
            groups, topk_groups = ep, min(cfg.device_limited_m, ep)
        else:
            groups, topk_groups = cfg.num_groups, cfg.topk_groups
        ids, w, s = _route(
            logits, stat.value.bias, top_k=k, score_func=cfg.score_func, num_groups=groups,
            topk_groups=topk_groups, group_score=cfg.group_score, route_scale=cfg.route_scale,
            normalize=cfg.normalize,
        )
        counts = jnp.zeros((e,), jnp.float32).at[ids.reshape(-1)].add(1.0)  # global: jit sums over shards
        if train and self.is_mutable_collection("stats") and not self.is_initializing():
            stat.value = stat.value.replace(load=stat.value.load + counts)

        keep = jnp.ones(ids.shape, bool)
        slot = t // _shards(ep) * k if ep > 1 else None
        if train and cfg.capacity_factor is not None:
            cap = math.ceil(cfg.capacity_factor * t * k / ep)
            affin = jnp.take_along_axis(s, ids, axis=-1)
            keep = capacity_keep(ids, affin, num_experts=e, num_devices=ep, capacity=cap)
            if ep > 1:
                slot = min(slot, cap)
        w = jnp.where(keep, w, 0.0)
        ids_kept = jnp.where(keep, ids, e)

        if cfg.dispatch == "dense":
            routed = _dense_reference(tokens, ids_kept, w, w_gate, w_up, w_down)
        elif ep > 1:
            axes = _token_axes(ep)
            if t % _shards(ep):
                raise ValueError(f"MoE: batch*seq={t} tokens must be divisible by the {_shards(ep)} devices "
                                 f"of axes {axes}")
            routed = _expert_parallel(
                tokens, ids_kept, w, w_gate, w_up, w_down, token_axes=axes, ep=ep, slot=slot,
                implementation=cfg.implementation,
            )
        else:
            routed = _grouped_local(tokens, ids_kept, w, w_gate, w_up, w_down, cfg.implementation)

        out = routed
        if cfg.num_shared:
            fs = cfg.num_shared * f
            sg = self.param("shared_gate", param_init(init2, ("embed", "mlp")), (d, fs), jnp.float32)
            su = self.param("shared_up", param_init(init2, ("embed", "mlp")), (d, fs), jnp.float32)
            sd = self.param("shared_down", param_init(init2, ("mlp", "embed")), (fs, d), jnp.float32)
            cd = self.dtype
            h = jax.nn.silu(tokens @ sg.astype(cd)) * (tokens @ su.astype(cd))
            out = out + (h @ sd.astype(cd)).astype(jnp.float32)

        # Balance losses and metrics.
        num_dev = ep if ep > 1 else groups
        losses = balance_losses(ids, s, cfg=cfg, batch=b, num_devices=num_dev,
                                m=max(topk_groups, 1) if num_dev > 1 else 1)
        alphas = {"seq": cfg.seq_aux_alpha, "expert": cfg.expert_aux_alpha, "device": cfg.device_aux_alpha,
                  "comm": cfg.comm_aux_alpha}
        aux = sum((alphas[n] * v for n, v in losses.items()), jnp.zeros((), jnp.float32))
        self.sow("intermediates", "aux_loss", aux)
        mean_load = jnp.mean(counts)
        metrics = {
            "expert_load": counts / (t * k),
            "maxvio_batch": (jnp.max(counts) - mean_load) / mean_load,
            "dropped_fraction": 1.0 - jnp.mean(keep.astype(jnp.float32)),
            # devices (routing groups without expert parallelism) one token is sent to, at most
            "max_devices_per_token": jnp.max(
                jnp.sum(jnp.max(jax.nn.one_hot(ids // (e // num_dev), num_dev, dtype=jnp.int32), axis=-2), axis=-1)
            ),
        }
        metrics.update({f"aux_{n}": v for n, v in losses.items()})
        self.sow("intermediates", "metrics", metrics)
        return out.reshape(b, s_len, d).astype(self.dtype)


def _shards(ep: int) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(int(mesh.shape[a]) for a in _token_axes(ep))
