"""Issue 20: Buitrago & Gu's length generalization of Mamba-2, stage by stage into one root directory.

    python -m tools.repro_lengthgen pretrain  ROOT [--set K=V ...] [--max-minutes M]
    python -m tools.repro_lengthgen posttrain ROOT --init zeros,state_passing,fitted_noise,tbtt
                                              [--fraction 0.03 | --steps N] [--set K=V ...] [--max-minutes M] [--eval]
    python -m tools.repro_lengthgen eval      ROOT [--multiples 1,2,4,8,16,32] [--num-seqs 8] [--force] ...
    python -m tools.repro_lengthgen status    ROOT

ROOT (default runs/repro_lengthgen) holds:
  tokenizer.json   byte-level BPE trained on the preset's corpus (data.paths, default the Python installation's
                   sources and docs) with model.vocab_size ids; made by the first `pretrain`
  repro.json       the `--set` overrides of the pretraining (later calls reuse them; a differing --set is refused)
  pretrain/        the `recipes.mamba2 --preset repro_lengthgen` run (initial_state zeros)
  post_<init>/     a copy of the finished pretraining checkpoint, trained on for the post-training steps with
                   model.layer_pattern.mamba2.initial_state=<init> (tbtt also data.mode=tbtt), at the
                   pretraining schedule's floor learning rate (optimizer.decay_steps pinned at the pretraining's)
  eval/            length_eval.png/.json (per-position loss to 32x the training length, log x), effrem.png/.json,
                   passkey_<run>.png/.json, pretrain_curves.png, posttrain_curves.png (tools.compare_runs),
                   summary.md / summary.json
  stages.jsonl     one record per stage call: stage, arguments, host, device, start, end, wall time, steps

Every stage resumes: training stages continue from their run dir's latest checkpoint (a finished one is
skipped), `--max-minutes` stops a training stage cleanly (checkpoint, exit 0) so a call fits a time slot, and
`eval` recomputes only artifacts whose runs (or their steps) changed. The same commands run a tiny CPU version
with `--set` for size (tests/tools/test_repro_pipelines.py; docs/results/lengthgen.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from axlearn_like.checkpoint import checkpoint_dir
from axlearn_like.cli import tool_main
from tools.repro_util import Deadline, StageLog, add_stage_args, ensure_tokenizer, latest_step, run_stage, sets_argv

RECIPE, PRESET = "mamba2", "repro_lengthgen"
INITS = ("zeros", "state_passing", "fitted_noise", "tbtt")
DEFAULT_ROOT = "runs/repro_lengthgen"
DEFAULT_FRACTION = 0.03


def _paths(root: str) -> dict[str, str]:
    return {"tokenizer": os.path.join(root, "tokenizer.json"), "pretrain": os.path.join(root, "pretrain"),
            "eval": os.path.join(root, "eval"), "state": os.path.join(root, "repro.json")}


def post_dir(root: str, init: str) -> str:
    return os.path.join(root, f"post_{init}")


def _stored_sets(root: str, sets: list[str]) -> list[str] | None:
    """The pretraining overrides stored by the first call (None before it); a later call may repeat them or
    pass none."""
    path = _paths(root)["state"]
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        stored = json.load(f)["sets"]
    if sets and sets != stored:
        raise ValueError(f"{root} was started with --set {stored}; rerun with no --set (they are remembered) "
                         f"or the same ones, or use another root")
    return stored


def _pretrain_argv(root: str, sets: list[str]) -> list[str]:
    p = _paths(root)
    return ["--preset", PRESET, "--run-dir", p["pretrain"], *sets_argv([f"data.tokenizer={p['tokenizer']}", *sets])]


def _build(argv: list[str]):
    from axlearn_like.cli import build_config
    from recipes import mamba2

    cfg, _ = build_config(mamba2.config, argv, mamba2.PRESETS, prog=f"python -m recipes.{RECIPE}")
    return cfg


def pretrain(root: str, sets: list[str], *, max_minutes: float | None = None, tokenizer_bytes: int = 100_000_000,
             stream=None) -> int:
    deadline = Deadline(max_minutes)
    stored = _stored_sets(root, sets)
    sets = list(sets) if stored is None else stored
    argv = _pretrain_argv(root, sets)
    cfg = _build(argv)  # a bad --set fails here, before anything is written
    p = _paths(root)
    if stored is None:
        os.makedirs(root, exist_ok=True)
        with open(p["state"], "w") as f:
            json.dump({"recipe": RECIPE, "preset": PRESET, "sets": sets}, f, indent=1)
    target = cfg.trainer.steps
    with StageLog(root).stage("pretrain", from_step=latest_step(p["pretrain"]), target_step=target) as rec:
        ensure_tokenizer(p["tokenizer"], cfg, max_bytes=tokenizer_bytes, stream=stream)
        code = run_stage(rec, "pretrain", RECIPE, argv, p["pretrain"], target, deadline, stream=stream,
                         not_started="pretrain: the time budget went on the tokenizer; rerun the same command to train")
    return code or 0


def _copy_checkpoint(src_run: str, step: int, dst_run: str, *, with_checkpoint: bool = True) -> str:
    """dst_run <- src_run's config.json, metrics.jsonl (rows up to `step`) and checkpoint `step` (atomically:
    a temporary directory renamed into place, so an interrupted copy leaves nothing that looks like a run).
    with_checkpoint=False: fills the temporary directory without the checkpoint and returns it, unrenamed."""
    tmp = dst_run.rstrip("/") + ".copying"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(checkpoint_dir(tmp))
    if with_checkpoint:
        shutil.copytree(os.path.join(checkpoint_dir(src_run), str(step)), os.path.join(checkpoint_dir(tmp), str(step)))
    shutil.copy2(os.path.join(src_run, "config.json"), os.path.join(tmp, "config.json"))
    metrics = os.path.join(src_run, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f, open(os.path.join(tmp, "metrics.jsonl"), "w") as g:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        g.write(line)
                except json.JSONDecodeError:
                    pass
    if with_checkpoint:
        os.rename(tmp, dst_run)
    return tmp


def _graft_checkpoint(src_run: str, step: int, dst_run: str, dst_cfg) -> list[str]:
    """For a post-training whose train state has leaves the pretraining's lacks (tbtt carries the conv window,
    `carry/.../conv_state`): dst_run <- the pretraining state of `step` with those leaves (all in `carry`) set to
    zeros (an empty window, what a fresh run starts from), saved as step `step` under dst_cfg without a data
    iterator state (the trainer then seeks the new data iterator to batch `step`), plus config.json and
    metrics.jsonl as `_copy_checkpoint`. Returns the names of the zero-filled leaves."""
    import jax
    import jax.numpy as jnp

    from axlearn_like import config as config_lib, rundir
    from axlearn_like.checkpoint import CheckpointConfig, Checkpointer, leaf_name
    from axlearn_like.state_setup import build_state_setup

    src_cfg = rundir.read_config_file(os.path.join(src_run, "config.json"))
    src_setup = build_state_setup(src_cfg)
    dst_setup = build_state_setup(dst_cfg, mesh=src_setup.mesh)
    ck = Checkpointer(checkpoint_dir(src_run), CheckpointConfig(), read_only=True)
    try:
        state = ck.restore(step, src_setup.abstract_state)
    finally:
        ck.close()
    have = {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    added: list[str] = []

    def pick(path, a):
        name = leaf_name(path)
        x = have.get(name)
        if x is not None and tuple(x.shape) == tuple(a.shape) and x.dtype == a.dtype:
            return x
        if not name.startswith("carry."):
            raise ValueError(f"cannot start {dst_run} from {src_run}: its state has {name} {tuple(a.shape)} "
                             f"{a.dtype}, which the pretraining state lacks (only carried state can start at zero)")
        added.append(name)
        z = jnp.zeros(a.shape, a.dtype)
        return jax.device_put(z, a.sharding) if getattr(a, "sharding", None) is not None else z

    merged = jax.tree_util.tree_map_with_path(pick, dst_setup.abstract_state)
    tmp = _copy_checkpoint(src_run, step, dst_run, with_checkpoint=False)
    ck = Checkpointer(checkpoint_dir(tmp), dst_cfg.checkpoint)
    try:
        meta = {"step": step, "grafted_from": os.path.abspath(src_run), "zero_leaves": added,
                "global_batch_size": dst_cfg.data.global_batch_size, "seq_len": dst_cfg.data.seq_len,
                "process_count": jax.process_count(), "jax": jax.__version__}
        ck.save(step, merged, None, config_lib.to_dict(dst_cfg), meta, force=True)
        ck.wait()
    finally:
        ck.close()
    os.rename(tmp, dst_run)
    return added


def _needs_graft(src_run: str, step: int, dst_cfg) -> bool:
    """True when dst_cfg's train state differs from the saved pretraining state (names, shapes or dtypes)."""
    from axlearn_like.checkpoint import saved_signature, signature
    from axlearn_like.state_setup import build_state_setup

    saved = saved_signature(os.path.join(checkpoint_dir(src_run), str(step)))
    return saved != signature(build_state_setup(dst_cfg).abstract_state)


def posttrain(root: str, inits: list[str], *, steps: int | None = None, fraction: float | None = None,
              sets: list[str] = (), max_minutes: float | None = None, stream=None) -> int:
    deadline = Deadline(max_minutes)
    bad = [i for i in inits if i not in INITS]
    if bad or not inits:
        raise ValueError(f"--init: {bad or inits} not in {list(INITS)}")
    p = _paths(root)
    cfg_path = os.path.join(p["pretrain"], "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{p['pretrain']} holds no pretraining run; run `python -m tools.repro_lengthgen pretrain "
                         f"{root}` first")
    from axlearn_like import rundir

    pre_cfg = rundir.read_config_file(cfg_path)
    pre_steps = pre_cfg.trainer.steps
    decay = pre_cfg.optimizer.decay_steps or pre_steps  # pinned: post-training continues at the schedule's floor
    done = latest_step(p["pretrain"])
    if done is None or done < pre_steps:
        raise ValueError(f"pretraining in {p['pretrain']} is at step {done} of {pre_steps}; rerun "
                         f"`python -m tools.repro_lengthgen pretrain {root}` until it finishes")
    if steps is None:
        steps = max(1, round((DEFAULT_FRACTION if fraction is None else fraction) * pre_steps))
    target = pre_steps + steps
    log = StageLog(root)
    for init in inits:
        d = post_dir(root, init)
        with log.stage("posttrain", init=init, from_step=latest_step(d), target_step=target) as rec:
            extra = [f"trainer.steps={target}", f"optimizer.decay_steps={decay}",
                     f"model.layer_pattern.mamba2.initial_state={init}"]
            if init == "tbtt":
                extra.append("data.mode=tbtt")
            argv = ["--config", cfg_path, "--run-dir", d, *sets_argv([*extra, *sets])]
            if not os.path.isdir(d):
                dst_cfg = _build(argv)
                if _needs_graft(p["pretrain"], pre_steps, dst_cfg):
                    added = _graft_checkpoint(p["pretrain"], pre_steps, d, dst_cfg)
                    rec["zero_leaves"] = added
                    print(f"posttrain {init}: {d} starts from the pretraining state of step {pre_steps}, with "
                          f"{len(added)} carried array(s) it lacks at zero ({added[0]}, ...)", file=stream)
                else:
                    _copy_checkpoint(p["pretrain"], pre_steps, d)
                    print(f"posttrain {init}: {d} starts from the pretraining checkpoint {pre_steps}", file=stream)
            code = run_stage(rec, f"posttrain {init}", RECIPE, argv, d, target, deadline, rerun="rerun to continue",
                             announce=f"posttrain {init}: steps {pre_steps} -> {target} ({steps} steps, "
                                      f"{100.0 * steps / pre_steps:.2f}% of pretraining)", stream=stream)
        if code is not None:
            return code
    return 0


# ------------------------------------------------------------------------------------------------ evaluation
def finished_runs(root: str) -> list[tuple[str, str]]:
    """[(label, run dir)]: the finished pretraining, then every finished post-training, in INITS order."""
    from axlearn_like import rundir

    out = []
    for label, d in [("pretrain", _paths(root)["pretrain"])] + [(f"post_{i}", post_dir(root, i)) for i in INITS]:
        cfg_path = os.path.join(d, "config.json")
        if not os.path.isfile(cfg_path):
            continue
        if (latest_step(d) or -1) >= rundir.read_config_file(cfg_path).trainer.steps:
            out.append((label, d))
    return out


def _fresh(manifest: dict, name: str, key: list) -> bool:
    return manifest.get(name) == key


def evaluate(root: str, *, multiples=(1, 2, 4, 8, 16, 32), num_seqs: int = 8, effrem_T: int | None = None,
             effrem_points: int = 24, effrem_seqs: int = 4, passkey_multiples=(1, 4, 16, 32),
             passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_trials: int = 8, chunk: int | None = None,
             only=("length", "effrem", "passkey"), force: bool = False, stream=None) -> dict:
    from axlearn_like import rundir
    from tools import compare_runs, effrem, length_eval, passkey_eval

    runs = finished_runs(root)
    if not runs:
        raise ValueError(f"{root} has no finished run to evaluate; run the pretrain stage first")
    out = _paths(root)["eval"]
    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, "manifest.json")
    manifest = {}
    if os.path.isfile(mpath) and not force:
        with open(mpath) as f:
            manifest = json.load(f)
    pre_cfg = rundir.read_config_file(os.path.join(_paths(root)["pretrain"], "config.json"))
    L = pre_cfg.data.seq_len
    dirs = [d for _, d in runs]
    key = [[lab, latest_step(d)] for lab, d in runs]
    summary = {"train_len": L, "runs": dict(runs), "steps": dict(key)}
    with StageLog(root).stage("eval", runs=[lab for lab, _ in runs]) as rec:
        lengths = [m * L for m in multiples]
        args = [lengths, num_seqs, chunk]
        if "length" in only and not _fresh(manifest, "length_eval", [key, args]):
            length_eval.evaluate(dirs, lengths, num_seqs=num_seqs, chunk=chunk,
                                 out=os.path.join(out, "length_eval.png"), stream=stream)
            manifest["length_eval"] = [key, args]
        T = effrem_T or 8 * L
        args = [T, effrem_points, effrem_seqs, chunk]
        if "effrem" in only and not _fresh(manifest, "effrem", [key, args]):
            effrem.run(dirs, T, points=effrem_points, num_seqs=effrem_seqs, chunk=chunk,
                       out=os.path.join(out, "effrem.png"), stream=stream)
            manifest["effrem"] = [key, args]
        pk_lengths = [m * L for m in passkey_multiples]
        for lab, d in runs:
            args = [pk_lengths, list(passkey_depths), passkey_trials, chunk]
            name = f"passkey_{lab}"
            if "passkey" in only and not _fresh(manifest, name, [latest_step(d), args]):
                passkey_eval.run(d, pk_lengths, list(passkey_depths), trials=passkey_trials, chunk=chunk,
                                 out=os.path.join(out, f"{name}.png"), stream=stream)
                manifest[name] = [latest_step(d), args]
        # training curves: the pretraining (log steps), the post-trainings from the pretraining's last step
        compare_runs.compare([dirs[0]], ["train/loss", "eval/loss", "train/grad_norm", "train/lr"], logx=True,
                             out=os.path.join(out, "pretrain_curves.png"), title="pretraining", stream=stream)
        post = [(lab, d) for lab, d in runs if lab != "pretrain"]
        if post:
            compare_runs.compare([d for _, d in post], ["train/loss", "eval/loss"], labels=[lab for lab, _ in post],
                                 min_step=pre_cfg.trainer.steps, out=os.path.join(out, "posttrain_curves.png"),
                                 title="post-training (from the pretraining's last step)", stream=stream)
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1)
        summary.update(_summarize(out, runs, L))
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(_summary_md(summary))
        rec["outputs"] = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    print(f"wrote {out}/summary.md", file=stream)
    return summary


def _summarize(out: str, runs, L: int) -> dict:
    """The numbers of the artifacts present (an `--only` eval leaves the others out)."""
    def load(name):
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    le, ef = load("length_eval.json"), load("effrem.json")
    res: dict = {"length": {}, "effrem": {}, "passkey": {}}
    for lab, d in runs:
        if d in le:
            res["length"][lab] = le[d]["rows"]
        if d in ef:
            res["effrem"][lab] = {"t": ef[d]["t"], "effrem": ef[d]["effrem"]}
        pk = load(f"passkey_{lab}.json")
        if pk:
            res["passkey"][lab] = {"lengths": pk["lengths"],
                                   "mean_accuracy": [sum(col) / len(col) for col in zip(*pk["accuracy"])]}
    return res


def _summary_md(s: dict) -> str:
    L = s["train_len"]
    lines = [f"# Length generalization summary (training length {L})"]
    if s["length"]:
        labs = list(s["length"])
        lengths = [r["length"] for r in s["length"][labs[0]]]
        lines += ["", "Per-position loss on held-out text, mean over (L/2, L] (nats/token):", "",
                  "| run | step | " + " | ".join(f"{n // L}x ({n})" for n in lengths) + " |",
                  "|---|---:|" + "---:|" * len(lengths)]
        for lab in labs:
            vals = " | ".join(f"{r['last_half_loss']:.4f}" for r in s["length"][lab])
            lines.append(f"| {lab} | {s['steps'][lab]} | {vals} |")
    if s["effrem"]:
        labs = list(s["effrem"])
        lines += ["", "EffRem_T(t) at a few t (T = the effrem.png context):", ""]
        t = s["effrem"][labs[0]]["t"]
        pick = sorted({0, 1, len(t) // 4, len(t) // 2, 3 * len(t) // 4, len(t) - 1})
        lines += ["| run | " + " | ".join(f"t={t[i]}" for i in pick) + " |", "|---|" + "---:|" * len(pick)]
        for lab in labs:
            e = s["effrem"][lab]["effrem"]
            lines.append(f"| {lab} | " + " | ".join(f"{e[i]:.3f}" for i in pick) + " |")
    if s["passkey"]:
        labs = list(s["passkey"])
        pk_l = s["passkey"][labs[0]]["lengths"]
        lines += ["", "Passkey accuracy (mean over depths):", "",
                  "| run | " + " | ".join(str(n) for n in pk_l) + " |", "|---|" + "---:|" * len(pk_l)]
        for lab in labs:
            lines.append(f"| {lab} | " + " | ".join(f"{a:.2f}" for a in s["passkey"][lab]["mean_accuracy"]) + " |")
    return "\n".join(lines) + "\n"


def status(root: str, stream=None) -> int:
    from axlearn_like import rundir

    for lab, d in [("pretrain", _paths(root)["pretrain"])] + [(f"post_{i}", post_dir(root, i)) for i in INITS]:
        cfg_path = os.path.join(d, "config.json")
        if os.path.isfile(cfg_path):
            print(f"{lab:<20} step {latest_step(d)} of {rundir.read_config_file(cfg_path).trainer.steps}", file=stream)
        else:
            print(f"{lab:<20} not started", file=stream)
    for r in StageLog(root).records():
        print(f"  {r['started']} {r['stage']:<10} {r.get('init', ''):<14} {r['status']:<22} {r['wall_s']:>8.1f}s "
              f"steps {r.get('from_step')} -> {r.get('to_step', r.get('target_step'))}  [{r['device']}]", file=stream)
    return 0


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


@tool_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.repro_lengthgen", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a_pre = sub.add_parser("pretrain", help="train the tokenizer if missing, then pretrain (resumes)")
    a_post = sub.add_parser("posttrain", help="post-train from the finished pretraining, one run per --init")
    a_eval = sub.add_parser("eval", help="length_eval, effrem, passkey, training curves, summary")
    a_stat = sub.add_parser("status", help="stage progress and the stage log")
    for a in (a_pre, a_post, a_eval, a_stat):
        a.add_argument("root", nargs="?", default=DEFAULT_ROOT)
    add_stage_args(a_pre, tokenizer_bytes=100_000_000)
    add_stage_args(a_post)
    a_post.add_argument("--init", required=True, help=f"comma-separated subset of {','.join(INITS)}")
    a_post.add_argument("--steps", type=int, default=None, help="post-training steps (default: --fraction)")
    a_post.add_argument("--fraction", type=float, default=None,
                        help=f"post-training steps as a fraction of the pretraining's (default {DEFAULT_FRACTION})")
    a_post.add_argument("--eval", action="store_true", help="then run the eval stage (defaults) in this process")
    for a in (a_post, a_eval):
        a.add_argument("--num-seqs", type=int, default=8)
        a.add_argument("--chunk", type=int, default=None)
    a_eval.add_argument("--multiples", default="1,2,4,8,16,32", help="lengths as multiples of the training length")
    a_eval.add_argument("--effrem-T", type=int, default=None, help="EffRem context (default 8x training length)")
    a_eval.add_argument("--effrem-points", type=int, default=24)
    a_eval.add_argument("--effrem-seqs", type=int, default=4)
    a_eval.add_argument("--passkey-multiples", default="1,4,16,32")
    a_eval.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1")
    a_eval.add_argument("--passkey-trials", type=int, default=8)
    a_eval.add_argument("--only", default="length,effrem,passkey",
                        help="comma-separated subset of length,effrem,passkey (e.g. `--only length` right after "
                             "pretraining: does the control fail?)")
    a_eval.add_argument("--force", action="store_true", help="recompute every artifact")
    a = p.parse_args(argv)
    if a.cmd == "pretrain":
        return pretrain(a.root, a.set, max_minutes=a.max_minutes, tokenizer_bytes=a.tokenizer_bytes)
    if a.cmd == "posttrain":
        inits = [x for x in a.init.split(",") if x]
        code = posttrain(a.root, inits, steps=a.steps, fraction=a.fraction, sets=a.set, max_minutes=a.max_minutes)
        if code == 0 and a.eval:
            finished = {lab for lab, _ in finished_runs(a.root)}
            if all(f"post_{i}" in finished for i in inits):
                evaluate(a.root, num_seqs=a.num_seqs, chunk=a.chunk)
            else:
                print("posttrain: not every requested run finished; eval skipped (rerun to continue)")
        return code
    if a.cmd == "eval":
        evaluate(a.root, multiples=_ints(a.multiples), num_seqs=a.num_seqs, effrem_T=a.effrem_T,
                 effrem_points=a.effrem_points, effrem_seqs=a.effrem_seqs,
                 passkey_multiples=_ints(a.passkey_multiples),
                 passkey_depths=[float(x) for x in a.passkey_depths.split(",") if x],
                 passkey_trials=a.passkey_trials, chunk=a.chunk, only=[x for x in a.only.split(",") if x],
                 force=a.force)
        return 0
    return status(a.root)


if __name__ == "__main__":
    sys.exit(main())
