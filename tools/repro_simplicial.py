"""Issue 21: 2-simplicial hybrid vs dot-product attention at equal parameters and tokens, several sizes, one root.

    python -m tools.repro_simplicial plan   [ROOT] [--sizes s,m,l] [--dense-tflops 300] [--simplicial-tflops 150]
    python -m tools.repro_simplicial train  [ROOT] [--sizes s,m,l] [--set K=V ...] [--max-minutes M]
    python -m tools.repro_simplicial report [ROOT]
    python -m tools.repro_simplicial status [ROOT]

`train` trains, size by size (smallest first), the hybrid (`recipes.simplicial --preset repro_<size>`: every 4th
layer 2-simplicial, w1 512, w2 32) and its dense twin (`--preset repro_<size>_dense`) into ROOT/<size>_hybrid and
ROOT/<size>_dense, after training ROOT/tokenizer.json (byte-level BPE with model.vocab_size ids on data.paths) if
it is missing. Both runs of a size have the same parameter count, data order, optimizer and steps (recipes/
simplicial.py `repro`). The `--set` overrides apply to every run (one that addresses
`model.layer_pattern.simplicial.` only to the hybrids, which alone have such an entry) and are remembered in
ROOT/repro.json (a later call repeats them or passes none). Every run resumes from its latest checkpoint; a
finished run is skipped; `--max-minutes` is a wall-clock budget for the whole call (a run cut by it saves and
stops cleanly; rerun the same command to continue). One record per run and call in ROOT/stages.jsonl.

`plan` prints, per run, the parameters, training FLOPs per token (`flops_per_token`, the simplicial op's share
beside it) and the predicted training time at the given throughputs (the dense part at --dense-tflops, the
simplicial op at --simplicial-tflops, both in the model's FLOP count); it trains nothing.

`report` reads only each run's metrics.jsonl and config.json (runs copied back without checkpoints work) and
writes ROOT/report/: loss_tokens.png and loss_flops.png (train and eval loss of every run against training
tokens and against training FLOPs, tools.compare_runs), gap.png (final eval loss of both variants and the gap
dense - hybrid against non-embedding parameters) and summary.md / summary.json (per run: parameters, GFLOP/token,
steps, tokens, FLOPs, final eval and train loss, MFU and wall time; per size: the gap at the last eval step both
runs reached, and whether the gap grows with size). docs/results/simplicial.md has the GPU commands.
"""
from __future__ import annotations

import argparse
import os
import sys

from axlearn_like.cli import tool_main
from tools.repro_util import (
    StageLog,
    add_stage_args,
    print_status,
    sets_argv,
    train_runs,
    write_summary,
)

RECIPE = "simplicial"
VARIANTS = ("hybrid", "dense")
LABELS = {"hybrid": "2-simplicial hybrid", "dense": "dot-product (dense twin)"}
SIMPLICIAL_KEY = "model.layer_pattern.simplicial."  # --set keys only the hybrid has


def _sizes() -> tuple[str, ...]:
    from recipes import simplicial

    return tuple(simplicial.REPRO_SIZES)


def _default_root() -> str:
    from recipes import simplicial

    return simplicial.REPRO_ROOT


def run_name(size: str, variant: str) -> str:
    return f"{size}_{variant}"


def _parse_sizes(text: str) -> list[str]:
    sizes = [s for s in text.split(",") if s]
    known = _sizes()
    bad = [s for s in sizes if s not in known]
    if bad or not sizes:
        raise ValueError(f"--sizes: {bad or sizes} not in {list(known)}; pass a comma-separated subset")
    return [s for s in known if s in sizes]  # smallest first, whatever the order given


def _argv(root: str, size: str, variant: str, sets: list[str]) -> list[str]:
    tok = os.path.join(root, "tokenizer.json")
    preset = f"repro_{size}" if variant == "hybrid" else f"repro_{size}_dense"
    mine = [s for s in sets if variant == "hybrid" or not s.startswith(SIMPLICIAL_KEY)]
    return ["--preset", preset, "--run-dir", os.path.join(root, run_name(size, variant)),
            *sets_argv([f"data.tokenizer={tok}", *mine])]


def _configs(root: str, sizes: list[str], sets: list[str]) -> dict:
    from axlearn_like.cli import build_config
    from recipes import simplicial

    return {(z, v): build_config(simplicial.config, _argv(root, z, v, sets), simplicial.PRESETS,
                                 prog="python -m recipes.simplicial")[0]
            for z in sizes for v in VARIANTS}


def train(root: str, sizes: list[str], sets: list[str], *, max_minutes: float | None = None,
          tokenizer_bytes: int = 100_000_000, stream=None) -> int:
    runs = {run_name(z, v): (z, v) for z in sizes for v in VARIANTS}

    def check(cfgs):
        tokens = {c.trainer.steps * c.data.global_batch_size * c.data.seq_len for c in cfgs.values()}
        if len(tokens) > 1:
            print(f"note: the runs differ in training tokens ({sorted(tokens)}): the comparison is at equal tokens "
                  f"only within a size", file=stream)

    return train_runs(root, RECIPE, list(runs), lambda r, sets: _argv(root, *runs[r], sets), sets,
                      max_minutes=max_minutes, tokenizer_bytes=tokenizer_bytes, check=check, stream=stream)


# ------------------------------------------------------------------------------------------------ model counts
def model_counts(cfg) -> dict:
    """Parameters and training FLOPs per token of a run's config (the trainer's own FLOP count):
    params, non_embedding (params minus the input embedding and an untied output matrix), flops_per_token,
    simplicial_flops_per_token (the simplicial layers' score terms, `extra_flops`), tokens_per_step."""
    model = cfg.model.build()
    m, s = cfg.model, cfg.data.seq_len
    params = model.param_count(s)
    simp = sum(k.extra_flops(m.d_model, s) for i in range(m.num_layers)
               for k in m.layer_kinds(i)[:1] if k.kind == "simplicial")
    return {"params": params, "non_embedding": params - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2),
            "flops_per_token": float(model.flops_per_token(s)), "simplicial_flops_per_token": float(simp),
            "tokens_per_step": cfg.data.global_batch_size * s}


def predicted_minutes(counts: dict, steps: int, dense_tflops: float, simplicial_tflops: float) -> float:
    """Training time of `steps` at the two throughputs: (F - F_simplicial) / dense + F_simplicial / simplicial."""
    tokens = steps * counts["tokens_per_step"]
    fs = counts["simplicial_flops_per_token"]
    seconds = tokens * ((counts["flops_per_token"] - fs) / (dense_tflops * 1e12) + fs / (simplicial_tflops * 1e12))
    return seconds / 60.0


def plan(root: str, sizes: list[str], sets: list[str], *, dense_tflops: float = 300.0,
         simplicial_tflops: float = 150.0, stream=None) -> list[dict]:
    rows = []
    for (z, v), cfg in _configs(root, sizes, sets).items():
        c = model_counts(cfg)
        rows.append({"run": run_name(z, v), **c, "steps": cfg.trainer.steps,
                     "tokens": cfg.trainer.steps * c["tokens_per_step"],
                     "minutes": predicted_minutes(c, cfg.trainer.steps, dense_tflops, simplicial_tflops)})
    print(f"{'run':<10} {'params':>9} {'non-emb':>9} {'GFLOP/tok':>10} {'simplicial':>10} {'tokens':>8} "
          f"{'PFLOP':>8} {'minutes':>8}   (dense part at {dense_tflops:g}, simplicial op at {simplicial_tflops:g} "
          f"TFLOP/s)", file=stream)
    for r in rows:
        print(f"{r['run']:<10} {r['params'] / 1e6:>8.1f}M {r['non_embedding'] / 1e6:>8.1f}M "
              f"{r['flops_per_token'] / 1e9:>10.3f} {r['simplicial_flops_per_token'] / 1e9:>10.3f} "
              f"{r['tokens'] / 1e6:>7.1f}M {r['tokens'] * r['flops_per_token'] / 1e15:>8.1f} {r['minutes']:>8.1f}",
              file=stream)
    print(f"total training {sum(r['minutes'] for r in rows):.1f} min (add the tokenizer, corpus loading and one "
          f"compile per run and call)", file=stream)
    return rows


# ----------------------------------------------------------------------------------------------------- report
def present_runs(root: str) -> list[tuple[str, str]]:
    return [(z, v) for z in _sizes() for v in VARIANTS
            if os.path.isfile(os.path.join(root, run_name(z, v), "metrics.jsonl"))]


def _tail_mean(values, n: int = 5) -> float | None:
    return float(values[-n:].mean()) if len(values) else None


def _median(values) -> float | None:
    return float(sorted(values)[len(values) // 2]) if len(values) else None


def _run_summary(root: str, size: str, variant: str, wall: dict) -> dict:
    from axlearn_like import rundir
    from tools.compare_runs import read_metrics, series

    name = run_name(size, variant)
    d = os.path.join(root, name)
    rows = read_metrics(d)
    cfg = rundir.read_config_file(os.path.join(d, "config.json"))
    c = model_counts(cfg)
    step = max(rows) if rows else 0
    es, ev = series(rows, "eval/loss")
    _, tr = series(rows, "train/loss")
    _, mfu = series(rows, "perf/mfu")
    _, dt = series(rows, "perf/step_time_s")
    _, real = series(rows, "train/tokens")  # non-padding target tokens of the logged step (unpacked rows pad)
    _, bpb = series(rows, "eval/bits_per_byte")
    return {
        "size": size, "variant": variant, **c, "steps": step, "target_steps": cfg.trainer.steps,
        "tokens": step * c["tokens_per_step"], "train_flops": step * c["tokens_per_step"] * c["flops_per_token"],
        "eval_loss": float(ev[-1]) if len(ev) else None, "eval_step": int(es[-1]) if len(es) else None,
        "eval": {int(s): float(v) for s, v in zip(es, ev)},
        "eval_bits_per_byte": float(bpb[-1]) if len(bpb) else None, "train_loss_last5": _tail_mean(tr),
        "mfu_median": _median(mfu), "step_time_median_s": _median(dt),
        "non_padding_fraction": float(real.mean()) / c["tokens_per_step"] if len(real) else None,
        "wall_s": wall.get(name),
    }


def _gaps(runs: dict) -> dict:
    """Per size with both variants: dense - hybrid eval loss at the last eval step both reached (> 0: the hybrid
    is better), and whether that gap grows with size (None with fewer than two sizes)."""
    out = {}
    for z in _sizes():
        h, d = runs.get(run_name(z, "hybrid")), runs.get(run_name(z, "dense"))
        if not h or not d:
            continue
        common = sorted(set(h["eval"]) & set(d["eval"]))
        if not common:
            continue
        s = common[-1]
        out[z] = {"step": s, "tokens": s * h["tokens_per_step"], "hybrid": h["eval"][s], "dense": d["eval"][s],
                  "gap": d["eval"][s] - h["eval"][s], "non_embedding": h["non_embedding"],
                  "complete": s == h["target_steps"] == d["target_steps"],
                  "flops_ratio": h["flops_per_token"] / d["flops_per_token"]}
    gaps = [g["gap"] for g in out.values()]
    grows = None if len(gaps) < 2 else all(b > a for a, b in zip(gaps, gaps[1:]))
    return {"sizes": out, "gap_grows_with_size": grows}


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _count(n: float) -> str:
    """57156096 -> '57.2M', 61248 -> '61.2k' (3 significant digits)."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _md(runs: dict, gaps: dict) -> str:
    lines = ["# 2-simplicial hybrid vs dense: summary", "",
             "| run | params | non-emb | GFLOP/token (simplicial op) | steps | tokens (non-padding) | train FLOPs | "
             "eval loss (bits/byte) | train loss (last 5 logs) | step (median) | MFU (median) | wall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs.values():
        lines.append(f"| {run_name(r['size'], r['variant'])} | {_count(r['params'])} | "
                     f"{_count(r['non_embedding'])} | {r['flops_per_token'] / 1e9:.3g} "
                     f"({r['simplicial_flops_per_token'] / 1e9:.3g}) | {r['steps']} of {r['target_steps']} | "
                     f"{_count(r['tokens'])} ({_fmt(r['non_padding_fraction'], '.0%')}) | {r['train_flops']:.2e} | "
                     f"{_fmt(r['eval_loss'], '.4f')} ({_fmt(r['eval_bits_per_byte'], '.3f')}) | "
                     f"{_fmt(r['train_loss_last5'], '.4f')} | {_fmt(r['step_time_median_s'], '.3f')} s | "
                     f"{_fmt(r['mfu_median'], '.1%')} | "
                     f"{_fmt(r['wall_s'] and r['wall_s'] / 60, '.1f')} min |")
    lines += ["", "| size | non-emb params | at step (tokens) | dense eval | hybrid eval | gap dense - hybrid | "
              "hybrid FLOPs / dense |", "|---|---:|---:|---:|---:|---:|---:|"]
    for z, g in gaps["sizes"].items():
        part = "" if g["complete"] else " (partial)"
        lines.append(f"| {z} | {_count(g['non_embedding'])} | {g['step']} ({_count(g['tokens'])}){part} | "
                     f"{g['dense']:.4f} | {g['hybrid']:.4f} | {g['gap']:+.4f} | {g['flops_ratio']:.2f}x |")
    grows = gaps["gap_grows_with_size"]
    lines += ["", "Gap > 0: the hybrid reaches lower eval loss (nats/token) at equal parameters and tokens. "
              + ("Fewer than two sizes have both runs: no trend yet." if grows is None else
                 f"The gap {'grows' if grows else 'does not grow'} with size."), ""]
    return "\n".join(lines)


def _plot_gaps(gaps: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = gaps["sizes"]
    x = [g["non_embedding"] / 1e6 for g in sizes.values()]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for v, marker in (("hybrid", "s"), ("dense", "o")):  # the loss plots' colour order
        a.plot(x, [g[v] for g in sizes.values()], marker=marker, label=LABELS[v])
    b.plot(x, [g["gap"] for g in sizes.values()], marker="o", color="k")
    b.axhline(0.0, color="gray", lw=0.8)
    for z, xi, g in zip(sizes, x, sizes.values()):
        b.annotate(z, (xi, g["gap"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters (M)")
    a.set_ylabel("eval loss (nats/token)")
    a.set_title("final eval loss, equal parameters and tokens", fontsize=9)
    a.legend(fontsize=8)
    b.set_ylabel("dense - hybrid (nats/token)")
    b.set_title("gap (> 0: the 2-simplicial hybrid is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def report(root: str, *, stream=None) -> dict:
    from tools import compare_runs

    present = present_runs(root)
    if not present:
        raise ValueError(f"{root} holds no run with a metrics.jsonl (runs: <size>_hybrid / <size>_dense for sizes "
                         f"{', '.join(_sizes())}); train first")
    out = os.path.join(root, "report")
    os.makedirs(out, exist_ok=True)
    dirs = [os.path.join(root, run_name(z, v)) for z, v in present]
    labels = [f"{z}: {LABELS[v]}" for z, v in present]
    for x in ("tokens", "flops"):
        compare_runs.compare(dirs, ["train/loss", "eval/loss"], x=x, labels=labels, smooth=5,
                             out=os.path.join(out, f"loss_{x}.png"),
                             title=f"loss vs training {x} (equal parameters and tokens within a size)", stream=stream)
    wall: dict[str, float] = {}
    for rec in StageLog(root).records():
        if rec.get("run"):
            wall[rec["run"]] = wall.get(rec["run"], 0.0) + rec["wall_s"]
    runs = {run_name(z, v): _run_summary(root, z, v, wall) for z, v in present}
    gaps = _gaps(runs)
    if gaps["sizes"]:
        _plot_gaps(gaps, os.path.join(out, "gap.png"))
    write_summary(out, {"labels": LABELS, "runs": runs, **gaps}, _md(runs, gaps), stream)
    return {"runs": runs, **gaps}


def status(root: str, stream=None) -> int:
    return print_status(root, [run_name(z, v) for z in _sizes() for v in VARIANTS], stream)


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.repro_simplicial", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a_plan = sub.add_parser("plan", help="parameters, FLOPs and predicted training time per run (trains nothing)")
    a_train = sub.add_parser("train", help="train the sizes' hybrid and dense runs (resumes; skips finished ones)")
    a_rep = sub.add_parser("report", help="figures and the summary table from the runs' metrics")
    a_stat = sub.add_parser("status", help="run progress and the stage log")
    for a in (a_plan, a_train, a_rep, a_stat):
        a.add_argument("root", nargs="?", default=None)
    for a in (a_plan, a_train):
        a.add_argument("--sizes", default=",".join(_sizes()), help=f"comma-separated subset of {','.join(_sizes())}")
    a_plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_stage_args(a_train, tokenizer_bytes=100_000_000)
    a_plan.add_argument("--dense-tflops", type=float, default=300.0,
                        help="throughput of everything but the simplicial op (model FLOP count)")
    a_plan.add_argument("--simplicial-tflops", type=float, default=150.0,
                        help="throughput of the simplicial op (its extra_flops count)")
    a = p.parse_args(argv)
    root = a.root or _default_root()
    if a.cmd == "plan":
        plan(root, _parse_sizes(a.sizes), a.set, dense_tflops=a.dense_tflops, simplicial_tflops=a.simplicial_tflops)
        return 0
    if a.cmd == "train":
        return train(root, _parse_sizes(a.sizes), a.set, max_minutes=a.max_minutes, tokenizer_bytes=a.tokenizer_bytes)
    if a.cmd == "report":
        report(root)
        return 0
    return status(root)


if __name__ == "__main__":
    sys.exit(main())
