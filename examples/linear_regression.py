"""Linear regression with SGD, with and without ``unit_scale()`` in front, across loss scales.

The classic first example: fit ``y = 2 x + 1`` (plus noise) by gradient descent on the mean
squared error, with an exponentially decaying learning rate (``optax.exponential_decay``) and
``optax.contrib.reduce_on_plateau``. The fit is repeated with the loss multiplied by
``2^-20, 2^-10, 1, 2^10, 2^20``, as a mixed-precision loss scale (or just a change of units)
would do:

* ``optax.chain(unit_scale(), optax.sgd(schedule), reduce_on_plateau())``: ``unit_scale()``
  divides each gradient by its RMS, so SGD sees the same gradients at every loss scale; the
  fitted slope and intercept and the whole loss curve are the same (bit for bit) at every
  scale. (``reduce_on_plateau`` compares losses relatively, ``atol=0``, so it too sees no
  difference.)
* ``optax.chain(optax.sgd(schedule), reduce_on_plateau())``: SGD's step is the learning rate
  times the gradient, so scaling the loss scales the learning rate: small scales stall near
  the initial line, large ones diverge.

Each parameter (slope, intercept) is one scalar leaf, so ``unit_scale()`` divides each by its
own running RMS; with ``decay=0.9`` that is RMSprop without per-element state.

Run ``python examples/linear_regression.py [--plot fit.png]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unitscale_jax.optim import unit_scale

TRUE_SLOPE, TRUE_INTERCEPT, NOISE = 2.0, 1.0, 0.1
EXPONENTS = (-20, -10, 0, 10, 20)
OPTIMIZERS = ("unit_scale+sgd", "sgd")


def make_data(n: int = 256, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    kx, kn = jax.random.split(jax.random.key(seed))
    x_n = jax.random.uniform(kx, (n,), minval=-1.0, maxval=1.0)
    y_n = TRUE_SLOPE * x_n + TRUE_INTERCEPT + NOISE * jax.random.normal(kn, (n,))
    return x_n, y_n


def mse(params: dict, x_n: jax.Array, y_n: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(params["slope"] * x_n + params["intercept"] - y_n))


def least_squares(x_n: jax.Array, y_n: jax.Array) -> tuple[float, float]:
    """The exact minimiser of the MSE (slope, intercept), for reference."""
    design_n2 = np.stack([np.asarray(x_n, np.float64), np.ones(x_n.shape)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design_n2, np.asarray(y_n, np.float64), rcond=None)
    return float(a), float(b)


def make_tx(name: str, steps: int) -> optax.GradientTransformationExtraArgs:
    """SGD with exponential decay and reduce-on-plateau, with ``unit_scale()`` in front or not."""
    schedule = optax.exponential_decay(init_value=0.3, transition_steps=1,
                                       decay_rate=0.01 ** (1.0 / steps))  # x 1/100 over the run
    plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=10, rtol=1e-4, atol=0.0,
                                               min_scale=1e-3)
    sgd = optax.sgd(schedule)
    return optax.chain(unit_scale(decay=0.9), sgd, plateau) if name == "unit_scale+sgd" else \
        optax.chain(sgd, plateau)


def fit(name: str, steps: int, x_n: jax.Array, y_n: jax.Array, exponents=EXPONENTS):
    """Fits the line once per loss scale ``2^k``.

    Returns:
      ``(slope_k, intercept_k, plateau_k, loss_ks)``: float64 numpy arrays, the final slope
      and intercept per scale, the final factor of ``reduce_on_plateau`` on the learning
      rate, and the unscaled MSE of every step (``loss_ks[k, s]`` before step ``s``, plus the
      final one: ``steps + 1`` columns).
    """
    tx = make_tx(name, steps)

    def run(loss_scale):
        params = {"slope": jnp.zeros(()), "intercept": jnp.zeros(())}

        def step(carry, _):
            params, state = carry
            loss, grads = jax.value_and_grad(lambda p: loss_scale * mse(p, x_n, y_n))(params)
            updates, state = tx.update(grads, state, params, value=loss)
            return (optax.apply_updates(params, updates), state), loss / loss_scale

        (params, state), losses = jax.lax.scan(step, (params, tx.init(params)), length=steps)
        return params, state[-1].scale, jnp.append(losses, mse(params, x_n, y_n))

    # one compiled program; the scale is an argument, so every scale runs the same code
    run = jax.jit(run)
    out = [run(jnp.float32(2.0 ** k)) for k in exponents]
    slope = np.array([float(p["slope"]) for p, _, _ in out])
    intercept = np.array([float(p["intercept"]) for p, _, _ in out])
    plateau = np.array([float(s) for _, s, _ in out])
    losses = np.stack([np.asarray(c, np.float64) for _, _, c in out])
    return slope, intercept, plateau, losses


def plot(path: str, results: dict, x_n, y_n, exponents=EXPONENTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    xs = np.linspace(-1, 1, 2)
    for ax, name in zip(axes[:2], OPTIMIZERS):
        ax.scatter(np.asarray(x_n), np.asarray(y_n), s=4, c="0.7", label="data")
        slope, intercept, _, _ = results[name]
        for k, a, b in zip(exponents, slope, intercept):
            if np.isfinite(a) and np.isfinite(b):
                ax.plot(xs, a * xs + b, label=f"loss x 2^{k}")
        ax.set(title=f"{name}: fitted lines", xlabel="x", ylabel="y", ylim=(-2.5, 4.5))
        ax.legend(fontsize=7)
    for name, style in zip(OPTIMIZERS, ("-", "--")):
        for k, curve in zip(exponents, results[name][3]):
            axes[2].plot(np.where(np.isfinite(curve), curve, np.nan), style,
                         label=f"{name}, 2^{k}")
    axes[2].set(title="unscaled MSE per step (diverged: off the top)", xlabel="step",
                yscale="log", ylim=(3e-3, 30))
    axes[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="SGD steps (default 300)")
    parser.add_argument("--plot", metavar="PATH", help="save a PNG of the fits and loss curves")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    x_n, y_n = make_data()
    results = {name: fit(name, args.steps, x_n, y_n) for name in OPTIMIZERS}
    print(f"fit y = {TRUE_SLOPE:g} x + {TRUE_INTERCEPT:g} + N(0, {NOISE:g}^2), "
          f"{args.steps} steps, loss multiplied by 2^k")
    print(f"{'optimizer':<15} {'scale':>6} {'slope':>12} {'intercept':>12} {'final loss':>12} "
          f"{'max |curve - curve(2^0)|':>25} {'plateau factor':>15}")
    for name in OPTIMIZERS:
        slope, intercept, plateau, losses = results[name]
        ref = losses[EXPONENTS.index(0)]
        for k, a, b, p, curve in zip(EXPONENTS, slope, intercept, plateau, losses):
            dev = np.max(np.abs(curve - ref))  # nan once a curve has diverged
            print(f"{name:<15} {'2^' + str(k):>6} {a:12.6f} {b:12.6f} {curve[-1]:12.6g} "
                  f"{dev:25.3g} {p:15.6g}")
    a, b = least_squares(x_n, y_n)
    print(f"{'least squares':<15} {'':>6} {a:12.6f} {b:12.6f} "
          f"{float(mse({'slope': a, 'intercept': b}, x_n, y_n)):12.6g}")
    if args.plot:
        plot(args.plot, results, x_n, y_n)
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
