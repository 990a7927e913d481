"""Train-step time of an EBT vs the same-size standard decoder: `python -m tools.bench_ebt [--out FILE]`.

Both use the real trainer step (axlearn_like.trainer.make_train_step: forward, second-order backward for
the EBT, AdamW) on random tokens at the recipes.ebt "gpu" preset sizes. Reports ms/step, the ratio, and
the ratio per inner (thinking) step, for the efficient S x (S+1) System-2 attention and the dense 2S x 2S
masked form. The paper reports ~3.3x per inner step for its implementation.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import numpy as np

from tools import benchutil


def time_step(cfg, iters: int, profile: str | None = None) -> float:
    import flax.linen as nn

    from axlearn_like.trainer import build_state_setup, make_train_step

    setup = build_state_setup(cfg)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        step, batch_sh = make_train_step(setup, cfg)
        state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.PRNGKey(0))
        b, s = cfg.data.global_batch_size, cfg.data.seq_len
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (b, s + 1)).astype(np.int32)
        batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones((b, s), np.float32),
                 "segment_ids": np.ones((b, s), np.int32),
                 "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))}
        # The step's batch spec decides the keys (no segment_ids for one-document rows: DataConfig.multi_document_rows).
        batch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items() if k in batch_sh}
        step = step.lower(state, batch).compile()  # compile once; the same executable is timed
        temp_gib = getattr(step.memory_analysis(), "temp_size_in_bytes", 0) / 2**30
        for _ in range(2):
            state, m = step(state, batch)
        jax.block_until_ready(m["objective"])
        t0 = time.perf_counter()
        for _ in range(iters):
            state, m = step(state, batch)
        jax.block_until_ready(m["objective"])
        dt = (time.perf_counter() - t0) / iters
        if profile:
            held = [state]  # the step donates its state: each profiled call feeds the next the new one

            def one():
                held[0], m = step(held[0], batch)
                return m

            benchutil.print_device_ops(profile, benchutil.device_ops(one, ()), step.as_text())
        return dt, temp_gib


def main(argv=None) -> int:
    from axlearn_like import config as config_lib
    from models.attention import AttentionConfig
    from models.decoder import DecoderConfig
    from recipes import ebt

    p = argparse.ArgumentParser(prog="python -m tools.bench_ebt")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--forms", default="efficient,dense", help="attention forms to time (comma list)")
    p.add_argument("--set", action="append", default=[], help="overrides on the recipes.ebt gpu preset")
    p.add_argument("--variant", action="append", default=[],
                   help="LABEL:k=v,k=v: one more EBT row with these overrides (after --forms; decoder timed once)")
    p.add_argument("--profile", action="store_true",
                   help="also print the device time per kernel kind and the top kernels "
                        "(decoder and the first EBT row)")
    a = p.parse_args(argv)
    cfg = config_lib.apply_overrides(ebt.gpu(), list(a.set) + ["checkpoint.enabled=false"])
    m = cfg.model
    # the same-size decoder: every System-2 layer as plain causal attention with the same projections
    plain = tuple(AttentionConfig(**{f.name: getattr(e, f.name) for f in dataclasses.fields(AttentionConfig)})
                  for e in m.layer_pattern)
    fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(DecoderConfig)}
    dec = dataclasses.replace(cfg, model=DecoderConfig(**fields | {"layer_pattern": plain}))
    rows = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": cfg.data.global_batch_size,
            "seq_len": cfg.data.seq_len, "d_model": m.d_model, "layers": m.num_layers, "think_steps": m.think_steps}
    t, rows["decoder_temp_gib"] = time_step(dec, a.iters, "decoder" if a.profile else None)
    rows["decoder_ms"] = 1e3 * t
    print(f"decoder: {rows['decoder_ms']:.2f} ms/step, XLA temp {rows['decoder_temp_gib']:.2f} GiB", flush=True)
    variants = [(f, [f"model.layer_pattern.ebt_attention.form={f}"]) for f in a.forms.split(",") if f]
    variants += [(v.split(":", 1)[0], v.split(":", 1)[1].split(",")) for v in a.variant]
    for i, (label, sets) in enumerate(variants):
        c = config_lib.apply_overrides(cfg, sets)
        t, rows[f"ebt_{label}_temp_gib"] = time_step(c, a.iters, f"ebt ({label})" if a.profile and i == 0 else None)
        t *= 1e3
        rows[f"ebt_{label}_ms"] = t
        rows[f"ratio_{label}"] = t / rows["decoder_ms"]
        rows[f"ratio_{label}_per_inner_step"] = t / rows["decoder_ms"] / c.model.think_steps
        print(f"ebt ({label}: {' '.join(sets)}): {t:.2f} ms/step = {t / rows['decoder_ms']:.2f}x the decoder, "
              f"{t / rows['decoder_ms'] / c.model.think_steps:.2f}x per inner step, "
              f"XLA temp {rows[f'ebt_{label}_temp_gib']:.2f} GiB",
              flush=True)
    benchutil.report(rows, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
