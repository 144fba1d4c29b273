"""Multi-process runs: ``jax.distributed.initialize``, the config check, lost peers.

``--distributed auto`` (default) initialises only when a multi-process launch is detected:
``--coordinator-address HOST:PORT --num-processes N --process-id I`` are given (a run started
by hand, one command per process), ``JAX_COORDINATOR_ADDRESS`` is set (with
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or values JAX detects itself), or a cluster
launcher started several tasks (Slurm ``SLURM_NTASKS > 1``, Open MPI
``OMPI_COMM_WORLD_SIZE > 1``, a multi-worker TPU slice ``TPU_WORKER_HOSTNAMES``). ``on``
always calls it (JAX's own cluster auto-detection fills the rest), ``off`` never does. A single
process on one machine never calls it.

A multi-process run on CPUs exchanges its collectives over TCP with gloo
(``jax_cpu_collectives_implementation``, set before the backend starts unless the
``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` variable chooses another). ``--init-timeout`` bounds
the wait for every process to join; ``--heartbeat-timeout`` how long a silent process counts
as alive. Once initialised, ``check_same_config`` refuses to start unless every process was
given the same config (``--process-id`` aside). A process whose collective fails because a
peer died raises ``PeerLost``; ``unitscale-jax`` then exits at once with status 1 instead of
waiting for the dead peer at JAX's shutdown barrier. A peer that dies while this process
waits somewhere other than a collective (a checkpoint's barrier, the start-up exchanges) is
JAX's own heartbeat check's to report: after ``--heartbeat-timeout`` seconds JAX ends the
process with its message ("another task died"), which this module cannot intercept.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from unitscale_jax.train.errors import PeerLost, UsageError

LAUNCH_FLAGS = ("--coordinator-address", "--num-processes", "--process-id")
PER_PROCESS_FIELDS = (("training", "process_id"),)
"""Config fields that differ between the processes of one run (left out of the check)."""


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


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT`` for an IPv6 host).

    Raises:
      UsageError: not ``HOST:PORT`` with a port in 1..65535.
    """
    host, sep, port = address.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator-address {address!r} is not HOST:PORT (e.g. "
                         "10.0.0.1:1234, process 0's address and a free port).")
    return host, int(port)


def launch_arguments(training: Any) -> Optional[dict]:
    """``jax.distributed.initialize`` arguments of a run started by hand (the three launch
    flags of ``training``, a ``TrainingConfig``), or None when none of them is given.

    Raises:
      UsageError: only some of the three given, a process id outside ``[0, N)``, a bad
        address, or timeouts below one second.
    """
    for flag, value in (("--init-timeout", training.init_timeout),
                        ("--heartbeat-timeout", training.heartbeat_timeout)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1 (seconds), got {value}.")
    values = (training.coordinator_address, training.num_processes, training.process_id)
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        missing = [f for f, v in zip(LAUNCH_FLAGS, values) if v is None]
        raise UsageError(f"{', '.join(missing)} missing: a run started by hand needs all of "
                         f"{' '.join(f + ' ...' for f in LAUNCH_FLAGS)} on every process (or "
                         "none, for a single process or a detected cluster).")
    address, n, i = values
    parse_address(address)
    if n < 1:
        raise UsageError(f"--num-processes must be >= 1, got {n}.")
    if not 0 <= i < n:
        raise UsageError(f"--process-id must be in [0, {n}) for --num-processes {n}, got {i}.")
    return {"coordinator_address": address.strip(), "num_processes": n, "process_id": i}


def maybe_initialize(training: Any) -> bool:
    """Calls ``jax.distributed.initialize`` as ``training`` (a ``TrainingConfig``: its
    ``distributed`` mode, launch flags and timeouts) asks; returns whether it is initialised.

    Raises:
      UsageError: bad launch flags, or initialisation failed (JAX's message, with what to
        set).
    """
    launch = launch_arguments(training)
    if jax.distributed.is_initialized():
        return True
    mode = training.distributed
    if mode == "off":
        if launch is not None:
            raise UsageError(f"{' '.join(LAUNCH_FLAGS)} start a multi-process run; they "
                             "cannot go with --distributed off.")
        return False
    if mode == "auto" and launch is None and not detected():
        return False
    kwargs = dict(launch or {})
    if launch is None:
        if "JAX_NUM_PROCESSES" in os.environ:
            kwargs["num_processes"] = _int_env("JAX_NUM_PROCESSES")
        if "JAX_PROCESS_ID" in os.environ:
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=training.init_timeout,
                                   heartbeat_timeout_seconds=training.heartbeat_timeout)
    except (ValueError, RuntimeError, jax.errors.JaxRuntimeError) as e:
        how = ("check that every process was started with the same --coordinator-address and "
               "--num-processes, and that process 0 is running and reachable there"
               if launch is not None else
               "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, pass "
               f"{' '.join(LAUNCH_FLAGS)}, or pass --distributed off for a single-process run")
        raise UsageError(f"jax.distributed.initialize failed ({_first_line(e)}); {how}.") from None
    return True


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def gather_json(value: Any) -> list:
    """Every process's JSON-serialisable ``value``, in process order (a collective: every
    process must call it; ``[value]`` in a single process)."""
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, sizes)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_fingerprint(config: dict) -> str:
    """SHA-256 of a config dict without the ``PER_PROCESS_FIELDS``."""
    flat = _flat(config)
    for section, name in PER_PROCESS_FIELDS:
        flat.pop(f"{section}.{name}", None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def check_same_config(config: dict) -> None:
    """Refuses to start a multi-process run whose processes were given different configs
    (a collective: every process calls it, before any step; nothing in a single process).

    Raises:
      UsageError: on every process: which processes differ from process 0, and in what.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils
    digest = np.frombuffer(bytes.fromhex(config_fingerprint(config)), np.uint8)
    digests = multihost_utils.process_allgather(digest)
    odd = [i for i, d in enumerate(digests) if not np.array_equal(d, digests[0])]
    if not odd:
        return
    configs = gather_json(config)  # only on a mismatch: name the fields
    skip = {f"{s}.{n}" for s, n in PER_PROCESS_FIELDS}
    base = _flat(configs[0])
    diffs = []
    for i in odd:
        flat = _flat(configs[i])
        fields = [f"{k} {base.get(k)!r} vs {flat.get(k)!r}" for k in sorted(set(base) | set(flat))
                  if k not in skip and base.get(k) != flat.get(k)]
        diffs.append(f"process {i}: {', '.join(fields)}")
    raise UsageError(f"the {jax.process_count()} processes were started with different "
                     f"configs (process 0 vs {'; '.join(diffs)}); start every process with the "
                     "same options (only --process-id differs).")


def peer_lost(e: BaseException, where: str) -> PeerLost:
    """The ``PeerLost`` of a multi-process run whose collective failed with ``e``."""
    return PeerLost(f"process {jax.process_index()} of {jax.process_count()}: a collective "
                    f"failed ({_first_line(e)}), so another process has most likely died; "
                    f"{where}; rerun the same command on every process to resume.")
