"""tools.kernel_sass: Hopper machine code of a Triton kernel compiled on the CPU, counted per loop."""
from tests.kernels import triton_interpreter
from tools import kernel_sass

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


def _cli_output():
    """Runs in a subprocess with Triton's compiler (as triton_interpreter.run does for the interpreter tests)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert kernel_sass.main(["tests.tools.sass_fixture:scaled_row_sums", "--type", "N=i32",
                                 "--const", "BLOCK=128"]) == 0
    return buf.getvalue()


def test_compiles_a_kernel_for_sm90_without_a_gpu():
    head, table = triton_interpreter.run("tests.tools.test_kernel_sass:_cli_output", interpret=False).split("\n", 1)
    assert "(sm_90, 4 warps, 2 stages)" in head and "spill stores 0 B" in head, head
    rows = [r for r in table.splitlines() if r.startswith("| 0x")]
    assert len(rows) >= 1 and all(int(r.split("|")[2]) > 0 for r in rows), table
