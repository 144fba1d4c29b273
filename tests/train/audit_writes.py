"""``python audit_writes.py LOG ARGS...``: runs ``unitscale-jax ARGS`` (as ``python -m
unitscale_jax.cli ARGS`` would), appending to LOG (JSON lines) every path the process opens for
writing, creates, renames, truncates or removes, seen through Python's audit hooks
(``sys.addaudithook``); writes by native code (tensorstore's array files) are not seen."""

import json
import os
import runpy
import sys

log_path, args = os.path.abspath(sys.argv[1]), sys.argv[2:]
log = open(log_path, "a", buffering=1)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree",
          "shutil.move", "shutil.copyfile"}


def record(event, path):
    path = os.path.abspath(os.fsdecode(path))
    if path != log_path:
        log.write(json.dumps({"event": event, "path": path}) + "\n")


def hook(event, a):
    try:
        if event == "open" and isinstance(a[0], (str, bytes, os.PathLike)):
            mode, flags = a[1], a[2] or 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & WRITE_FLAGS:
                record(event, a[0])
        elif event in EVENTS and isinstance(a[0], (str, bytes, os.PathLike)):
            record(event, a[0])
            if event in ("os.rename", "shutil.move", "shutil.copyfile"):
                record(event, a[1])
    except Exception:  # never break the audited program
        pass


sys.addaudithook(hook)
sys.argv = ["unitscale_jax.cli", *args]
runpy.run_module("unitscale_jax.cli", run_name="__main__", alter_sys=True)
