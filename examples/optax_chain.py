"""Unit-scaled gradients for your own Flax NNX model: ``optax.chain(unit_scale(), adamw)``.

``unitscale_jax.optim.unit_scale()`` needs no u-muP metadata: it divides each gradient tensor
by its RMS, so the optimizer after it sees gradients of RMS 1 whatever the loss scale. This
example

1. defines an ordinary two-layer MLP with ``flax.nnx`` (nothing from ``unitscale_jax.nn``),
2. trains it on a synthetic classification task with
   ``optax.chain(unit_scale(), optax.adamw(warmup_cosine_schedule))`` and ``nnx.Optimizer``,
3. checks, under ``jax.jit`` with chex (``unitscale_jax.checks``), that the unit-scaled
   gradients have RMS 1, that the updates are finite, and that multiplying the loss by any
   2^k, k in [-20, 20], gives the same updates and parameters, at initialisation and after
   training,
4. trains again with the loss multiplied by 2^-16 and by 2^16 and checks that every
   parameter comes out bit-for-bit the same; plain ``optax.adamw`` does not (its ``eps``
   acts at a size fixed in absolute terms).

Run ``python examples/optax_chain.py`` (under a minute on two CPU cores, most of it
compilation; ``--steps`` shortens it).
"""

from __future__ import annotations

import argparse
import functools

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unitscale_jax import checks
from unitscale_jax.optim import unit_scale

D_IN, D_HIDDEN, N_CLASSES = 16, 64, 4
LOSS_SCALE_EXPONENTS = (-16, 16)


class MLP(nnx.Module):
    """An ordinary Flax MLP: Linear -> GELU -> Linear (Flax's default initialisers)."""

    def __init__(self, d_in: int, d_hidden: int, n_classes: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.out = nnx.Linear(d_hidden, n_classes, rngs=rngs)

    def __call__(self, x_bd: jax.Array) -> jax.Array:
        return self.out(nnx.gelu(self.hidden(x_bd)))


def make_data(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Gaussian blobs: ``N_CLASSES`` random centres in ``D_IN`` dimensions, unit noise."""
    k_centre, k_label, k_noise = jax.random.split(key, 3)
    centres_cd = 0.3 * jax.random.normal(k_centre, (N_CLASSES, D_IN))
    labels_n = jax.random.randint(k_label, (n,), 0, N_CLASSES)
    x_nd = centres_cd[labels_n] + jax.random.normal(k_noise, (n, D_IN))
    return x_nd, labels_n


def loss_fn(model: MLP, x_bd: jax.Array, labels_b: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the model's logits."""
    logits_bc = model(x_bd)
    return optax.softmax_cross_entropy_with_integer_labels(logits_bc, labels_b).mean()


@functools.cache  # one object per setting: nnx.jit compiles once per optimizer object
def make_tx(steps: int, *, unit_scaled: bool = True) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, with ``unit_scale()`` in front or not."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1e-2, warmup_steps=max(steps // 10, 1), decay_steps=steps)
    adamw = optax.adamw(schedule, weight_decay=1e-4)
    return optax.chain(unit_scale(), adamw) if unit_scaled else adamw


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x_bd, labels_b, loss_scale):
    """One step on ``loss_scale * loss``; returns the unscaled loss."""
    scaled_loss = lambda m: loss_scale * loss_fn(m, x_bd, labels_b)  # noqa: E731
    loss, grads = nnx.value_and_grad(scaled_loss)(model)
    optimizer.update(model, grads)
    return loss / loss_scale


def train(x_nd, labels_n, steps: int, batch: int, *, loss_scale: float = 1.0,
          unit_scaled: bool = True) -> tuple[MLP, list[float]]:
    """Trains a fresh ``MLP`` (same seed every call); returns it and the loss of every step."""
    model = MLP(D_IN, D_HIDDEN, N_CLASSES, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_tx(steps, unit_scaled=unit_scaled), wrt=nnx.Param)
    scale = jnp.float32(loss_scale)  # an argument, not a constant: one compiled step for all
    step_fn = nnx.cached_partial(train_step, model, optimizer)  # skips re-reading the graphs
    idx_sb = jax.random.randint(jax.random.key(1), (steps, batch), 0, x_nd.shape[0])
    x_sbd, labels_sb = x_nd[idx_sb], labels_n[idx_sb]
    losses = [step_fn(x_sbd[s], labels_sb[s], scale) for s in range(steps)]
    return model, [float(x) for x in losses]


def make_invariant_check(graphdef: nnx.GraphDef, steps: int):
    """The chex invariants of ``unit_scale()`` + AdamW on real gradients, in one jitted program.

    Returns ``check(params, x_bd, labels_b)``, which raises ``AssertionError`` if any fails:

    * ``unit_scale()`` turns every gradient tensor into one of RMS 1;
    * AdamW's updates after it are finite;
    * two optimizer steps (on the two halves of the batch) give the same updates and
      parameters for the loss multiplied by 2^k, k = -20 .. 20.
    """
    grad_fn = jax.grad(lambda p, x, y: loss_fn(nnx.merge(graphdef, p), x, y))
    tx = make_tx(steps)

    def invariants(params, x_bd, labels_b):
        half = x_bd.shape[0] // 2
        grads = grad_fn(params, x_bd[:half], labels_b[:half])
        normed, _ = unit_scale().update(grads, unit_scale().init(params))
        checks.assert_unit_rms(normed)
        updates, _ = tx.update(grads, tx.init(params), params)
        checks.assert_finite_updates(grads, updates)
        grads_2 = grad_fn(params, x_bd[half:], labels_b[half:])
        checks.assert_loss_scale_invariant(tx, [grads, grads_2], params, num_steps=2)

    return checks.jit_checked(invariants)


def max_abs_diff(a: MLP, b: MLP) -> float:
    """The largest absolute difference between the parameters of two models."""
    diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), nnx.state(a, nnx.Param),
                         nnx.state(b, nnx.Param))
    return float(max(jax.tree.leaves(diffs)))


def accuracy(model: MLP, x_nd, labels_n) -> float:
    """Fraction of ``x_nd`` classified correctly."""
    return float(jnp.mean(jnp.argmax(model(x_nd), axis=-1) == labels_n))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.batch < 2:
        parser.error("--steps and --batch must be at least 2")

    x_nd, labels_n = make_data(jax.random.key(0), 4096)

    init_model = MLP(D_IN, D_HIDDEN, N_CLASSES, rngs=nnx.Rngs(0))
    graphdef, init_params = nnx.split(init_model, nnx.Param)
    check = make_invariant_check(graphdef, args.steps)
    check(init_params, x_nd[:256], labels_n[:256])
    print("init: unit RMS, finite updates and loss-scale invariance (2^-20..2^20): ok")

    model, losses = train(x_nd, labels_n, args.steps, args.batch)
    print("loss curve of optax.chain(unit_scale(), optax.adamw(warmup_cosine)), mean per quarter:")
    bounds = [round(q * args.steps / 4) for q in range(5)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        print(f"  steps {lo:4d}-{hi - 1:<4d} mean loss {sum(losses[lo:hi]) / (hi - lo):.4f}")
    print(f"train accuracy {accuracy(model, x_nd, labels_n):.3f} (chance {1 / N_CLASSES:.2f})")

    check(nnx.state(model, nnx.Param), x_nd[:256], labels_n[:256])
    print("trained: unit RMS, finite updates and loss-scale invariance (2^-20..2^20): ok")

    for unit_scaled in (True, False):
        name = "unit_scale + adamw" if unit_scaled else "plain adamw       "
        ref = model if unit_scaled else train(x_nd, labels_n, args.steps, args.batch,
                                              unit_scaled=False)[0]
        for k in LOSS_SCALE_EXPONENTS:
            other, _ = train(x_nd, labels_n, args.steps, args.batch, loss_scale=2.0 ** k,
                             unit_scaled=unit_scaled)
            print(f"{name}  loss x 2^{k:+d}: max |param - param(loss x 1)| = "
                  f"{max_abs_diff(ref, other):.3e}")
            if unit_scaled:
                chex.assert_trees_all_equal(nnx.state(ref, nnx.Param),
                                            nnx.state(other, nnx.Param))
    print("checks passed")


if __name__ == "__main__":
    main()
