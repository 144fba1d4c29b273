"""A first look at unit scaling: a unit-scaled FFN block at init, its scales printed.

Run with ``python -m unitscale_jax.demo``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unitscale_jax import ops


def ffn_block(x, w_up, w_down):
    return ops.linear(ops.gelu(ops.linear(x, w_up)), w_down)


def main() -> None:
    batch, width = 4096, 512
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (batch, width))
    w_up = jax.random.normal(k[1], (width, 4 * width))
    w_down = jax.random.normal(k[2], (4 * width, width))
    grad_y = jax.random.normal(k[3], (batch, width))

    def loss(x, w_up, w_down):
        return jnp.sum(ffn_block(x, w_up, w_down) * grad_y)

    y = jax.jit(ffn_block)(x, w_up, w_down)
    gx, gu, gd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w_up, w_down)
    print(f"unit-scaled FFN block (linear -> gelu -> linear), width {width}, batch {batch}")
    for name, t in [("input x", x), ("output y", y), ("grad x", gx),
                    ("grad W_up", gu), ("grad W_down", gd)]:
        print(f"  {name:12s} std = {float(jnp.std(t)):.3f}")
    print("every std is ~1: no tensor needs a loss scale to sit well inside bf16/FP16/FP8 range.")


if __name__ == "__main__":
    main()
