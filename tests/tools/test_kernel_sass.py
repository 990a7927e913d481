"""tools.kernel_sass: Hopper machine code of a Triton kernel compiled on the CPU, counted per loop."""
import os
import subprocess
import sys

from tests.kernels import triton_interpreter
from tools import kernel_sass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/              @P0 BRA `(.L_x_1) ;
        /*0040*/                   LDL R2, [R1] ;
        /*0050*/              @P1 BRA `(.L_x_0) ;
.L_x_1:
        /*0060*/                   EXIT ;
"""


def test_loops_are_the_backward_branches_with_their_counts():
    """One backward branch (0x50 -> 0x10) is a loop of 5 instructions; the forward branch to .L_x_1 is none."""
    assert kernel_sass.loops(SASS) == [{"start": 0x10, "end": 0x50, "instructions": 5, "STL": 1, "LDL": 1,
                                        "HGMMA": 1}]


def test_compiles_a_kernel_for_sm90_without_a_gpu():
    site = os.environ.get(triton_interpreter.SITE_ENV, "")
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('triton') is None)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (ROOT, site) if x), "JAX_PLATFORMS": "cpu"}
    if subprocess.run([sys.executable, "-c", code], env=env).returncode:
        import pytest
        pytest.skip(f"triton not installed (set {triton_interpreter.SITE_ENV} to a directory holding it)")
    p = subprocess.run([sys.executable, "-m", "tools.kernel_sass", "tests.tools.sass_fixture:scaled_row_sums",
                        "--type", "N=i32", "--const", "BLOCK=128"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    head, table = p.stdout.split("\n", 1)
    assert "(sm_90, 4 warps, 2 stages)" in head and "spill stores 0 B" in head, head
    rows = [r for r in table.splitlines() if r.startswith("| 0x")]
    assert len(rows) >= 1 and all(int(r.split("|")[2]) > 0 for r in rows), table
