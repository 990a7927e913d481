"""Issue 20: Wang et al.'s auxiliary-loss-free balancing (and device-limited routing), runs and figures in one root.

    python -m tools.repro_moe train  ROOT --runs aux_free_seq,aux_free,aux_loss,no_balance[,limited]
                                     [--set K=V ...] [--max-minutes M]
    python -m tools.repro_moe report ROOT [--x step|tokens]
    python -m tools.repro_moe status ROOT

`train` trains each named run with `recipes.moe --preset <name>_gpu` into ROOT/<name> (equal tokens: the
presets share one base, recipes/moe.py `_balance_gpu`), after training ROOT/tokenizer.json (byte-level BPE with
model.vocab_size ids on data.paths) if it is missing. The `--set` overrides apply to every run and are
remembered in ROOT/repro.json (a later call repeats them or passes none). Every run resumes from its latest
checkpoint; a finished run is skipped; `--max-minutes` is a wall-clock budget for the whole call (a run cut
by it saves and stops cleanly; rerun to continue). One record per run and call in ROOT/stages.jsonl.

`report` reads only each run's metrics.jsonl and config.json (so runs copied back from another machine
without checkpoints work) and writes ROOT/report/: loss.png (train and eval loss), maxvio.png (MaxVio_batch,
mean and max over the MoE layers, and MaxVio_global over the eval set, log y), expert_load_<run>.png
(tools.plot_moe heatmaps), limited_vs_unrestricted.png (when both `limited` and `aux_free_seq` exist) and
summary.md / summary.json (final eval loss, MaxVio_global, MaxVio_batch averaged over training and over its
last 10%). docs/results/moe_balance.md has the GPU commands.
"""
from __future__ import annotations

import argparse
import os
import sys

from axlearn_like.cli import tool_main
from tools.repro_util import (
    add_stage_args,
    print_status,
    sets_argv,
    train_runs,
    write_summary,
)

RECIPE = "moe"
RUNS = ("aux_free_seq", "aux_free", "aux_loss", "no_balance", "limited")
DEFAULT_ROOT = "runs/moe_balance"
LABELS = {"aux_free_seq": "aux-free + seq loss", "aux_free": "aux-free", "aux_loss": "aux loss",
          "no_balance": "no balancing", "limited": "aux-free + seq, group-limited"}


def _argv(root: str, name: str, sets: list[str]) -> list[str]:
    tok = os.path.join(root, "tokenizer.json")
    return ["--preset", f"{name}_gpu", "--run-dir", os.path.join(root, name),
            *sets_argv([f"data.tokenizer={tok}", *sets])]


def train(root: str, runs: list[str], sets: list[str], *, max_minutes: float | None = None,
          tokenizer_bytes: int = 100_000_000, stream=None) -> int:
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        raise ValueError(f"--runs: {bad or runs} not in {list(RUNS)}")
    return train_runs(root, RECIPE, runs, lambda r, sets: _argv(root, r, sets), sets, max_minutes=max_minutes,
                      tokenizer_bytes=tokenizer_bytes, stream=stream)


# ----------------------------------------------------------------------------------------------------- report
def present_runs(root: str) -> list[str]:
    return [r for r in RUNS if os.path.isfile(os.path.join(root, r, "metrics.jsonl"))]


def _summary(root: str, runs: list[str]) -> dict:
    from axlearn_like import rundir
    from tools.compare_runs import read_metrics, series

    out = {}
    for r in runs:
        d = os.path.join(root, r)
        rows = read_metrics(d)
        cfg = rundir.read_config_file(os.path.join(d, "config.json"))
        s, eval_loss = series(rows, "eval/loss")
        _, vio_g = series(rows, "eval/maxvio_global")
        _, vio_g_max = series(rows, "eval/maxvio_global_max")
        bs, vio_b = series(rows, "train/*/maxvio_batch")
        tail = vio_b[bs >= 0.9 * bs[-1]] if len(bs) else vio_b
        out[r] = {
            "steps": int(max(rows)) if rows else 0,
            "tokens": int(max(rows) if rows else 0) * cfg.data.global_batch_size * cfg.data.seq_len,
            "eval_loss": float(eval_loss[-1]) if len(eval_loss) else None,
            "maxvio_global": float(vio_g[-1]) if len(vio_g) else None,
            "maxvio_global_max": float(vio_g_max[-1]) if len(vio_g_max) else None,
            "maxvio_batch_mean": float(vio_b.mean()) if len(vio_b) else None,
            "maxvio_batch_last10pct": float(tail.mean()) if len(tail) else None,
        }
    return out


def _md(summary: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["# MoE balance summary", "",
             "| run | steps | tokens | eval loss | MaxVio_global (mean / max over layers) | MaxVio_batch (training "
             "mean) | MaxVio_batch (last 10%) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r, s in summary.items():
        lines.append(f"| {r} | {s['steps']} | {s['tokens'] / 1e6:.1f}M | {f(s['eval_loss'], '.4f')} | "
                     f"{f(s['maxvio_global'], '.3f')} / {f(s['maxvio_global_max'], '.3f')} | "
                     f"{f(s['maxvio_batch_mean'], '.3f')} | {f(s['maxvio_batch_last10pct'], '.3f')} |")
    return "\n".join(lines) + "\n"


def report(root: str, *, x: str = "step", stream=None) -> dict:
    from tools import compare_runs, plot_moe

    runs = present_runs(root)
    if not runs:
        raise ValueError(f"{root} holds no run with a metrics.jsonl (runs: {', '.join(RUNS)}); train first")
    out = os.path.join(root, "report")
    os.makedirs(out, exist_ok=True)
    dirs = [os.path.join(root, r) for r in runs]
    labels = [LABELS[r] for r in runs]
    balance = [r for r in runs if r != "limited"]
    bdirs, blabels = [os.path.join(root, r) for r in balance], [LABELS[r] for r in balance]
    if balance:
        compare_runs.compare(bdirs, ["train/loss", "eval/loss"], x=x, labels=blabels, smooth=5,
                             out=os.path.join(out, "loss.png"), title="loss (equal tokens)", stream=stream)
        compare_runs.compare(bdirs, ["train/*/maxvio_batch", "eval/maxvio_global"], x=x, labels=blabels, logy=True,
                             smooth=5, out=os.path.join(out, "maxvio.png"),
                             title="MaxVio_batch (mean over MoE layers) and MaxVio_global", stream=stream)
        compare_runs.compare(bdirs, ["train/*/maxvio_batch"], x=x, labels=blabels, logy=True, smooth=5, agg="max",
                             out=os.path.join(out, "maxvio_batch_max.png"),
                             title="MaxVio_batch, worst MoE layer", stream=stream)
    if "limited" in runs and "aux_free_seq" in runs:
        compare_runs.compare([os.path.join(root, "aux_free_seq"), os.path.join(root, "limited")],
                             ["train/loss", "eval/loss", "train/*/maxvio_batch", "eval/maxvio_global"], x=x,
                             labels=["unrestricted", "group/device-limited"], smooth=5,
                             out=os.path.join(out, "limited_vs_unrestricted.png"),
                             title="device-limited vs unrestricted routing", stream=stream)
    for r, d in zip(runs, dirs):
        loads = plot_moe.read_loads(os.path.join(d, "metrics.jsonl"))
        if loads:
            plot_moe.plot(loads, os.path.join(out, f"expert_load_{r}.png"))
    summary = _summary(root, runs)
    write_summary(out, {"labels": dict(zip(runs, labels)), "runs": summary}, _md(summary), stream)
    return summary


def status(root: str, stream=None) -> int:
    return print_status(root, RUNS, stream)


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.repro_moe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a_train = sub.add_parser("train", help="train the named runs (resumes; skips finished ones)")
    a_rep = sub.add_parser("report", help="figures and the summary table from the runs' metrics")
    a_stat = sub.add_parser("status", help="run progress and the stage log")
    for a in (a_train, a_rep, a_stat):
        a.add_argument("root", nargs="?", default=DEFAULT_ROOT)
    a_train.add_argument("--runs", default=",".join(RUNS[:4]), help=f"comma-separated subset of {','.join(RUNS)}")
    add_stage_args(a_train, tokenizer_bytes=100_000_000)
    a_rep.add_argument("--x", default="step", choices=("step", "tokens", "flops"))
    a = p.parse_args(argv)
    if a.cmd == "train":
        return train(a.root, [r for r in a.runs.split(",") if r], a.set, max_minutes=a.max_minutes,
                     tokenizer_bytes=a.tokenizer_bytes)
    if a.cmd == "report":
        report(a.root, x=a.x)
        return 0
    return status(a.root)


if __name__ == "__main__":
    sys.exit(main())
