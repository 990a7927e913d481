"""Multi-process start-up on JAX's own distributed runtime (no home-made RPC).

`initialize()` calls `jax.distributed.initialize()` when the process runs under a cluster: explicit
--coordinator/--num-processes/--process-id, or auto-detected TPU pods, SLURM and Open MPI. On CPU it
switches cross-process collectives to gloo first.
"""
from __future__ import annotations

import os

import jax

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def in_cluster() -> bool:
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int = 30, init_timeout_s: int = 300) -> bool:
    """Initializes jax.distributed when needed; returns True if running multi-process."""
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError("multi-process: pass all of --coordinator HOST:PORT, --num-processes N and --process-id I")
    if not explicit and not in_cluster():
        return False
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=init_timeout_s)
    try:
        import inspect

        sig = inspect.signature(jax.distributed.initialize).parameters
        if "heartbeat_timeout_seconds" in sig:
            kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_s
    except (TypeError, ValueError):
        pass
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1
