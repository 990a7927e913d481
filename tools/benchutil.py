"""Timing shared by the `tools.bench_*` scripts (docs/benchmarks.md, "Method": warm up, synchronise, repeat, take
the median).

Two clocks, both on the host:
- `timeit` (the default in every bench): `rounds` rounds of `reps` calls dispatched back to back, one
  `block_until_ready` per round; per-call time = round time / reps, median over rounds. Launch latency of the
  next call overlaps the running one, as with CUDA-event timers (triton.testing.do_bench, which measured the
  anchors), so sub-millisecond kernels are not charged ~50-100 us of host round trip each.
- `timeit_sync`: every call synchronised on its own; median and spread. What a single blocking call costs.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import tempfile
import time

import jax


def timeit(f, args, reps: int = 20, warmup: int = 3, rounds: int = 5) -> tuple[float, float]:
    """(median ms per call, spread ms = max - min over rounds) of f(*args) dispatched back to back."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    per = []
    n = max(1, reps // rounds) if reps >= rounds else reps
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = f(*args)  # one device stream: the last result ready implies all earlier ones ran
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t0) / n)
    return statistics.median(per) * 1e3, (max(per) - min(per)) * 1e3


def report(rows: dict, out: str | None) -> None:
    """Prints a bench's result dict as JSON and, with `out`, writes it there too."""
    print(json.dumps(rows, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)


def select_entries(all_entries: tuple, only: str | None) -> list[tuple[str, str]]:
    """An `--all` bench's (recipe, preset) entries: all of them, or those `--only R:P,...` names (an unknown name
    is one error line naming the choices)."""
    if not only:
        return list(all_entries)
    entries = [tuple(e.split(":", 1)) for e in only.split(",") if e]
    unknown = [":".join(e) for e in entries if e not in all_entries]
    if unknown:
        raise SystemExit(f"error: --only {','.join(unknown)} not in ALL; choose from "
                         + ",".join(f"{r}:{p}" for r, p in all_entries))
    return entries


def run_child(name: str, cmd: list[str], path: str, timeout: float | None) -> dict:
    """One benchmark process that writes its JSON result to `path` -> that result, or {"error": its last line}
    (timed out, or failed: the failure's last lines are printed, up to JAX's traceback-filtering note)."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: timed out after {timeout:.0f} s", flush=True)
        return {"error": f"timed out after {timeout:.0f} s"}
    print(f"{name}: exit {p.returncode} in {time.perf_counter() - t:.0f} s", flush=True)
    if p.returncode == 0 and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    lines = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
    if "--------------------" in lines:  # JAX's traceback-filtering note follows the error
        lines = lines[:len(lines) - lines[::-1].index("--------------------") - 1]
    print("  failed:\n    " + "\n    ".join(ln[:300] for ln in lines[-12:]), flush=True)
    return {"error": (lines[-1] if lines else "failed")[:300]}


def timeit_sync(f, args, reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(median ms, spread ms = max - min) of `reps` calls of f(*args), each synchronised on its own."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, (max(ts) - min(ts)) * 1e3


def load_perfetto(trace_dir: str) -> tuple[list[dict], set]:
    """Events of the newest Perfetto trace jax.profiler wrote under trace_dir (create_perfetto_trace=True), and
    the pids of its device tracks (process named '/device:...'; empty on backends without device tracks)."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    pname = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, {p for p, n in pname.items() if "/device:" in n.lower()}


# Kernel-name substrings -> the kind of work, for the per-kind summary of `device_ops`.
KINDS = (("matmul (cuBLAS/XLA gemm)", ("gemm", "cublas", "nvjet", "xmma", "cutlass", "dot")),
         ("attention (cuDNN)", ("cudnn", "flash", "fmha", "sdpa")),
         ("collective", ("all-to-all", "all_to_all", "all-gather", "reduce-scatter", "all-reduce", "nccl")),
         ("reduction fusion", ("reduce", "reduction")),
         ("other fusion / copy", ("fusion", "copy", "transpose", "convert", "memset", "memcpy", "concatenate",
                                  "dynamic", "scatter", "gather", "slice", "pad", "iota", "select", "broadcast")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "custom kernel (Triton/Pallas)"


def capture_trace(run) -> tuple[list[dict], set]:
    """Runs run() (which must block on its own results) under jax.profiler and returns `load_perfetto` of the
    trace it wrote: (events, device-track pids)."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        return load_perfetto(d)


def device_ops(f, args, calls: int = 3, top: int = 30) -> dict:
    """Profile `calls` back-to-back calls of f(*args) (already compiled/warm) with jax.profiler and sum device
    kernel time by kernel name. Returns {"per_call_ms": device busy ms per call, "ops": [(name, ms per call,
    count per call)] longest first (top N), "kinds": {kind: ms per call}}. Where a kernel comes from: its name
    (XLA fusions carry the HLO fusion name; Triton kernels their function name)."""
    jax.block_until_ready(f(*args))

    def run():
        out = None
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)

    events, dev = capture_trace(run)
    tot: dict[str, list] = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e.get("pid") not in dev:
            continue
        name = str(e.get("name", ""))
        t = tot.setdefault(name, [0.0, 0])
        t[0] += float(e["dur"]) * 1e-3 / calls
        t[1] += 1
    ops = sorted(((n, ms, c / calls) for n, (ms, c) in tot.items()), key=lambda r: -r[1])
    kinds: dict[str, float] = {}
    for n, ms, _ in ops:
        kinds[kind_of(n)] = kinds.get(kind_of(n), 0.0) + ms
    return {"per_call_ms": sum(ms for _, ms, _ in ops), "ops": ops[:top], "kinds": kinds}


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """Optimized HLO text (`compiled.as_text()`) -> {kernel name: "shape <- jax op_name"} for each instruction,
    keyed the way GPU kernels of XLA fusions are named ('loop_convert_fusion.62' runs as
    'loop_convert_fusion_62'), so a profile's top kernels can be traced back to the model code."""
    out = {}
    pat = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"")
    for line in hlo_text.splitlines():
        m = pat.match(line)
        if m:
            name, shape, op = m.groups()
            out[name.replace(".", "_").replace("-", "_")] = f"{shape.split('{')[0]} <- {op[-110:]}"
    return out


def print_device_ops(title: str, prof: dict, hlo_text: str | None = None) -> None:
    """Markdown tables of a `device_ops` result: kinds, then the top kernels (with the HLO shape and the jax
    op that produced each, when the compiled HLO text is given)."""
    src = hlo_sources(hlo_text) if hlo_text else {}
    busy = prof["per_call_ms"] or float("nan")
    print(f"\n{title}: device busy {busy:.3f} ms per call")
    print("| kind | ms/call | share |\n|---|---|---|")
    for k, ms in sorted(prof["kinds"].items(), key=lambda r: -r[1]):
        print(f"| {k} | {ms:.3f} | {100 * ms / busy:.1f}% |")
    print("| kernel | ms/call | launches/call | share |"
          + (" HLO shape <- op |\n|---|---|---|---|---|" if src else "\n|---|---|---|---|"))
    for n, ms, c in prof["ops"]:
        where = src.get(n.replace(".", "_").replace("-", "_"), "")
        print(f"| {n[:90]} | {ms:.3f} | {c:g} | {100 * ms / busy:.1f}% |" + (f" {where}" if src else ""))
