"""Running the Triton kernels on CPU in Triton's interpreter (TRITON_INTERPRET=1), shared by the ops' tests.

`run("tests.kernels.test_x:_errors")` calls that function in a subprocess with the interpreter on (triton
importable, or a directory holding it in AXL_TRITON_SITE: `make test` points it at .venv/triton, which
scripts/bootstrap.sh fills; the test skips otherwise) and returns its JSON result. Inside, `numpy_pointers()`
lets the interpreter take NumPy buffers (no torch here) and returns the pointer wrapper to pass them as.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SITE_ENV = "AXL_TRITON_SITE"


def numpy_pointers():
    """Patches triton.runtime.interpreter for NumPy-backed pointers; -> Ptr(a): a as a kernel pointer argument
    (a must be C-contiguous and outlive the launch)."""
    from triton.runtime import interpreter

    for name in dir(interpreter):
        obj = getattr(interpreter, name)
        if isinstance(obj, type) and hasattr(obj, "_init_args_hst"):
            obj._init_args_hst = lambda self, a, k: (a, k)
            obj._restore_args_dev = lambda self, *a: None
    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):  # scalars are 1-element arrays there; NumPy >= 2.5 refuses int() of them
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor

    class Ptr:
        def __init__(self, a):
            self.a = a
            self.dtype, self.shape = a.dtype, a.shape

        def data_ptr(self):
            return self.a.ctypes.data

        def stride(self, *_):
            return tuple(s // self.a.itemsize for s in self.a.strides)

    return Ptr


def run(target: str, timeout: int = 300, interpret: bool = True):
    """target "module:function" -> the function's JSON-able result, computed in an interpreter subprocess
    (interpret=False: Triton's compiler instead, e.g. to compile kernels for a GPU target on the CPU)."""
    site = os.environ.get(SITE_ENV, "")
    if importlib.util.find_spec("triton") is None and not os.path.isdir(os.path.join(site, "triton")):
        pytest.skip(f"triton not installed (set {SITE_ENV} to a directory holding it)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(x for x in (root, site, os.environ.get("PYTHONPATH", "")) if x)}
    module, fn = target.split(":")
    code = f"import json; from {module} import {fn} as f; print(json.dumps(f()))"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
