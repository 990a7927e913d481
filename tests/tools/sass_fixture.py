"""A small Triton kernel for tests/tools/test_kernel_sass.py (imported only where triton is)."""
import triton
import triton.language as tl


@triton.jit
def scaled_row_sums(X, Y, N, BLOCK: tl.constexpr):
    """Y[row] = sum over N columns of 2 * X[row, :], BLOCK columns per loop step (N at run time: a real loop)."""
    row = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += 2.0 * tl.load(X + row * N + cols, mask=cols < N, other=0.0)
    tl.store(Y + row, tl.sum(acc, axis=0))
