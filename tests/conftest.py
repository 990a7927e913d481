"""Test-wide setup: 8 simulated CPU devices (for the sharding tests) and float64 for NumPy oracles.

XLA_FLAGS must be set before jax initialises its backend, so this runs before any test module import.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu" if os.environ.get("AXL_TEST_GPU") is None else "")
# Repeated compiles of the same small programs (in-process and in subprocess runs) hit JAX's persistent cache.
import tempfile as _tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_tempfile.gettempdir(), "axl_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
