"""Training-step time of the authors' PyTorch ``unit_scaling.TransformerDecoder`` against
``unitscale_jax.nn.TransformerDecoder`` at the same configuration, on CPU.

Both sides: a u-muP decoder (SwiGLU MLP with 4x expansion, fused QKV, non-parametric RMSNorm,
no biases, no positional encoding, the default residual rule), the u-muP Adam of each library
at the same learning rate, the same batch of random token ids, one step = forward + loss +
backward + optimizer update. Torch runs eagerly (how the package is used) in a subprocess
(``benchmarks/_torch_ref_server.py``) under a Python that has ``torch`` and ``unit-scaling``;
the JAX step is jitted. Steps are interleaved one by one (a torch step, then a JAX step) so load
drift on a shared machine hits both alike; medians are reported.

The torch Python is ``--torch-python``, else ``$UNITSCALE_TORCH_PYTHON``, else this interpreter
if it can import both packages (``pip install torch unit-scaling==0.3.5``). Without one the
comparison is reported as not run (the JSON says why).

    python benchmarks/torch_comparison.py [--torch-python /path/to/python] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# JAX is imported lazily: with --threads 1 XLA's flags must be set before it starts.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"
SERVER = Path(__file__).resolve().parent / "_torch_ref_server.py"
PROBE = "import torch, unit_scaling"


def find_torch_python(explicit: str | None) -> tuple[str | None, str]:
    """(interpreter, how it was chosen) or (None, why not)."""
    candidates = []
    if explicit:
        candidates.append((explicit, "--torch-python"))
    elif os.environ.get("UNITSCALE_TORCH_PYTHON"):
        candidates.append((os.environ["UNITSCALE_TORCH_PYTHON"], "$UNITSCALE_TORCH_PYTHON"))
    else:
        candidates.append((sys.executable, "this interpreter"))
    for exe, how in candidates:
        try:
            r = subprocess.run([exe, "-c", PROBE], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{how} ({exe}) cannot be run: {e}"
        if r.returncode == 0:
            return exe, how
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return None, (f"{how} ({exe}) cannot import torch and unit_scaling ({last}); install "
                      "them (pip install torch unit-scaling==0.3.5) or pass --torch-python")
    return None, "no interpreter to try"


class TorchServer:
    """The torch side, one step per request."""

    def __init__(self, exe: str, cfg: dict):
        self.proc = subprocess.Popen([exe, str(SERVER), json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            err = self.proc.stderr.read()
            raise RuntimeError(f"the torch reference failed to start: {line}{err[-2000:]}")
        self.info = json.loads(line[len("ready "):])

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


def jax_trainer(cfg: dict):
    """A jitted u-muP train step of ``unitscale_jax`` and a closure running one step."""
    import jax
    import optax
    from flax import nnx

    from unitscale_jax import nn as unn
    from unitscale_jax import optim

    config = unn.TransformerConfig(vocab_size=cfg["vocab"], d_model=cfg["d_model"],
                                   n_layers=cfg["layers"], n_heads=cfg["heads"],
                                   max_seq_len=cfg["seq"])
    model = unn.TransformerDecoder(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optim.adam(cfg["lr"], param_info=unn.param_info(model))
    opt_state = tx.init(params)
    ids = jax.random.randint(jax.random.key(0), (cfg["batch"], cfg["seq"]), 0, cfg["vocab"])

    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(ids))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = {"params": params, "opt_state": opt_state}

    def run() -> float:
        state["params"], state["opt_state"], loss = step(state["params"], state["opt_state"], ids)
        return float(loss)  # blocks until the step is done

    n_params = sum(x.size for x in jax.tree.leaves(params))
    return run, n_params


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=20, help="interleaved timed steps per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--torch-python", default=None)
    p.add_argument("--threads", default="both", choices=("all", "1", "both"),
                   help="all: each library's default threading (every core); 1: both sides "
                   "pinned to one core, one thread each; both: one run of each (separate "
                   "processes)")
    p.add_argument("--quick", action="store_true", help="d_model 64, 2 layers, batch 4 x 64, "
                   "5 rounds (a smoke check)")
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    return p


def measure(args, exe: str, how: str) -> dict:
    """Interleaved steps of both sides at ``args.threads`` (``all`` or ``1``)."""
    cfg = {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
           "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "lr": args.lr,
           "threads": 1 if args.threads == "1" else None}
    torch_side = TorchServer(exe, cfg)
    try:
        jax_step, n_params = jax_trainer(cfg)
        t0 = time.perf_counter()
        jax_first_loss = jax_step()
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            torch_side.step()
            jax_step()
        times = {"torch_unit_scaling": [], "unitscale_jax": []}
        losses = {"torch_unit_scaling": [], "unitscale_jax": []}
        for _ in range(args.rounds):
            r = torch_side.step()
            times["torch_unit_scaling"].append(r["s"])
            losses["torch_unit_scaling"].append(r["loss"])
            t = time.perf_counter()
            losses["unitscale_jax"].append(jax_step())
            times["unitscale_jax"].append(time.perf_counter() - t)
    finally:
        torch_side.close()
    import jax

    from benchmarks._timing import paired_ratios
    med = {k: statistics.median(v) for k, v in times.items()}
    torch_over_jax = paired_ratios(times, "unitscale_jax")["torch_unit_scaling"]
    tokens = args.batch * args.seq
    return {
        "threads": "one core: the process and the torch subprocess pinned to one CPU "
                   "(sched_setaffinity), torch.set_num_threads(1), XLA_FLAGS="
                   f"{SINGLE_THREAD_XLA_FLAGS}" if args.threads == "1" else
                   "library defaults (torch intra-op threads = cores; XLA's CPU thread pool)",
        "torch_python": exe, "torch_python_from": how, "torch": torch_side.info,
        "jax": jax.__version__,
        "n_params": {"torch_unit_scaling": torch_side.info["n_params"],
                     "unitscale_jax": n_params},
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "min_ms": {k: min(v) * 1e3 for k, v in times.items()},
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "median_round_ratio_torch_over_jax": torch_over_jax,
        "jax_compile_s": compile_s,
        "first_loss": {"torch_unit_scaling": torch_side.info["first_loss"],
                       "unitscale_jax": jax_first_loss},
        "last_loss": {k: v[-1] for k, v in losses.items()},
        "load_average_after": list(os.getloadavg()),
    }


def _print(r: dict, args) -> None:
    print(f"  [{r['threads']}]")
    for k, v in r["median_ms"].items():
        print(f"    {k:20s} {v:9.1f} ms  {r['tokens_per_s'][k]:9.0f} tok/s")
    print(f"    torch / jax (median of per-round ratios) = "
          f"{r['median_round_ratio_torch_over_jax']:.2f}; initial loss torch "
          f"{r['first_loss']['torch_unit_scaling']:.3f}, jax "
          f"{r['first_loss']['unitscale_jax']:.3f}")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.batch, args.seq, args.rounds, args.warmup = (
            64, 2, 4, 64, 5, 1)
    result = {"benchmark": "torch_comparison",
              "command": "python benchmarks/torch_comparison.py" + "".join(f" {a}" for a in argv),
              "config": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                         "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
                         "lr": args.lr, "rounds": args.rounds, "warmup": args.warmup},
              "step": "forward + loss + backward + u-muP Adam update (torch eager, JAX jit)",
              "load_average_before": list(os.getloadavg())}
    exe, how = find_torch_python(args.torch_python)
    if exe is None:
        result.update(ran=False, reason=how)
        print(f"torch comparison not run: {how}")
    elif args.threads == "both":
        runs = {}
        for mode in ("all", "1"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "r.json"
                sub = [a for a in argv if a != "--no-write"]
                cmd = [sys.executable, str(Path(__file__).resolve()), *sub, "--threads", mode,
                       "--torch-python", exe, "--no-write", "--json-out", str(out)]
                r = subprocess.run(cmd, text=True, capture_output=True)
                if r.returncode or not out.exists():
                    raise RuntimeError(f"torch comparison ({mode} threads) failed:\n"
                                       f"{r.stdout[-2000:]}{r.stderr[-3000:]}")
                runs["all_threads" if mode == "all" else "one_thread"] = json.loads(
                    out.read_text())["result"]
        result.update(ran=True, runs=runs)
    else:
        if args.threads == "1":
            if "jax" in sys.modules:
                raise SystemExit("--threads 1 must start before JAX is imported; run it as "
                                 "its own process.")
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                       + SINGLE_THREAD_XLA_FLAGS).strip()
            if hasattr(os, "sched_setaffinity"):  # the torch subprocess inherits it
                os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        result.update(ran=True, runs={"all_threads" if args.threads == "all" else
                                      "one_thread": measure(args, exe, how)})
    if result["ran"]:
        print(f"decoder train step, d_model {args.d_model}, {args.layers} layers, "
              f"{args.heads} heads, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
              f"median of {args.rounds} interleaved rounds")
        for r in result["runs"].values():
            _print(r, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"result": next(iter(result["runs"].values()))
                                                   }))
    elif not args.no_write:
        from benchmarks._timing import write_result
        print(f"wrote {write_result('torch_comparison', result)}")
    return result


if __name__ == "__main__":
    main()
