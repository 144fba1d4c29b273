"""Torch side of ``benchmarks/torch_comparison.py`` (run with a Python that has ``torch`` and the
authors' ``unit-scaling`` package; it does not import JAX or ``unitscale_jax``).

Builds ``unit_scaling.TransformerDecoder`` and ``unit_scaling.optim.Adam`` from the JSON config
in ``argv[1]``, prints one ``ready {json}`` line, then answers each ``step`` line on stdin with
the wall time (s) of one training step (zero_grad, forward + loss, backward, optimizer step)
and the loss, so the caller can interleave these steps with its own. ``quit`` ends it.
"""

import json
import os
import sys
import time


def main() -> None:
    cfg = json.loads(sys.argv[1])
    import torch
    import unit_scaling as uu

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(0)
    model = uu.TransformerDecoder(cfg["d_model"], cfg["vocab"], layers=cfg["layers"],
                                  heads=cfg["heads"], dropout_p=0.0)
    opt = uu.optim.Adam(model.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        return float(loss.detach())

    first = step()
    n_params = sum(p.numel() for p in model.parameters())
    import importlib.metadata as md
    info = {"torch": torch.__version__, "unit_scaling": md.version("unit-scaling"),
            "torch_threads": torch.get_num_threads(), "n_params": n_params,
            "first_loss": first, "python": sys.version.split()[0], "pid": os.getpid()}
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "step":
            t0 = time.perf_counter()
            loss = step()
            print(json.dumps({"s": time.perf_counter() - t0, "loss": loss}), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {cmd!r}"}), flush=True)


if __name__ == "__main__":
    main()
