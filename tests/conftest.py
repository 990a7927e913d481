"""Test-wide setup: 8 simulated CPU devices (for the sharding tests) and float64 for NumPy oracles.

XLA_FLAGS must be set before jax initialises its backend, so this runs before any test module import.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu" if os.environ.get("AXL_TEST_GPU") is None else "")
