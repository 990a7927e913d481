"""Compile one Triton kernel of the project for a Hopper GPU on any machine (no GPU needed) and count what its
machine code does per loop: instructions, register-spill stores / loads (STL / LDL), tensor-core ops (HGMMA).

    python -m tools.kernel_sass kernels.simplicial.triton_gpu:_bwd_q_kernel --type '*bf16' \\
        --type SEGS,RUNS='*i32' --type LSE,DELTA,T2,U2='*fp32' --const S=8192 --const HKV=1 --const G=64 \\
        --const W1=512 --const W2=32 --const DK=128 --const DV=128 --const DKP=128 --const DVP=128 \\
        --const W2P=32 --const GH=4 --const BJ=64 --const SCALE=0.088 --const PREC=tf32 --const SEG=1 \\
        --const RECUR=0 --num-warps 8 --num-stages 2

Triton's own ptxas and nvdisasm (shipped in its wheel) do the work, so the counts are those of the cubin a GPU
would run: a spill inside the hot loop is the first thing to look for when a kernel variant is slower than its
FLOPs say, and it can be checked here before any GPU time is spent. Loops are found as backward branches in the
SASS; nested loops are listed separately (the outer one includes the inner one's instructions).
Needs triton importable, or a directory holding it in AXL_TRITON_SITE (`make test` fills .venv/triton).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile


def _import_triton():
    site = os.environ.get("AXL_TRITON_SITE", "")
    if site and site not in sys.path:
        sys.path.append(site)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("error: triton is not importable; pip install triton==3.6.0 (or set AXL_TRITON_SITE to "
                         "a directory holding it)") from None
    return sys.modules["triton"]


def _value(text: str):
    """'8192' -> 8192, '0.5' -> 0.5, '1'/'0' stay ints (Triton takes them for bool constexprs), else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def loops(sass: str) -> list[dict]:
    """SASS text (nvdisasm -c) -> one dict per loop (a branch back to an earlier label): start/end addresses and
    counts of instructions, STL, LDL, HGMMA between them."""
    instrs, labels, pending = [], {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            addr = int(m.group(1), 16)
            instrs.append((addr, m.group(2)))
            if pending:
                labels[pending], pending = addr, None
    out = []
    for addr, text in instrs:
        m = re.search(r"\bBRA\b.*?\.?(L_x_\d+)", text)
        if m and labels.get(m.group(1), addr) < addr:
            body = [t for a, t in instrs if labels[m.group(1)] <= a <= addr]
            out.append({"start": labels[m.group(1)], "end": addr, **_counts(body)})
    return sorted(out, key=lambda d: d["start"])


def _counts(body: list[str]) -> dict:
    return {"instructions": len(body), "STL": sum(" STL" in f" {t}" for t in body),
            "LDL": sum(" LDL" in f" {t}" for t in body), "HGMMA": sum("HGMMA" in t for t in body)}


def compile_kernel(target: str, types: dict[str, str], default_type: str, consts: dict, num_warps: int,
                   num_stages: int, arch: int = 90) -> dict:
    """-> {"registers", "spill_stores_bytes", "spill_loads_bytes", "kernel": counts, "loops": [...]}."""
    triton = _import_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    params = list(inspect.signature(fn.fn).parameters)
    unknown = sorted(set(consts) - set(params)) + sorted(set(types) - set(params))
    if unknown:
        raise SystemExit(f"error: {name} has no parameter(s) {', '.join(unknown)}; it takes {', '.join(params)}")
    sig = {p: "constexpr" if p in consts else types.get(p, default_type) for p in params}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(kernel.asm["ptx"])
        with open(os.path.join(d, "k.cubin"), "wb") as f:
            f.write(kernel.asm["cubin"])
        ptxas = subprocess.run([os.path.join(tools, "ptxas"), f"-arch={sm}", "-v", os.path.join(d, "k.ptx"), "-o",
                                os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, check=True).stdout
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, ptxas)) else None
    body = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores_bytes": grab(r"(\d+) bytes spill stores"),
            "spill_loads_bytes": grab(r"(\d+) bytes spill loads"), "kernel": _counts(body), "loops": loops(sass)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="module:kernel, e.g. kernels.simplicial.triton_gpu:_bwd_q_kernel")
    p.add_argument("--type", action="append", default=[], metavar="[NAMES=]TYPE",
                   help="argument types: '*bf16' for every non-constexpr argument not named elsewhere (default "
                        "'*fp32'), or A,B='*i32', N=i32")
    p.add_argument("--const", action="append", default=[], metavar="NAME=VALUE", help="a constexpr parameter")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=2)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    a = p.parse_args(argv)
    default_type, types = "*fp32", {}
    for spec in a.type:
        names, sep, ty = spec.rpartition("=")
        if not sep:
            default_type = ty
        for n in filter(None, names.split(",")):
            types[n] = ty
    consts = {}
    for kv in a.const:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"error: --const {kv}: write NAME=VALUE")
        consts[k] = _value(v)
    r = compile_kernel(a.target, types, default_type, consts, a.num_warps, a.num_stages, a.arch)
    k = r["kernel"]
    print(f"{a.target} (sm_{a.arch}, {a.num_warps} warps, {a.num_stages} stages): {r['registers']} registers, "
          f"spill stores {r['spill_stores_bytes']} B / loads {r['spill_loads_bytes']} B; {k['instructions']} "
          f"instructions, STL {k['STL']}, LDL {k['LDL']}, HGMMA {k['HGMMA']}")
    print("| loop (SASS addresses) | instructions | STL | LDL | HGMMA |\n|---|---|---|---|---|")
    for lp in r["loops"]:
        print(f"| {lp['start']:#x}-{lp['end']:#x} | {lp['instructions']} | {lp['STL']} | {lp['LDL']} | "
              f"{lp['HGMMA']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
