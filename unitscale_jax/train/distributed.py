"""Multi-host start: ``jax.distributed.initialize`` when the environment asks for it.

``--distributed auto`` (default) initialises only when a multi-process launch is detected:
``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or
values JAX detects itself), or a cluster launcher started several tasks (Slurm
``SLURM_NTASKS > 1``, Open MPI ``OMPI_COMM_WORLD_SIZE > 1``, a multi-worker TPU slice
``TPU_WORKER_HOSTNAMES``). ``on`` always calls it (JAX's own cluster auto-detection fills
the rest), ``off`` never does. A single process on one machine never calls it.
"""

from __future__ import annotations

import os

import jax

from unitscale_jax.train.errors import UsageError


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def detected() -> bool:
    """Whether the environment describes a multi-process launch."""
    env = os.environ
    return ("JAX_COORDINATOR_ADDRESS" in env or _int_env("SLURM_NTASKS") > 1
            or _int_env("OMPI_COMM_WORLD_SIZE") > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def maybe_initialize(mode: str = "auto") -> bool:
    """Calls ``jax.distributed.initialize`` per ``mode``; returns whether it is initialised.

    Raises:
      UsageError: initialisation failed (message from JAX, with the variables it used).
    """
    if jax.distributed.is_initialized():
        return True
    if mode == "off" or (mode == "auto" and not detected()):
        return False
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = _int_env("JAX_NUM_PROCESSES")
    if "JAX_PROCESS_ID" in os.environ:
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"jax.distributed.initialize failed ({e}); set JAX_COORDINATOR_ADDRESS, "
                         "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or pass --distributed off for "
                         "a single-process run.") from None
    return True
