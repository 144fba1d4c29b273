"""``ops.microbatches``: the gradients of M microbatches summed are the whole batch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax import ops


def _whole_and_summed(f, params, x_BD, m):
    """Gradients of ``sum f(params, x)`` over the whole batch and summed over ``m`` row
    blocks traced inside ``ops.microbatches(m)`` (plus the per-block sums without it)."""
    loss = lambda p, x: jnp.sum(f(p, x) * jnp.arange(1.0, f(p, x).shape[-1] + 1))
    whole = jax.grad(loss)(params, x_BD)
    blocks = jnp.split(x_BD, m)
    with ops.microbatches(m):
        summed = [jax.grad(loss)(params, b) for b in blocks]
    plain = [jax.grad(loss)(params, b) for b in blocks]
    add = lambda gs: jax.tree.map(lambda *a: sum(a), *gs)
    return whole, add(summed), add(plain)


@pytest.mark.parametrize("op", ["linear", "rms_norm", "layer_norm"])
def test_microbatch_parameter_gradients_sum_to_the_whole_batch(op):
    k = jax.random.split(jax.random.key(0), 4)
    x_BD = jax.random.normal(k[0], (8, 16))
    if op == "linear":
        params = (jax.random.normal(k[1], (16, 4)), jax.random.normal(k[2], (4,)))
        f = lambda p, x: ops.linear(x, *p)
    elif op == "rms_norm":
        params = (1.0 + 0.1 * jax.random.normal(k[1], (16,)),)
        f = lambda p, x: ops.rms_norm(x, *p)
    else:
        params = (1.0 + 0.1 * jax.random.normal(k[1], (16,)), jax.random.normal(k[2], (16,)))
        f = lambda p, x: ops.layer_norm(x, *p)
    whole, summed, plain = _whole_and_summed(f, params, x_BD, 4)
    for w, s, p in zip(whole, summed, plain):
        np.testing.assert_allclose(s, w, rtol=1e-5, atol=2e-5)
        # without the context each block's gradient is scaled for 2 rows, not 8: 2x too big
        np.testing.assert_allclose(p, 2.0 * w, rtol=1e-5, atol=2e-5)


def test_microbatches_nests_and_restores():
    from unitscale_jax.ops._scale import row_multiple
    assert row_multiple() == 1
    with ops.microbatches(2):
        with ops.microbatches(3):
            assert row_multiple() == 6
        assert row_multiple() == 2
    assert row_multiple() == 1
    with pytest.raises(ValueError, match="m must be >= 1"):
        with ops.microbatches(0):
            pass
