"""Several-device benchmarks, one subprocess per configuration (each sees only the devices it uses).

  python -m tools.bench_scaling weak   --devices 1,2,4,8 [--preset gpu_1b] [--per-device-batch B]
      Weak scaling, FSDP (mesh.data=1, mesh.fsdp=N, global batch = B x N): step time, tokens/s per device,
      MFU, and per-device throughput relative to the 1-device run (the goal is >= 90% at 8).
  python -m tools.bench_scaling moe    --devices N --limited-m M [--preset gpu_0p8b]
      Expert parallelism (mesh.expert=N, all-to-all inside shard_map): device-limited routing
      (model.ffn_pattern.moe.device_limited_m=M) vs unrestricted, same steps: tokens/s, MaxVio, final loss, and the
      share of step time in all-to-all kernels (jax.profiler trace; 'n/a' with the reason if it fails).
  python -m tools.bench_scaling resume --devices N [--preset default]
      Kill-and-resume on N devices (FSDP): an uninterrupted run, a run SIGKILLed after its first checkpoint
      and rerun; per-step losses after the resume must match bitwise.

Every child gets NCCL_NVLS_ENABLE=0 (and the PyTorch/NVSHMEM twins): NVLink multicast must stay off on the
shared hosts. On a GPU host, children get CUDA_VISIBLE_DEVICES=0..N-1 and device counts above the visible
GPUs are skipped with one line; without GPUs, N CPU devices are simulated (XLA_FLAGS host device count), so
the tool runs (slowly, tiny configs via --set) anywhere. Results: a markdown table on stdout, plus
<out>/<mode>.json and <out>/<mode>.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from axlearn_like.metrics import train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ------------------------------------------------------------------------------------------- devices, env
def visible_gpus() -> int:
    """GPUs this process may use, without initialising JAX here (a child must own the devices)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu" or cvd in ("", "-1"):
        return 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(line.startswith("GPU ") for line in out.splitlines())
    return min(n, len(cvd.split(","))) if cvd else n


def child_env(n: int, gpus: int, deterministic: bool = False, **more) -> dict[str, str]:
    e = dict(os.environ)
    e.update(NO_MULTICAST)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        e["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:n])
        if deterministic:
            flags.append("--xla_gpu_deterministic_ops=true")
    else:
        e["JAX_PLATFORMS"] = "cpu"
        flags.append(f"--xla_force_host_platform_device_count={n}")
    e["XLA_FLAGS"] = " ".join(flags)
    e.update({k: str(v) for k, v in more.items()})
    return e


def usable_counts(counts: list[int], gpus: int) -> list[int]:
    keep = []
    for n in counts:
        if gpus and n > gpus:
            print(f"skipping {n} devices: only {gpus} GPU(s) visible", flush=True)
        else:
            keep.append(n)
    return keep


def _run(cmd, env, timeout, log_path):
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    with open(log_path, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n# rc {r.returncode}, {time.perf_counter() - t:.1f} s\n{r.stdout}\n{r.stderr}")
    return r


def _bench(out_dir, tag, n, gpus, recipe, preset, sets, a, profile_steps=0):
    """One tools.bench_train child on n devices -> its JSON dict (or {'error': ...})."""
    path = os.path.join(out_dir, f"{tag}.json")
    cmd = [sys.executable, "-m", "tools.bench_train", "--recipe", recipe, "--preset", preset, "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--no-save", "--no-anchor", "--json", path]
    if profile_steps:
        cmd += ["--profile-steps", str(profile_steps)]
    for s in sets:
        cmd += ["--set", s]
    print(f"[{tag}] {n} device(s): running ...", flush=True)
    r = _run(cmd, child_env(n, gpus), a.timeout, os.path.join(out_dir, f"{tag}.log"))
    tail = ((r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"])[0][:300]
    if not os.path.exists(path):
        print(f"[{tag}] FAILED (rc {r.returncode}): {tail}", flush=True)
        return {"error": f"rc {r.returncode}: {tail}"}
    with open(path) as f:
        res = json.load(f)
    if r.returncode != 0:  # bench_train writes its JSON before profiling: a profiler crash keeps the timings
        print(f"[{tag}] child failed after timing (rc {r.returncode}): {tail}", flush=True)
        res["profile_error"] = f"child rc {r.returncode} while profiling: {tail}"
    return res


def _batch_per_device(recipe, preset, sets, given):
    if given:
        return given
    import importlib

    from axlearn_like import config as config_lib

    cfg = config_lib.apply_overrides(importlib.import_module(f"recipes.{recipe}").PRESETS[preset](), sets)
    return cfg.data.global_batch_size


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _emit(out_dir, mode, result, md):
    with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, f"{mode}.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md, flush=True)


# ----------------------------------------------------------------------------------------------- modes
def weak(a, gpus) -> dict:
    counts = usable_counts(a.devices, gpus)
    b = _batch_per_device(a.recipe, a.preset, a.set, a.per_device_batch)
    rows = []
    for n in counts:
        sets = list(a.set) + ["mesh.data=1", f"mesh.fsdp={n}", "mesh.expert=1", "mesh.tensor=1",
                              f"data.global_batch_size={b * n}"]
        r = _bench(a.out, f"weak_{n}", n, gpus, a.recipe, a.preset, sets, a, a.profile_steps)
        rows.append(dict(devices=n, **r))
    base = next((r for r in rows if r["devices"] == 1 and "error" not in r), None)
    if base is None and a.baseline:  # a 1-device row from an earlier run (weak.json or a bench_train JSON)
        with open(a.baseline) as f:
            old = json.load(f)
        base = next((r for r in old.get("rows", [dict(old, devices=old.get("num_devices"))])
                     if r.get("devices") == 1 and "error" not in r), None)
        if base is None:
            print(f"--baseline {a.baseline}: no 1-device row; relative throughput stays n/a", flush=True)
    for r in rows:
        if "error" not in r and base:
            r["relative_per_device"] = r["tokens_per_s_per_device"] / base["tokens_per_s_per_device"]
    head = ["GPUs" if gpus else "devices", "global batch", "step ms", "tokens/s", "tokens/s per device", "MFU",
            "per-device vs 1", "all-gather", "reduce-scatter", "all-reduce", "peak mem GiB"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["devices"], "failed: " + r["error"]] + [""] * (len(head) - 2))
            continue
        cs = r.get("collective_share") or {}
        mem = r.get("peak_memory_bytes")
        body.append([r["devices"], r["global_batch"], _fmt(r["step_s"] * 1e3, ".1f"), _fmt(r["tokens_per_s"], ",.0f"),
                     _fmt(r["tokens_per_s_per_device"], ",.0f"),
                     _fmt(100 * r["mfu"], ".1f") + "%" if r.get("mfu") else "n/a",
                     _fmt(100 * r["relative_per_device"], ".1f") + "%" if "relative_per_device" in r else "n/a",
                     _fmt(100 * cs["all-gather"], ".1f") + "%" if cs else "n/a",
                     _fmt(100 * cs["reduce-scatter"], ".1f") + "%" if cs else "n/a",
                     _fmt(100 * cs["all-reduce"], ".1f") + "%" if cs else "n/a",
                     _fmt(mem / 2**30, ".1f") if mem else "n/a"])
    md = (f"weak scaling {a.recipe}:{a.preset}, FSDP, {b} sequences per device, median of {a.steps} steps\n\n"
          + _table(head, body))
    result = {"mode": "weak", "recipe": a.recipe, "preset": a.preset, "per_device_batch": b, "rows": rows,
              "baseline": (None if base is None
                           else {k: base[k] for k in ("devices", "step_s", "tokens_per_s_per_device")})}
    _emit(a.out, "weak", result, md)
    return result


def moe(a, gpus) -> dict:
    n = a.devices[0]
    if not usable_counts([n], gpus):
        return {"mode": "moe", "skipped": True, "rows": []}
    b = _batch_per_device(a.recipe, a.preset, a.set, a.per_device_batch)
    common = list(a.set) + ["mesh.data=1", "mesh.fsdp=1", f"mesh.expert={n}", "mesh.tensor=1",
                            f"data.global_batch_size={b * n}"]
    variants = [("unrestricted", None)]
    if a.limited_m is not None and a.limited_m < n:
        variants.append((f"device-limited M={a.limited_m}", a.limited_m))
    elif a.limited_m is not None:
        print(f"device-limited M={a.limited_m} needs M < devices={n}; running the unrestricted row only", flush=True)
    rows = []
    for name, m in variants:
        sets = common + ([f"model.ffn_pattern.moe.device_limited_m={m}"] if m else [])
        tag = f"moe_{n}_{'all' if m is None else f'm{m}'}"
        r = _bench(a.out, tag, n, gpus, a.recipe, a.preset, sets, a, a.profile_steps)
        rows.append(dict(routing=name, devices=n, **r))
    steps_done = next((r["final_step"] for r in rows if "final_step" in r), a.warmup + a.steps + 1)
    head = ["routing", "devices", "step ms", "tokens/s", "tokens/s per device", "MaxVio (mean / max layer)",
            f"loss after {steps_done} steps", "all-to-all share"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["routing"], n, "failed: " + r["error"]] + [""] * (len(head) - 3))
            continue
        cs = r.get("collective_share")
        if cs:
            a2a = _fmt(100 * cs["all-to-all"], ".1f") + "%"
        else:
            a2a = f"n/a ({r.get('profile_error') or 'not profiled'})"
        body.append([r["routing"], n, _fmt(r["step_s"] * 1e3, ".1f"), _fmt(r["tokens_per_s"], ",.0f"),
                     _fmt(r["tokens_per_s_per_device"], ",.0f"),
                     f"{_fmt(r['maxvio_batch_mean'], '.3f')} / {_fmt(r['maxvio_batch_max'], '.3f')}",
                     _fmt(r["final_loss"], ".4f"), a2a])
    md = (f"MoE {a.recipe}:{a.preset}, mesh.expert={n}, {b} sequences per device, median of {a.steps} steps "
          f"(loss: same 4 random batches, same steps)\n\n" + _table(head, body))
    result = {"mode": "moe", "recipe": a.recipe, "preset": a.preset, "per_device_batch": b, "rows": rows}
    _emit(a.out, "moe", result, md)
    return result


def _saved_steps(run_dir) -> list[int]:
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def resume(a, gpus) -> dict:
    n = a.devices[0]
    if not usable_counts([n], gpus):
        return {"mode": "resume", "skipped": True}
    steps, every = a.resume_steps, a.checkpoint_every
    sets = list(a.set) + ["mesh.data=1", f"mesh.fsdp={n}", f"trainer.steps={steps}", f"checkpoint.every_steps={every}",
                          "trainer.log_every=1", "trainer.eval_batches=0", "trainer.progress=false",
                          "model.sample.tokens=0"]

    def cmd(run_dir):
        c = [sys.executable, "-m", f"recipes.{a.recipe}", "--run-dir", run_dir, "--preset", a.preset]
        for s in sets:
            c += ["--set", s]
        return c

    ref_dir, kill_dir = os.path.join(a.out, "resume_reference"), os.path.join(a.out, "resume_killed")
    for d in (ref_dir, kill_dir):
        shutil.rmtree(d, ignore_errors=True)
    env = child_env(n, gpus, deterministic=True)
    print(f"[resume] {n} device(s): uninterrupted run ...", flush=True)
    r = _run(cmd(ref_dir), env, a.timeout, os.path.join(a.out, "resume_reference.log"))
    result = {"mode": "resume", "devices": n, "recipe": a.recipe, "preset": a.preset, "steps": steps}
    if r.returncode != 0:
        result["error"] = f"reference run failed (rc {r.returncode}); see resume_reference.log"
    else:
        # The kill must land after the first checkpoint and before the end: slow each step down.
        print("[resume] run to be killed ...", flush=True)
        log = open(os.path.join(a.out, "resume_killed_1.log"), "w")
        proc = subprocess.Popen(cmd(kill_dir), cwd=REPO, env=dict(env, AXL_FAULT_SLEEP_S=str(a.fault_sleep)),
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + a.timeout
        while time.time() < deadline and every not in _saved_steps(kill_dir) and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(a.fault_sleep * 1.5)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        saved = _saved_steps(kill_dir)
        result["killed"] = killed
        result["resumed_from"] = max(saved) if saved else None
        print("[resume] rerun (auto-resume) ...", flush=True)
        r2 = _run(cmd(kill_dir), env, a.timeout, os.path.join(a.out, "resume_killed_2.log"))
        if not killed or not saved or max(saved) >= steps:
            result["error"] = f"the kill did not land between checkpoints (killed={killed}, saved={saved})"
        elif r2.returncode != 0:
            result["error"] = f"resumed run failed (rc {r2.returncode}); see resume_killed_2.log"
        elif f"Resuming from checkpoint at step {max(saved)}" not in r2.stdout:
            result["error"] = "the rerun did not report resuming"
        if "error" not in result:
            la, lb = train_losses(ref_dir), train_losses(kill_dir)
            after = list(range(max(saved) + 1, steps + 1))
            diffs = {s: (la.get(s), lb.get(s)) for s in after}
            result["compared_steps"] = after
            result["losses_reference"] = [la.get(s) for s in after]
            result["losses_resumed"] = [lb.get(s) for s in after]
            result["bitwise_equal"] = all(x is not None and x == y for x, y in diffs.values())
            result["max_abs_diff"] = max((abs(x - y) for x, y in diffs.values() if x is not None and y is not None),
                                         default=None)
    ok = result.get("bitwise_equal")
    md = _table(["devices", "killed after checkpoint", "steps compared", "losses bitwise equal", "max |diff|"], [[
        n, result.get("resumed_from", "n/a"),
        f"{result['compared_steps'][0]}-{result['compared_steps'][-1]}" if result.get("compared_steps") else "n/a",
        {True: "yes", False: "NO"}.get(ok, "n/a (" + result.get("error", "?") + ")"),
        _fmt(result.get("max_abs_diff"), ".3g")]])
    md = (f"kill-and-resume {a.recipe}:{a.preset}, FSDP over {n} device(s), {steps} steps, "
          f"checkpoint every {every}\n\n" + md)
    _emit(a.out, "resume", result, md)
    return result


DEFAULTS = {"weak": ("dense_lm", "gpu_1b"), "moe": ("moe", "gpu_0p8b"), "resume": ("dense_lm", "default")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=sorted(DEFAULTS))
    p.add_argument("--devices", default=None, help="comma-separated device counts (weak: 1,2,4,8; moe/resume: one)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--set", action="append", default=[], help="override for every child, k=v")
    p.add_argument("--per-device-batch", type=int, default=None,
                   help="sequences per device (default: the preset's batch)")
    p.add_argument("--baseline", default=None,
                   help="weak: weak.json of an earlier run whose 1-device row is the reference when --devices has no 1")
    p.add_argument("--limited-m", type=int, default=None, help="moe: device_limited_m for the limited row")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=None,
                   help="traced steps for collective shares (weak: 0, moe: 3)")
    p.add_argument("--resume-steps", type=int, default=12)
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--fault-sleep", type=float, default=0.5, help="resume: seconds slept per step in the killed run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    p.add_argument("--out", default=None, help="results folder (default: a new temporary one)")
    a = p.parse_args(argv)
    recipe, preset = DEFAULTS[a.mode]
    a.recipe, a.preset = a.recipe or recipe, a.preset or preset
    a.devices = [int(x) for x in (a.devices or ("1,2,4,8" if a.mode == "weak" else "2")).split(",")]
    if a.mode != "weak" and len(a.devices) != 1:
        p.error(f"{a.mode} takes one device count, e.g. --devices 8")
    if a.profile_steps is None:
        a.profile_steps = 3 if a.mode == "moe" else 0
    a.out = a.out or tempfile.mkdtemp(prefix=f"bench_scaling_{a.mode}_")
    os.makedirs(a.out, exist_ok=True)
    gpus = visible_gpus()
    print(f"bench_scaling {a.mode}: {'%d GPU(s) visible' % gpus if gpus else 'no GPU: simulated CPU devices'}; "
          f"results in {a.out}", flush=True)
    result = {"weak": weak, "moe": moe, "resume": resume}[a.mode](a, gpus)
    if a.mode == "resume":
        return 0 if result.get("skipped") or result.get("bitwise_equal") else 1
    return 0 if all("error" not in r for r in result.get("rows", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
