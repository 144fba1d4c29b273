"""``nn.stack_runner``: a scanned stack hands its layers to the runner (what pipeline
parallelism plugs into); a runner that scans them gives the stack's own output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import nn


def _scan_runner(calls):
    def runner(layer_fn, x, xs, batched):
        calls.append({"batched": sorted(batched), "layers": jax.tree.leaves(xs)[0].shape[0]})
        return jax.lax.scan(lambda h, lx: (layer_fn(h, lx, batched, jnp.int32(0)), None),
                            x, xs)[0]
    return runner


def test_a_scanning_runner_reproduces_the_encoder_with_a_padding_mask():
    model = nn.TransformerEncoder(vocab_size=32, d_model=16, n_layers=3, n_heads=2,
                                  max_seq_len=8, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (4, 8), 0, 32)
    valid = jnp.arange(8)[None, :] < jnp.array([[8], [5], [3], [8]])
    want = model.encode(ids, mask=valid)
    calls = []
    with nn.stack_runner(_scan_runner(calls)):
        got = model.encode(ids, mask=valid)
    np.testing.assert_array_equal(got, want)
    assert calls == [{"batched": ["mask"], "layers": 3}]  # the mask goes per microbatch
    with nn.stack_runner(_scan_runner(calls)), nn.stack_runner(None):
        model.encode(ids, mask=valid)  # None restores the plain scan
    assert len(calls) == 1


def test_an_unrolled_stack_refuses_a_runner():
    model = nn.TransformerDecoder(vocab_size=32, d_model=16, n_layers=2, n_heads=2,
                                  max_seq_len=8, scan_layers=False, rngs=nnx.Rngs(0))
    with nn.stack_runner(_scan_runner([])), pytest.raises(ValueError, match="scan_layers=True"):
        model(jnp.zeros((2, 8), jnp.int32))
