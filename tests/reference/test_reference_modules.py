"""Our Flax NNX modules against ``unit_scaling``'s (0.3.5) at a tiny configuration.

``fixtures_modules.npz`` holds the reference modules' weights (torch layout, ``state_dict``
names), inputs, outputs and gradients (see README.md). Each test builds the matching module
of ``unitscale_jax.nn``, loads the weights through an explicit name/layout map (every
parameter on both sides must be mapped exactly once), and compares the output and the
gradients of every parameter (and of the input, for float inputs).

The name/layout map is the library's (``unitscale_jax.train.from_torch``, which
``unitscale-jax convert --from-torch`` uses): torch ``Linear.weight [out, in]`` -> our kernel
``[in, out]`` (transpose). The reference's fused ``linear_qkv`` output is
``(z, heads, head_dim)`` (q, k, v outermost); ours is head-major ``(heads, z, head_dim)``, so
its rows are permuted before the transpose. The reference MLP's ``linear_1`` is SwiGLU's
linear input (our ``up_proj``), ``linear_gate`` the gate (``gate_proj``), ``linear_2`` the
output (``down_proj``).

Tolerance: rtol=1e-5 and atol=2e-6 * max(1, max|ref|): these chain a dozen ops (attention's
softmax backward among them, see test_reference_ops.py), so float32 rounding differences
reach ~1e-6 of the array's largest element (measured: at most 0.64e-6 of it, in the
decoder's gate-projection gradient).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import nn as unn
from unitscale_jax.train import from_torch
from unitscale_jax.train.from_torch import Target, attention_map, kernel, layer_map, mlp_map

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "cases_modules.json")) as _f:
    CASES = {c["name"]: c for c in json.load(_f)["cases"]}
with np.load(os.path.join(HERE, "fixtures_modules.npz")) as _z:
    REF = {k: _z[k] for k in _z.files}

RTOL, ATOL = 1e-5, 2e-6
HEADS = 2
SAME = dict(to_ours=from_torch.same, transposed=False)


def ref_arrays(name, mapping, kind):
    """The reference's torch-named params (kind="param") or grads (kind="grad")."""
    return {key: REF[f"{name}/{kind}/{key}"] for key in mapping}


def to_ours(name, mapping, kind):
    """{our path: array} of the reference's params or grads, through the library's map."""
    return from_torch.to_ours(ref_arrays(name, mapping, kind), mapping)


def load_params(model, name, mapping):
    torch_keys = {k[len(f"{name}/param/"):] for k in REF if k.startswith(f"{name}/param/")}
    assert torch_keys == set(mapping), f"unmapped reference params: {torch_keys ^ set(mapping)}"
    values = to_ours(name, mapping, "param")
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    ours = {tuple(path) for path, _ in flat}
    assert ours == set(values), (f"params differ: ours only {ours - set(values)}, "
                                 f"ref only {set(values) - ours}")
    new = nnx.from_flat_state([(path, var.replace(jnp.asarray(values[tuple(path)])))
                               for path, var in flat])
    nnx.update(model, new)


def flat_grads(grads):
    return {tuple(path): np.asarray(v[...] if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(grads)}


def assert_close(what, ours, ref):
    ours = np.asarray(ours, np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != reference {ref.shape}"
    atol = ATOL * max(1.0, float(np.abs(ref).max()))
    diff = np.abs(ours - ref)
    bad = diff > atol + RTOL * np.abs(ref)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.size} differ, max abs diff "
                           f"{float(diff.max()):.3e} (max |ref| {float(np.abs(ref).max()):.3e})")


def check_float_module(name, model, mapping, call=lambda m, x: m(x)):
    load_params(model, name, mapping)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, x):
        return call(nnx.merge(graphdef, params, rest), x)

    x = jnp.asarray(REF[f"{name}/in/x"])
    out, vjp = jax.vjp(f, params, x)
    assert_close(f"{name} output", out, REF[f"{name}/out"])
    grad_params, grad_x = vjp(jnp.asarray(REF[f"{name}/g"]))
    assert_close(f"{name} grad x", grad_x, REF[f"{name}/grad_in/x"])
    expected = to_ours(name, mapping, "grad")
    for path, g in flat_grads(grad_params).items():
        assert_close(f"{name} grad {'.'.join(map(str, path))}", g, expected[path])


def test_linear():
    model = unn.Linear(16, 24, rngs=nnx.Rngs(0))
    check_float_module("Linear", model, {"weight": Target(("kernel",), kernel)})


def test_linear_bias():
    model = unn.Linear(16, 24, bias=True, rngs=nnx.Rngs(0))
    check_float_module("Linear_bias", model, {"weight": Target(("kernel",), kernel),
                                              "bias": Target(("bias",), **SAME)})


def test_linear_readout():
    model = unn.LinearReadout(16, 32, rngs=nnx.Rngs(0))
    check_float_module("LinearReadout", model, {"weight": Target(("kernel",), kernel)})


def test_mlp():
    model = unn.MLP(16, 64, rngs=nnx.Rngs(0))
    check_float_module("MLP", model, mlp_map("", ()))


@pytest.mark.parametrize("name", ["MHSA_causal1_mult1.0", "MHSA_causal0_mult2.0"])
def test_mhsa(name):
    cfg = CASES[name]["config"]
    model = unn.MultiHeadAttention(16, cfg["heads"], causal=cfg["is_causal"], mult=cfg["mult"],
                                   rngs=nnx.Rngs(0))
    check_float_module(name, model, attention_map("", (), HEADS))


def test_transformer_layer():
    cfg = CASES["TransformerLayer"]["config"]
    config = unn.TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=cfg["heads"])
    model = unn.TransformerLayer(config, causal=True, depth=2, rngs=nnx.Rngs(0))
    taus = (cfg["mhsa_tau"], cfg["mlp_tau"])
    check_float_module("TransformerLayer", model, layer_map("", (), HEADS),
                       call=lambda m, x: m(x, taus))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("name", ["TransformerDecoder", "TransformerDecoder_res0.5_ratio2"])
def test_transformer_decoder(name, scan):
    cfg = CASES[name]["config"]
    config = unn.TransformerConfig(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["layers"],
        n_heads=cfg["heads"], residual_mult=cfg["residual_mult"],
        residual_attn_ratio=cfg["residual_attn_ratio"], scan_layers=scan)
    model = unn.TransformerDecoder(config, rngs=nnx.Rngs(0))
    mapping = from_torch.decoder_map(cfg["layers"], cfg["heads"], scan=scan)
    load_params(model, name, mapping)
    ids = jnp.asarray(REF[f"{name}/in/x"])
    assert_close(f"{name} logits", model(ids), REF[f"{name}/out"])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(ids))(params)
    assert_close(f"{name} loss", loss, REF[f"{name}/loss"])
    expected = to_ours(name, mapping, "grad")
    for path, g in flat_grads(grads).items():
        assert_close(f"{name} grad {'.'.join(map(str, path))}", g, expected[path])
