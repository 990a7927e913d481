"""Multi-process start-up on JAX's own distributed runtime (no home-made RPC).

`initialize()` calls `jax.distributed.initialize()` when the process runs under a cluster: explicit
--coordinator/--num-processes/--process-id, or auto-detected TPU pod slices, SLURM (`srun`) and Open MPI
(`mpirun`). On CPU it switches cross-process collectives to gloo first.

Failure behaviour: every process sends heartbeats to the coordination service (hosted by process 0). When a
process dies, the service stops hearing from it and, after `heartbeat_timeout_s`, tells every other process,
which then aborts ("Terminating process because the JAX distributed service detected fatal errors ...")
instead of waiting forever in a collective; if process 0 dies, the others lose the service and abort the same
way. Restarting all processes with the same command resumes from the latest complete checkpoint.
Timeouts come from the arguments, else the environment (AXL_HEARTBEAT_TIMEOUT_S, AXL_INIT_TIMEOUT_S,
AXL_SHUTDOWN_TIMEOUT_S), else the defaults below.
"""
from __future__ import annotations

import inspect
import os
import sys

import jax

DEFAULT_HEARTBEAT_TIMEOUT_S = 60  # how long a dead process may go unnoticed
DEFAULT_INIT_TIMEOUT_S = 300  # how long process 0 waits for every process to join
DEFAULT_SHUTDOWN_TIMEOUT_S = 120  # how long the exit barrier waits for the slowest process


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        return 0


def in_cluster() -> bool:
    """True under a multi-process launcher that jax.distributed can read by itself."""
    env = os.environ
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env:
        # Inside `srun` (a job step); a plain `sbatch` script body has no step of several tasks.
        return _env_int("SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS") > 1
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _timeout(value: int | None, env_name: str, default: int) -> int:
    if value is not None:
        return int(value)
    return _env_int(env_name) or default


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int | None = None, init_timeout_s: int | None = None,
               shutdown_timeout_s: int | None = None) -> bool:
    """Initializes jax.distributed when needed (call before any other JAX use); True if multi-process.

    Explicit: all of coordinator ("HOST:PORT" of process 0, reachable from every process), num_processes and
    process_id. Otherwise auto-detected (`in_cluster`); a plain single process does nothing.
    """
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError("multi-process: pass all of --coordinator HOST:PORT, --num-processes N and --process-id I")
    if explicit:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"multi-process: --process-id {process_id} must be in [0, --num-processes {num_processes})")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"multi-process: --coordinator {coordinator!r} must be HOST:PORT (process 0's address)")
    if not explicit and not in_cluster():
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    heartbeat = _timeout(heartbeat_timeout_s, "AXL_HEARTBEAT_TIMEOUT_S", DEFAULT_HEARTBEAT_TIMEOUT_S)
    kwargs = dict(initialization_timeout=_timeout(init_timeout_s, "AXL_INIT_TIMEOUT_S", DEFAULT_INIT_TIMEOUT_S))
    shutdown = _timeout(shutdown_timeout_s, "AXL_SHUTDOWN_TIMEOUT_S", DEFAULT_SHUTDOWN_TIMEOUT_S)
    optional = dict(heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=shutdown)
    sig = inspect.signature(jax.distributed.initialize).parameters
    kwargs.update({k: v for k, v in optional.items() if k in sig})
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                                   **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    if jax.process_index() == 0:
        print(f"multi-process: {jax.process_count()} processes, {jax.device_count()} devices "
              f"({jax.local_device_count()} per process); if one process dies the others abort within ~{heartbeat} s; "
              f"rerun the same command on every process to resume", file=sys.stderr, flush=True)
    return jax.process_count() > 1
