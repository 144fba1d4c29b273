"""A ``jax.pmap`` training loop with unitscale_jax's model, u-muP optimizer and ``unit_scale()``.

For code built around ``pmap``: ``unitscale_jax.train.pmap_step.make_pmap_train_step`` gives
the trainer's own train step (the same model, loss, u-muP AdamW with ``unit_scale()`` first,
schedule) as a pmapped function over the local devices, with the state replicated (a leading
device axis on every leaf) and each batch split across the devices (``shard_batch``). This
example

1. builds a small decoder from the ``tiny`` preset on the built-in corpus,
2. trains it with the pmapped step, printing the training loss (the mean over every device's
   tokens, the same on each device),
3. checks that the replicas stayed identical and that the validation loss of the trained
   model (``model_of``) is below that at initialisation.

Run ``python examples/pmap_data_parallel.py`` (about a minute on two CPU cores, most of it
compilation). On the CPU it simulates ``--devices`` devices; on a GPU or TPU host the local
accelerators are used. The trainer itself (``unitscale-jax train``) uses ``jax.jit`` over a
device mesh instead, the recommended path (see the training guide).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--devices", type=int, default=4,
                        help="CPU devices to simulate when running on the CPU (default 4)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per step, over all devices (default 16)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    # before JAX starts: how many devices the CPU backend offers (no effect on accelerators)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")

    import jax
    import numpy as np
    from flax import nnx

    from unitscale_jax import train
    from unitscale_jax.train import pmap_step
    from unitscale_jax.train.data import load_data

    cfg = train.resolve(train.get_preset("tiny").replace(
        model={"d_model": 64, "n_layers": 2, "n_heads": 4, "parametrization": "umup"},
        data={"seq_len": 64},
        optimizer={"name": "adamw", "unit_scale_grads": True},
        training={"steps": args.steps, "batch_size": args.batch_size}))
    data = load_data(cfg, log=lambda _: None)
    step, state, graphdef = pmap_step.make_pmap_train_step(cfg, data.vocab_size)
    n = jax.local_device_count()
    print(f"devices: {n} {jax.default_backend()}, batch {args.batch_size} "
          f"({args.batch_size // n} rows per device), {args.steps} steps, u-muP adamw after "
          f"unit_scale(), lr {cfg.optimizer.lr:g}")

    task = train.get_task(cfg.model.kind)
    val_batches = data.eval_batches(cfg, 4)

    def validation_loss(state) -> float:
        model = pmap_step.model_of(graphdef, state)
        model.eval()
        losses = [task.eval_sums(model, b)["loss"] for b in val_batches]
        return float(sum(s for s, _ in losses) / sum(c for _, c in losses))

    before = validation_loss(state)
    batches = data.train_iterator(cfg)
    every = max(args.steps // 4, 1)
    try:
        for s in range(1, args.steps + 1):
            state, metrics = step(state, pmap_step.shard_batch(next(batches)))
            if s % every == 0 or s == args.steps:
                loss = np.asarray(metrics["loss"])
                print(f"step {s}: train loss {float(loss[0]):.4f} (devices agree: "
                      f"{'yes' if np.all(loss == loss[0]) else 'no'})")
    except train.UsageError as e:
        print(f"pmap_data_parallel.py: error: {e}", file=sys.stderr)
        return 2
    spread = max(float(np.max(np.ptp(np.asarray(a), axis=0)))
                 for a in jax.tree.leaves(jax.device_get(state["params"])))
    print(f"replicas identical: {'yes' if spread == 0.0 else f'no (spread {spread:g})'}")
    n_params = sum(a.size for a in jax.tree.leaves(
        nnx.state(pmap_step.model_of(graphdef, state), nnx.Param)))
    after = validation_loss(state)
    print(f"validation loss: {before:.4f} at initialisation, {after:.4f} after {args.steps} "
          f"steps ({n_params:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
