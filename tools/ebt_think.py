"""Look at an EBT thinking: `python -m tools.ebt_think RUN_DIR --text "..." [--steps 8] [--candidates 4]`.

Prints, per input position, the observed token, the chosen next-token prediction (argmax of the final
logits of the lowest-energy candidate), its probability and the energy before/after thinking; writes a PNG
of the mean energy versus thinking step (RUN_DIR/ebt_think.png by default). `--generate N` continues the
text with EBT sampling (greedy). `--eval-table` prints the held-out loss with 1, 2, 4, 8 thinking steps (no
noise: the trained eval's setting) and, at the trained maximum of steps, with self-verification G = 1, 4, 16
under the inference Langevin noise (the model's `infer_langevin_std`, else its training noise; `--langevin X`
overrides), as the reference infers (optionally next to `--baseline RUN_DIR`, a standard decoder's run).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _load(run_dir):
    from axlearn_like import checkpoint

    task, variables, cfg = checkpoint.load(run_dir)
    if not hasattr(task, "think"):
        raise SystemExit(f"error: {run_dir} holds a {type(task).__name__}, not an EBT (models.ebt) run")
    return task, variables, cfg


def _show(tok, token_id) -> str:
    t = int(token_id)
    if t == getattr(tok, "eos_id", None):
        return "<eos>"
    if t == getattr(tok, "pad_id", None):
        return "<pad>"
    return repr(tok.decode([t]))[1:-1]


def think_text(run_dir: str, text: str, steps: int, candidates: int, png: str | None, generate: int,
               seed: int = 0) -> dict:
    from axlearn_like.data import make_tokenizer

    task, variables, cfg = _load(run_dir)
    tok = make_tokenizer(cfg.data)
    ids = np.asarray([tok.encode(text)], np.int32)
    if ids.shape[1] == 0:
        raise SystemExit("error: --text is empty")
    out = task.think(variables, ids, jax.random.PRNGKey(seed), steps=steps, num_candidates=candidates)
    probs = np.asarray(jax.nn.softmax(out["logits"], axis=-1))[0]
    energies = np.asarray(out["energies"])[:, 0]  # [steps+1, S]
    chosen = probs.argmax(-1)
    print(f"{'pos':>4} {'token':>8} {'next (chosen)':>14} {'p':>6} {'E start':>9} {'E final':>9} {'cand':>5}")
    for i in range(ids.shape[1]):
        print(f"{i:4d} {_show(tok, ids[0, i]):>8} {_show(tok, chosen[i]):>14} {probs[i, chosen[i]]:6.3f} "
              f"{energies[0, i]:9.4f} {energies[-1, i]:9.4f} {int(np.asarray(out['candidate'])[0, i]):5d}")
    mean = energies.mean(-1)
    print("mean energy per step: " + " ".join(f"{e:.4f}" for e in mean))
    png = png or os.path.join(run_dir, "ebt_think.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(steps + 1), energies, color="0.8", lw=0.8)
    ax.plot(range(steps + 1), mean, color="C0", lw=2.5, label="mean over positions")
    ax.set_xlabel("thinking step")
    ax.set_ylabel("energy")
    ax.set_title(f"EBT thinking ({candidates} candidate{'s' if candidates > 1 else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")
    result = {"chosen": chosen, "energies": energies, "png": png}
    if generate:
        gen = task.generate(variables, ids, generate, jax.random.PRNGKey(seed), temperature=0.0, steps=steps,
                            num_candidates=candidates)
        cont = tok.decode([int(t) for t in np.asarray(gen)[0, ids.shape[1]:] if int(t) < 256])
        print("generated: " + text + cont)
        result["generated"] = cont
    return result


def eval_batches(data_cfg, n: int, split: str = "eval") -> list[dict]:
    """The first n batches of a data config's split (numpy dicts, the trainer's batch keys)."""
    from axlearn_like.data import make_iterator

    return [b for _, b in zip(range(n), make_iterator(data_cfg, split=split))]


def _masked_ce(logits, b) -> tuple[float, float]:
    """(summed CE over the loss mask, mask count) of logits [..., B, S, V] against b's targets (float64 sums)."""
    from models.lm import cross_entropy

    m = np.asarray(b["loss_mask"], np.float64)
    ce = np.asarray(cross_entropy(logits, jnp.asarray(b["targets"]))[0], np.float64)
    return float((ce * m).sum()), float(m.sum())


def think_curve(task, variables, batches, max_steps: int, *, noise: float = 0.0, seed: int = 100) -> list[float]:
    """Held-out CE (nats/token) after each of 1..max_steps thinking steps, from one max_steps-long run per batch
    (`EBT.step_losses` with rng PRNGKey(seed + i) for batch i, so entry k equals `think(steps=k + 1)` when
    noise = 0).
    -> [max_steps] floats."""
    tot, n = np.zeros(max_steps), 0.0
    for i, b in enumerate(batches):
        sums = task.step_losses(variables, b, jax.random.PRNGKey(seed + i), max_steps, noise)
        tot, n = tot + np.asarray(sums, np.float64), n + float(np.asarray(b["loss_mask"], np.float64).sum())
    return list(tot / max(n, 1.0))


def self_verification(task, variables, batches, steps: int, g: int, noise: float, *, seed: int = 100) -> float:
    """Held-out CE (nats/token) of the lowest-energy of g candidates (`EBT.think`: g random starts, `steps` steps
    under Langevin noise `noise`), per position. Rows go through in chunks of at most B // g so that g candidates
    take the memory of one batch."""
    tot = n = 0.0
    for i, b in enumerate(batches):
        rows = b["inputs"].shape[0]
        chunk = max(d for d in range(1, max(1, rows // g) + 1) if rows % d == 0)  # equal chunks: one compile
        for j, lo in enumerate(range(0, rows, chunk)):
            part = {k: v[lo:lo + chunk] for k, v in b.items()}
            out = task.think(variables, part["inputs"], jax.random.fold_in(jax.random.PRNGKey(seed + i), j),
                             steps=steps, num_candidates=g, positions=jnp.asarray(part["positions"]),
                             segment_ids=jnp.asarray(part["segment_ids"]), langevin_std=noise)
            s, c = _masked_ce(out["logits"], part)
            tot, n = tot + s, n + c
    return tot / max(n, 1.0)


def decoder_loss(task, variables, batches) -> float:
    """Held-out CE (nats/token) of a standard decoder (models.lm) on the same batches."""
    tot = n = 0.0
    for b in batches:
        logits, _ = task.apply(variables, {k: jnp.asarray(v) for k, v in b.items()})
        s, c = _masked_ce(logits, b)
        tot, n = tot + s, n + c
    return tot / max(n, 1.0)


def eval_table(run_dir: str, baseline: str | None, batches: int, steps_list=(1, 2, 4, 8), groups=(1, 4, 16),
               langevin: float | None = None) -> list[str]:
    """Held-out CE (nats/token) over `batches` eval batches of the run's own data config: thinking steps
    without noise, then self-verification G at the trained maximum of steps with the inference Langevin noise
    (`langevin`, None = the model's inference noise)."""
    task, variables, cfg = _load(run_dir)
    data = eval_batches(cfg.data, batches)
    curve = think_curve(task, variables, data, max(steps_list))
    lines = [f"EBT {run_dir} (trained with {cfg.model.think_steps}+U{{0..{cfg.model.think_steps_random}}} steps), "
             f"{batches} eval batches of {cfg.data.global_batch_size}x{cfg.data.seq_len}",
             "| thinking steps | G (self-verification) | Langevin noise | held-out loss (nats/token) |",
             "|---|---|---|---|"]
    for st in steps_list:
        lines.append(f"| {st} | 1 | 0 | {curve[st - 1]:.4f} |")
        print(lines[-1], flush=True)
    st0 = cfg.model.eval_steps()  # the trained maximum (what the training eval reports)
    noise = cfg.model.inference_noise() if langevin is None else langevin
    for g in groups:
        lines.append(f"| {st0} | {g} | {noise:g} | {self_verification(task, variables, data, st0, g, noise):.4f} |")
        print(lines[-1], flush=True)
    if baseline:
        from axlearn_like import checkpoint

        btask, bvars, _ = checkpoint.load(baseline)
        lines.append(f"| same-size decoder ({baseline}) | - | - | {decoder_loss(btask, bvars, data):.4f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.ebt_think", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--text", default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--candidates", type=int, default=1)
    p.add_argument("--png", default=None)
    p.add_argument("--generate", type=int, default=0, help="continue the text by N tokens with EBT thinking")
    p.add_argument("--eval-table", action="store_true")
    p.add_argument("--baseline", default=None, help="run dir of a same-size standard decoder for --eval-table")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--langevin", type=float, default=None,
                   help="--eval-table: Langevin noise of the self-verification rows "
                        "(default: the model's inference noise)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.run_dir):
        print(f"error: {a.run_dir} is not a directory (pass a run dir written by python -m recipes.ebt)",
              file=sys.stderr)
        return 2
    if a.eval_table:
        eval_table(a.run_dir, a.baseline, a.batches, langevin=a.langevin)
    if a.text is not None:
        think_text(a.run_dir, a.text, a.steps, a.candidates, a.png, a.generate)
    if a.text is None and not a.eval_table:
        print("error: give --text TEXT and/or --eval-table", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
