"""Run by test_multiprocess.py in one process with 4 CPU devices: the single-process runs the
multi-process ones are compared with, through the real command (``cli.main``), each with its
own ``UNITSCALE_JAX_BATCH_LOG``. Arguments: a JSON list of ``[run_dir, batch_log, args]``."""

import json
import os
import sys

import jax

from unitscale_jax.cli import main

assert jax.device_count() == 4 and jax.process_count() == 1, jax.devices()
for run_dir, log, args in json.loads(sys.argv[1]):
    os.environ["UNITSCALE_JAX_BATCH_LOG"] = log
    rc = main(["train", *args, "--run-dir", run_dir])
    assert rc == 0, (run_dir, rc)
print("REFERENCE OK")
