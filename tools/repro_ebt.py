"""Issue 21: Energy-Based Transformer thinking (Gladstone et al. 2025) against a same-size decoder, runs and figures
in one root.

    python -m tools.repro_ebt train  ROOT [--runs decoder,ebt[,no_replay,no_langevin,fixed_steps]]
                                     [--set K=V ...] [--max-minutes M]
    python -m tools.repro_ebt report ROOT [--batches N] [--max-steps K] [--groups 1,4,16] [--finished-only]
    python -m tools.repro_ebt status ROOT

`train` trains each named run with `recipes.ebt --preset <preset>` into ROOT/<run> (`ebt`: repro_text, `decoder`:
decoder_repro_text, the ablations repro_text_<name>; equal parameters, data, tokens and optimizer), after training
ROOT/tokenizer.json (a BPE with model.vocab_size ids on data.paths, the Python installation's *.py files) if it is
missing. The `--set` overrides apply to every run and are remembered in ROOT/repro.json (a later call repeats them
or passes none). Every run resumes from its latest checkpoint; a finished run is skipped; `--max-minutes` is a
wall-clock budget for the whole call (a run cut by it saves and stops cleanly; rerun to continue). The cheap decoder
goes first. One record per run and call in ROOT/stages.jsonl.

`report` loads each run's latest checkpoint and evaluates, on N batches of the in-distribution held-out documents
(the runs' own eval split: Python code) and of an out-of-distribution set (the installation's prose: *.md, *.rst,
*.txt and package READMEs, never trained on; `prose_files`), with the runs' tokenizer:
- the EBT's held-out loss after 1..K thinking steps (no noise; K beyond the trained maximum; `tools.ebt_think.
  think_curve`), for every EBT run present;
- self-verification: the lowest-energy of G candidates at the trained maximum of steps under the inference Langevin
  noise (`tools.ebt_think.self_verification`), for `ebt`;
- the decoder's loss on the same batches (`tools.ebt_think.decoder_loss`).
Results are cached in ROOT/report/eval_<run>.json per checkpoint step and settings; `--finished-only` evaluates
only runs at their last step, so a GPU call that ends mid-run spends no time on an evaluation a later call
replaces. A run whose checkpoints are not here (trained in another session, its metrics and evaluation carried
back) is reported from that file when it was made with the same settings. It writes ROOT/report/:
thinking.png (loss vs steps, ID and OOD, decoder lines), self_verification.png, loss_vs_tokens.png (train and eval
loss of every run vs tokens; `tools.compare_runs`), summary.md / summary.json (every number and a claims table).
docs/results/ebt.md has the GPU commands and the sizing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from axlearn_like.cli import tool_main
from tools.repro_util import (
    add_stage_args,
    latest_step,
    print_status,
    sets_argv,
    train_runs,
    write_summary,
)

RECIPE = "ebt"
PRESETS = {"decoder": "decoder_repro_text", "ebt": "repro_text", "no_replay": "repro_text_no_replay",
           "no_langevin": "repro_text_no_langevin", "fixed_steps": "repro_text_fixed_steps"}
RUNS = tuple(PRESETS)
EBT_RUNS = tuple(r for r in RUNS if r != "decoder")
DEFAULT_ROOT = "runs/ebt_repro"
LABELS = {"decoder": "Transformer++ (same size)", "ebt": "EBT (reference S2 recipe)", "no_replay": "EBT, no replay",
          "no_langevin": "EBT, no Langevin noise", "fixed_steps": "EBT, fixed step size and count"}
OOD_MAX_BYTES = 16_000_000


def _argv(root: str, run: str, sets: list[str]) -> list[str]:
    tok = os.path.join(root, "tokenizer.json")
    return ["--preset", PRESETS[run], "--run-dir", os.path.join(root, run),
            *sets_argv([f"data.tokenizer={tok}", *sets])]


def train(root: str, runs: list[str], sets: list[str], *, max_minutes: float | None = None,
          tokenizer_bytes: int = 30_000_000, stream=None) -> int:
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        raise ValueError(f"--runs: {bad or runs} not in {list(RUNS)}")
    runs = sorted(runs, key=RUNS.index)  # the decoder (seconds) before the EBTs (minutes)
    return train_runs(root, RECIPE, runs, lambda r, sets: _argv(root, r, sets), sets, max_minutes=max_minutes,
                      tokenizer_bytes=tokenizer_bytes, stream=stream)


# ----------------------------------------------------------------------------------------------------- report
def prose_files() -> list[str]:
    """The out-of-distribution set: every prose file of the running Python installation (*.md, *.rst, *.txt and
    dist-info METADATA, i.e. documentation and package READMEs; `axlearn_like.data.sources.python_install_files`
    without its *.py / *.pyi), none of which the code-only training corpus contains."""
    from axlearn_like.data.sources import python_install_files

    files = [f for f in python_install_files() if not f.endswith((".py", ".pyi"))]
    if not files:
        raise ValueError("no prose files (*.md, *.rst, *.txt, METADATA) in this Python installation for the "
                         "out-of-distribution set; install any package with a README, or pass --no-ood")
    return files


def ood_data(cfg_data):
    """The runs' data config (same tokenizer, rows and batch) on the prose files: half of its documents (up to
    16 MB read, in path order) in the eval split."""
    return dataclasses.replace(cfg_data, paths=tuple(prose_files()), eval_fraction=0.5,
                               max_bytes=min(cfg_data.max_bytes, OOD_MAX_BYTES))


def present_runs(root: str) -> list[str]:
    return [r for r in RUNS if os.path.isfile(os.path.join(root, r, "metrics.jsonl"))]


def _eval_run(root: str, run: str, sets: dict, settings: dict, stream=None, *, finished_only: bool = False
              ) -> dict | None:
    """The thinking / self-verification / decoder numbers of one run at its latest checkpoint (cached)."""
    from axlearn_like import checkpoint, rundir
    from tools import ebt_think

    d = os.path.join(root, run)
    step = latest_step(d)
    cache = os.path.join(root, "report", f"eval_{run}.json")
    old = None
    if os.path.isfile(cache):
        with open(cache) as f:
            old = json.load(f)
    if finished_only and step is not None:
        target = rundir.read_config_file(os.path.join(d, "config.json")).trainer.steps
        if step < target:
            print(f"{run}: at step {step} of {target}; not evaluated before its last step (--finished-only)",
                  file=stream)
            return None
    if step is None:
        # A run trained on another machine: its evaluation came back with its metrics (the GPU calls' tarball).
        if old is not None and {k: v for k, v in old.get("key", {}).items() if k != "step"} == settings:
            print(f"{run}: no checkpoint here; using the evaluation at step {old['step']} in {cache}", file=stream)
            return old
        print(f"{run}: no checkpoint here (metrics only) and no evaluation with these settings in {cache}; "
              "skipping its evaluations", file=stream)
        return None
    key = {"step": step, **settings}
    if old is not None and old.get("key") == key:
        return old
    task, variables, cfg = checkpoint.load(d)
    out = {"key": key, "step": step}
    for name, batches in sets.items():
        if run == "decoder":
            out[name] = {"decoder_loss": ebt_think.decoder_loss(task, variables, batches)}
            continue
        res = {"curve": ebt_think.think_curve(task, variables, batches, settings["max_steps"])}
        if run == "ebt":
            noise = cfg.model.inference_noise()
            st0 = cfg.model.eval_steps()
            res["self_verification"] = {
                "steps": st0, "noise": noise,
                "loss": {str(g): ebt_think.self_verification(task, variables, batches, st0, g, noise)
                         for g in settings["groups"]}}
        out[name] = res
        print(f"{run} {name}: loss after 1..{settings['max_steps']} steps "
              + " ".join(f"{v:.4f}" for v in res["curve"]), file=stream, flush=True)
    out["trained_steps"] = None if run == "decoder" else [cfg.model.think_steps,
                                                          cfg.model.think_steps + cfg.model.think_steps_random]
    with open(cache, "w") as f:
        json.dump(out, f, indent=1)
    return out


def _rel(a: float, b: float) -> float:
    """(a - b) / a: the relative reduction from a to b (positive = b lower)."""
    return (a - b) / a if a else 0.0


def _claims(ev: dict, metrics: dict) -> list[dict]:
    """The issue's claims, each with the numbers behind it and whether our runs support it."""
    out = []
    e = ev.get("ebt")
    if e:
        k = e["trained_steps"][1]
        for name in ("id", "ood"):
            if name not in e:
                continue
            c = e[name]["curve"]
            longer = min(c[k:]) if len(c) > k else None
            if longer is not None:
                out.append({"claim": f"thinking longer than trained ({k} steps) lowers held-out loss [{name}]",
                            "numbers": f"{c[k - 1]:.4f} at {k} steps -> best {longer:.4f} at "
                                       f"{c.index(longer) + 1} steps ({100 * _rel(c[k - 1], longer):+.2f}%)",
                            "supported": bool(longer < c[k - 1]), "gain": _rel(c[k - 1], longer), "kind": "longer",
                            "set": name})
            sv = e[name].get("self_verification")
            if sv:
                g = sv["loss"]
                gs = sorted(g, key=int)
                best = min(g[x] for x in gs[1:]) if len(gs) > 1 else g[gs[0]]
                out.append({"claim": f"self-verification (best of G by energy) lowers it further [{name}]",
                            "numbers": ", ".join(f"G={x}: {g[x]:.4f}" for x in gs)
                                       + f" ({100 * _rel(g[gs[0]], best):+.2f}% best vs G={gs[0]})",
                            "supported": bool(best < g[gs[0]]), "gain": _rel(g[gs[0]], best), "kind": "verify",
                            "set": name})
        for kind, what in (("longer", "thinking longer"), ("verify", "self-verification")):
            gains = {c["set"]: c["gain"] for c in out if c.get("kind") == kind}
            if "id" in gains and "ood" in gains:
                out.append({"claim": f"the {what} gain is larger out of distribution",
                            "numbers": f"ID {100 * gains['id']:+.2f}% vs OOD {100 * gains['ood']:+.2f}%",
                            "supported": bool(gains["ood"] > gains["id"] and gains["ood"] > 0)})
    dec = ev.get("decoder")
    if e and dec:
        k = e["trained_steps"][1]
        for name in ("id", "ood"):
            if name in e and name in dec:
                el, dl = e[name]["curve"][k - 1], dec[name]["decoder_loss"]
                out.append({"claim": f"EBT loss approaches the same-size Transformer++ at equal tokens [{name}]",
                            "numbers": f"EBT {el:.4f} vs decoder {dl:.4f} (gap {el - dl:+.4f} nats)",
                            "supported": bool(el <= dl)})
    if "ebt" in metrics:
        base = metrics["ebt"]["eval_loss"]
        for r in ("no_replay", "no_langevin", "fixed_steps"):
            if r in metrics and base is not None and metrics[r]["eval_loss"] is not None:
                v = metrics[r]["eval_loss"]
                out.append({"claim": f"the regularizer matters: {LABELS[r]} is worse",
                            "numbers": f"eval loss {v:.4f} vs {base:.4f} with it ({v - base:+.4f})",
                            "supported": bool(v > base)})
    return out


def _run_metrics(root: str, runs: list[str]) -> dict:
    from axlearn_like import rundir
    from tools.compare_runs import read_metrics, series

    out = {}
    for r in runs:
        d = os.path.join(root, r)
        rows = read_metrics(d)
        cfg = rundir.read_config_file(os.path.join(d, "config.json"))
        _, ev = series(rows, "eval/loss")
        steps = int(max(rows)) if rows else 0
        out[r] = {"steps": steps, "target_steps": cfg.trainer.steps,
                  "tokens": steps * cfg.data.global_batch_size * cfg.data.seq_len,
                  "params": cfg.model.build().param_count(cfg.data.seq_len),
                  "flops_per_token": cfg.model.build().flops_per_token(cfg.data.seq_len),
                  "eval_loss": float(ev[-1]) if len(ev) else None}
    return out


def _plots(out: str, ev: dict, settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("id", "ood") if any(n in v for v in ev.values())]
    titles = {"id": "in distribution (held-out code)", "ood": "out of distribution (prose)"}
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, n in zip(axes[0], names):
        for i, (r, v) in enumerate(ev.items()):
            if n not in v:
                continue
            if r == "decoder":
                ax.axhline(v[n]["decoder_loss"], color="k", ls="--", lw=1, label=LABELS[r])
                continue
            c = v[n]["curve"]
            ax.plot(range(1, len(c) + 1), c, marker="o", ms=3, color=f"C{i}", label=LABELS[r])
            ax.axvline(v["trained_steps"][1], color=f"C{i}", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("thinking steps (dotted: trained maximum)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(titles[n])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "thinking.png"), dpi=120)
    plt.close(fig)
    e = ev.get("ebt")
    if e and any("self_verification" in e.get(n, {}) for n in names):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for i, n in enumerate(names):
            sv = e[n]["self_verification"]
            gs = sorted(sv["loss"], key=int)
            ax.plot([int(g) for g in gs], [sv["loss"][g] for g in gs], marker="o", color=f"C{i}", label=titles[n])
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"G candidates (lowest final energy kept); {sv['steps']} steps, noise {sv['noise']:g}")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title("EBT self-verification")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "self_verification.png"), dpi=120)
        plt.close(fig)


def _md(summary: dict) -> str:
    f = lambda v, fmt=".4f": "-" if v is None else format(v, fmt)  # noqa: E731
    lines = ["# EBT reproduction summary", "", "| run | steps (of target) | tokens | parameters | GFLOP/token | "
             "eval loss (training eval) |", "|---|---:|---:|---:|---:|---:|"]
    for r, m in summary["runs"].items():
        lines.append(f"| {LABELS[r]} | {m['steps']} ({m['target_steps']}) | {m['tokens'] / 1e6:.1f}M | "
                     f"{m['params'] / 1e6:.3f}M | {m['flops_per_token'] / 1e9:.3f} | {f(m['eval_loss'])} |")
    s = summary["settings"]
    for n, title in (("id", "in distribution"), ("ood", "out of distribution")):
        rows = [(r, v[n]) for r, v in summary["eval"].items() if n in v]
        if not rows:
            continue
        ks = [k for k in (1, 2, 3, 4, 8, 16, 32) if k <= s["max_steps"]]
        lines += ["", f"## Held-out loss, {title} ({s['batches']} batches)", "",
                  "| run | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in ks) + " | self-verification |",
                  "|---|" + "---:|" * (len(ks) + 1)]
        for r, v in rows:
            if "decoder_loss" in v:
                dl = f"{v['decoder_loss']:.4f}"  # no thinking: the same loss in every column
                lines.append(f"| {LABELS[r]} | " + " | ".join(dl for _ in ks) + " | - |")
                continue
            sv = v.get("self_verification")
            svs = "-" if not sv else ", ".join(f"G={g}: {x:.4f}" for g, x in sorted(sv["loss"].items(),
                                                                                    key=lambda t: int(t[0])))
            lines.append(f"| {LABELS[r]} | " + " | ".join(f"{v['curve'][k - 1]:.4f}" for k in ks) + f" | {svs} |")
    lines += ["", "## Claims", "", "| claim | ours | supported here |", "|---|---|---|"]
    for c in summary["claims"]:
        lines.append(f"| {c['claim']} | {c['numbers']} | {'yes' if c['supported'] else 'no'} |")
    return "\n".join(lines) + "\n"


def report(root: str, *, batches: int = 8, max_steps: int = 16, groups=(1, 4, 16), ood: bool = True,
           finished_only: bool = False, stream=None) -> dict:
    from axlearn_like import rundir
    from tools import compare_runs, ebt_think

    runs = present_runs(root)
    if not runs:
        raise ValueError(f"{root} holds no run with a metrics.jsonl (runs: {', '.join(RUNS)}); train first")
    out = os.path.join(root, "report")
    os.makedirs(out, exist_ok=True)
    compare_runs.compare([os.path.join(root, r) for r in runs], ["train/loss", "eval/loss"], x="tokens",
                         labels=[LABELS[r] for r in runs], smooth=5, out=os.path.join(out, "loss_vs_tokens.png"),
                         title="EBT vs same-size Transformer++ at equal tokens", stream=stream)
    settings = {"batches": batches, "max_steps": max_steps, "groups": list(groups), "ood": ood}
    with_ckpt = [r for r in runs if latest_step(os.path.join(root, r)) is not None]
    sets = {}
    if with_ckpt:  # the held-out sets, built once from the first run's data config (all runs share it)
        data = rundir.read_config_file(os.path.join(root, with_ckpt[0], "config.json")).data
        sets["id"] = ebt_think.eval_batches(data, batches)
        if ood:
            sets["ood"] = ebt_think.eval_batches(ood_data(data), batches)
    ev = {r: e for r in runs
          if (e := _eval_run(root, r, sets, settings, stream=stream, finished_only=finished_only)) is not None}
    metrics = _run_metrics(root, runs)
    summary = {"labels": {r: LABELS[r] for r in runs}, "settings": settings, "runs": metrics, "eval": ev,
               "claims": _claims(ev, metrics)}
    if ev:
        _plots(out, ev, settings)
    write_summary(out, summary, _md(summary), stream)
    return summary


def status(root: str, stream=None) -> int:
    return print_status(root, RUNS, stream)


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.repro_ebt", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a_train = sub.add_parser("train", help="train the named runs (resumes; skips finished ones)")
    a_rep = sub.add_parser("report", help="thinking / self-verification evaluations, figures and the summary")
    a_stat = sub.add_parser("status", help="run progress and the stage log")
    for a in (a_train, a_rep, a_stat):
        a.add_argument("root", nargs="?", default=DEFAULT_ROOT)
    a_train.add_argument("--runs", default="decoder,ebt", help=f"comma-separated subset of {','.join(RUNS)}")
    add_stage_args(a_train, tokenizer_bytes=30_000_000)
    a_rep.add_argument("--batches", type=int, default=8, help="eval batches per held-out set")
    a_rep.add_argument("--max-steps", type=int, default=16, help="thinking steps of the loss-vs-steps curve")
    a_rep.add_argument("--groups", default="1,4,16", help="self-verification candidate counts G")
    a_rep.add_argument("--no-ood", action="store_true", help="skip the out-of-distribution (prose) set")
    a_rep.add_argument("--finished-only", action="store_true",
                       help="evaluate only runs at their last step (the GPU calls: an unfinished run's evaluation "
                            "is replaced later anyway)")
    a = p.parse_args(argv)
    if a.cmd == "train":
        return train(a.root, [r for r in a.runs.split(",") if r], a.set, max_minutes=a.max_minutes,
                     tokenizer_bytes=a.tokenizer_bytes)
    if a.cmd == "report":
        report(a.root, batches=a.batches, max_steps=a.max_steps, groups=tuple(int(g) for g in a.groups.split(",")),
               ood=not a.no_ood, finished_only=a.finished_only)
        return 0
    return status(a.root)


if __name__ == "__main__":
    sys.exit(main())
