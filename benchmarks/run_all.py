"""Runs every benchmark of ``benchmarks/`` and writes one report with the machine described.

Each benchmark runs as its own process (so one's JAX/XLA settings cannot leak into another):

- ``ops_overhead``: a unit-scaled FFN block against plain ``jnp`` (fwd + bwd);
- ``model_step``: the u-muP decoder's train step against SP and a plain NNX decoder;
- ``optimizer_overhead``: ``unit_scale`` / u-muP AdamW updates against ``optax.adamw``;
- ``fp8_matmul``: real FP8 against bf16 matmuls and decoder train steps (accelerator sizes;
  on a CPU-only machine its ``--tiny`` path check, results ``*_tiny.json``);
- ``attention``: the chunked (memory-efficient) attention backend against dense XLA attention,
  forward + backward: time ratio and compiled temporary memory at S = 1k and 4k (16k chunked
  only); linear attention against dense at 4k and against chunked at 16k;
- ``finetune``: ``unitscale-jax finetune``'s train step (sequence classification) against the
  same step written as a plain NNX encoder with optax, in examples/s;
- ``streaming``: ``unitscale-jax prepare`` throughput (MB/s of text) and the start-up of
  ``train --data prepared:DIR`` (data, and time to the first step) on a 1 MB and a 200 MB
  corpus, side by side;
- ``torch_comparison``: the authors' PyTorch ``unit_scaling.TransformerDecoder`` against ours
  at the same configuration (only where a Python with ``torch`` and ``unit-scaling`` is found:
  ``--torch-python``, ``$UNITSCALE_TORCH_PYTHON`` or this interpreter; otherwise reported as
  not run).

In full mode each benchmark writes ``benchmarks/results/<name>.json`` itself and this script
writes ``benchmarks/results/run_all.json``: the machine, and per benchmark its status
(``ok``, ``failed``, ``missing`` when its script is not there), command, wall time, the tail
of its output and its result JSON. ``--quick`` runs each benchmark's smoke size without
touching their result files and writes ``run_all_quick.json``. The exit status is 1 when a
benchmark that exists failed.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--torch-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# name -> (script, extra arguments in full mode, arguments in quick mode)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "ops_overhead": ("ops_overhead.py", [], ["--runs", "5", "--batch", "512", "--no-write"]),
    "model_step": ("model_step.py", [], ["--quick", "--no-write"]),
    "optimizer_overhead": ("optimizer_overhead.py", ["--runs", "40", "--train-steps", "20"],
                           ["--quick", "--no-write"]),
    "torch_comparison": ("torch_comparison.py", [], ["--quick", "--no-write"]),
    "fp8_matmul": ("fp8_matmul.py", [], ["--tiny", "--out", "{tmp}"]),
    "attention": ("attention.py", [], ["--quick", "--no-write"]),
    "finetune": ("finetune.py", [], ["--quick", "--no-write"]),
    "streaming": ("streaming.py", [], ["--quick", "--no-write"]),
}
# result file a benchmark writes in full mode, when not ``<name>.json``
RESULT_FILES = {"fp8_matmul": "fp8_matmul.json"}


def machine() -> dict:
    """The machine, described without importing JAX in this process."""
    code = ("import json, sys; sys.path.insert(0, %r); from benchmarks._timing import machine; "
            "print(json.dumps(machine()))" % str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}
    if hasattr(os, "getloadavg"):
        out["load_average_1_5_15min"] = list(os.getloadavg())
    try:
        model = [line.split(":", 1)[1].strip() for line in
                 Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        out["cpu_model"] = model[0] if model else None
    except OSError:
        pass
    return out


def run_one(name: str, script: Path, args: list[str], results_file: Path | None,
            timeout: float) -> dict:
    """Runs one benchmark; never raises for the benchmark's own failure."""
    cmd = [sys.executable, str(script), *args]
    shown = "python " + os.path.relpath(script, ROOT) + "".join(f" {a}" for a in args)
    if not script.exists():
        print(f"[{name}] MISSING: {os.path.relpath(script, ROOT)} does not exist (not written "
              "yet?); skipped", flush=True)
        return {"status": "missing", "command": shown,
                "reason": f"{os.path.relpath(script, ROOT)} not found"}
    print(f"[{name}] {shown}", flush=True)
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep
                                + os.environ.get("PYTHONPATH", "")})
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (
            e.stdout or ""), f"timed out after {timeout:.0f} s"
    wall = time.time() - t0
    status = "ok" if rc == 0 else "failed"
    entry = {"status": status, "command": shown, "returncode": rc, "wall_s": round(wall, 1),
             "output_tail": out[-3000:]}
    if status != "ok":
        entry["error_tail"] = err[-3000:]
    if results_file is not None and status == "ok":
        if results_file.exists() and results_file.stat().st_mtime >= t0 - 1:
            entry["result_file"] = os.path.relpath(results_file, ROOT)
            entry["result"] = json.loads(results_file.read_text())
        else:
            entry["result_file"] = None
            entry["note"] = f"{os.path.relpath(results_file, ROOT)} was not (re)written"
    for line in out.strip().splitlines()[-12:]:
        print(f"    {line}")
    print(f"[{name}] {status.upper()} in {wall:.0f} s" + (
        "" if status == "ok" else f" (exit {rc}): {err.strip().splitlines()[-1:] or ''}"),
        flush=True)
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes; the benchmarks' own "
                   "result files are left alone; writes run_all_quick.json")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    p.add_argument("--torch-python", default=None, help="a Python with torch and unit-scaling "
                   "for torch_comparison")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    p.add_argument("--results-dir", default=str(RESULTS), help="where run_all*.json goes")
    args = p.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    report = {"command": "python benchmarks/run_all.py" + "".join(
                  f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
              "started": started, "quick": args.quick, "machine": machine(), "benchmarks": {}}
    on_cpu = report["machine"].get("backend") == "cpu"
    for name in names:
        script, full_args, quick_args = BENCHMARKS[name]
        extra = list(quick_args if args.quick else full_args)
        result_name = RESULT_FILES.get(name, f"{name}.json")
        if name == "fp8_matmul" and on_cpu and not args.quick:
            extra, result_name = ["--tiny"], "fp8_matmul_tiny.json"
        if name == "torch_comparison" and args.torch_python:
            extra += ["--torch-python", args.torch_python]
        with tempfile.TemporaryDirectory() as tmp:
            extra = [a.replace("{tmp}", tmp) for a in extra]
            results_file = None if args.quick else RESULTS / result_name
            report["benchmarks"][name] = run_one(name, HERE / script, extra, results_file,
                                                 args.timeout)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("run_all_quick.json" if args.quick else "run_all.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    statuses = {k: v["status"] for k, v in report["benchmarks"].items()}
    print(f"summary: {statuses}; wrote {path}")
    return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
