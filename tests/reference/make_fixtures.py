"""Generates the reference fixtures from the authors' PyTorch library ``unit-scaling`` 0.3.5.

Run ONLY in a separate virtual environment that has torch and unit-scaling (never add torch to
this project's dependencies). From the repository root:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 unit-scaling==0.3.5 numpy
    /tmp/refvenv/bin/python tests/reference/make_fixtures.py

It writes, next to this file:

- ``fixtures.npz`` + ``cases.json``: one case per op configuration of ``unitscale_jax.ops``:
  inputs, forward outputs, a fixed random upstream gradient ``g`` per output and the VJP
  (gradient of ``sum(out * g)``) for every differentiable input, plus exact scalar values
  (``logarithmic_interpolation``, constraints, ``transformer_residual_scaling_rule``).
- ``fixtures_modules.npz`` + ``cases_modules.json``: tiny ``unit_scaling`` modules (Linear,
  LinearReadout, MLP, MHSA, TransformerLayer, TransformerDecoder) with their weights, inputs,
  outputs and parameter gradients, for checking ``unitscale_jax.nn`` later (see README.md).

Arrays in ``fixtures.npz`` are stored in *our* (JAX/Flax) layout: kernels ``[fan_in, fan_out]``
(torch's ``[out, in]`` transposed), attention tensors ``[batch, seq, heads, head_dim]`` (torch's
``[batch, heads, seq, head_dim]`` transposed). Module fixtures keep torch's layout and
``state_dict`` names (README.md explains the mapping). bfloat16 cases are stored as float32
(exact upcast) with ``"dtype": "bfloat16"`` in their case entry. Inputs come from numpy's
PCG64 seeded with the crc32 of the case name, so regenerating gives identical inputs.
"""

from __future__ import annotations

import json
import math
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F
import unit_scaling as uu
import unit_scaling.functional as U
from unit_scaling import constraints as UC
from unit_scaling.core.functional import (
    logarithmic_interpolation,
    transformer_residual_scaling_rule,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

ARRAYS: dict[str, np.ndarray] = {}
CASES: list[dict] = []


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def to_np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()  # exact
    if t.dtype == torch.int64:
        t = t.to(torch.int32)
    return t.numpy().copy()


# Layout converters: torch layout -> ours.
IDENT = lambda a: a  # noqa: E731
KERNEL = lambda a: a.T  # [out, in] -> [in, out]  # noqa: E731
BHSD = lambda a: np.swapaxes(a, 1, 2)  # [b, h, s, d] <-> [b, s, h, d]  # noqa: E731


def record(name, op, fn, inputs, diff, *, args, kwarrays=(), kwargs=None, layouts=None,
           out_layouts=None, dtype="float32", extra=None, note=None):
    """Runs ``fn(**inputs)`` in torch, takes the VJP with a random upstream gradient, stores all.

    Args:
      name: unique case name.
      op: name of the function in ``unitscale_jax.ops`` (or a special op the test knows).
      fn: torch callable taking the inputs (torch layout) as keywords; returns a tensor or tuple.
      inputs: dict of torch tensors (torch layout, already in the case dtype).
      diff: names of inputs to differentiate.
      args: our op's positional arguments: input names, or {"scalar": v} for a Python scalar.
      kwarrays: input names passed to our op as keyword arrays.
      kwargs: static keyword arguments of our op (JSON).
      layouts: per-input layout converter to ours (default identity).
      out_layouts: per-output layout converter (default identity).
      extra: dict of additional numpy arrays to store (ours layout) under ``{name}/extra/``.
    """
    assert name not in {c["name"] for c in CASES}, name
    layouts = layouts or {}
    rng = rng_for(name + "/g")
    leaves = {k: (v.clone().requires_grad_(True) if k in diff else v) for k, v in inputs.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    out_layouts = out_layouts or [IDENT] * len(outs)
    gs = [torch.from_numpy(rng.standard_normal(o.shape).astype(np.float32)).to(o.dtype)
          for o in outs]
    grads = torch.autograd.grad(outs, [leaves[k] for k in diff], grad_outputs=gs)
    for k, v in inputs.items():
        ARRAYS[f"{name}/in/{k}"] = layouts.get(k, IDENT)(to_np(v))
    for i, (o, g, lay) in enumerate(zip(outs, gs, out_layouts)):
        ARRAYS[f"{name}/out/{i}"] = lay(to_np(o))
        ARRAYS[f"{name}/g/{i}"] = lay(to_np(g))
    for k, gr in zip(diff, grads):
        ARRAYS[f"{name}/grad/{k}"] = layouts.get(k, IDENT)(to_np(gr))
    for k, v in (extra or {}).items():
        ARRAYS[f"{name}/extra/{k}"] = v
    CASES.append(dict(name=name, op=op, args=list(args), kwarrays=list(kwarrays),
                      kwargs=kwargs or {}, diff=list(diff), n_out=len(outs), dtype=dtype,
                      extra=sorted(extra or {}), note=note))


def randn(name, key, shape, dtype="float32", scale=1.0):
    a = rng_for(f"{name}/{key}").standard_normal(shape).astype(np.float32) * scale
    return torch.from_numpy(a).to(TORCH_DTYPES[dtype])


# ----------------------------------------------------------------------------------- ops


def linear_cases():
    for fn_name, op, default in (("linear", U.linear, "to_output_scale"),
                                 ("linear_readout", U.linear_readout, None)):
        configs = [("3d", (4, 8, 16), False, default, "float32"),
                   ("2d_bias", (8, 16), True, default, "float32"),
                   ("3d_bias", (4, 8, 16), True, default, "float32"),
                   ("bf16", (4, 8, 16), True, default, "bfloat16")]
        if fn_name == "linear":
            configs += [(f"c_{c}", (4, 8, 16), True, c, "float32")
                        for c in ("to_grad_input_scale", "gmean", "hmean", "amean", "none")]
        else:
            configs += [("c_to_output_scale", (4, 8, 16), True, "to_output_scale", "float32")]
        for tag, xshape, bias, c, dt in configs:
            c = None if c == "none" else c
            name = f"{fn_name}/{tag}"
            inputs = dict(x=randn(name, "x", xshape, dt), kernel=randn(name, "w", (12, 16), dt))
            if bias:
                inputs["bias"] = randn(name, "b", (12,), dt)
            fn = (lambda op, c: lambda x, kernel, bias=None: op(x, kernel, bias,
                                                                constraint=c))(op, c)
            record(name, fn_name, fn, inputs, list(inputs), args=["x", "kernel"],
                   kwarrays=["bias"] if bias else [], kwargs=dict(constraint=c),
                   layouts=dict(kernel=KERNEL), dtype=dt)


def matmul_cases():
    configs = [("3d", (4, 8, 16), (4, 16, 12), "to_output_scale", "float32"),
               ("2d", (8, 16), (16, 12), "to_output_scale", "float32"),
               ("bcast", (4, 8, 16), (16, 12), "to_output_scale", "float32"),
               ("bf16", (4, 8, 16), (4, 16, 12), "to_output_scale", "bfloat16")]
    configs += [(f"c_{c}", (4, 8, 16), (4, 16, 12), c, "float32")
                for c in ("to_left_grad_scale", "to_right_grad_scale", "gmean", "hmean", "amean",
                          "none")]
    for tag, ashape, bshape, c, dt in configs:
        c = None if c == "none" else c
        name = f"matmul/{tag}"
        inputs = dict(a=randn(name, "a", ashape, dt), b=randn(name, "b", bshape, dt))
        fn = (lambda c: lambda a, b: U.matmul(a, b, constraint=c))(c)
        record(name, "matmul", fn, inputs, ["a", "b"], args=["a", "b"], kwargs=dict(constraint=c),
               dtype=dt)


def add_cases():
    configs = [("same", (4, 8, 16), (4, 8, 16), "to_output_scale", "float32"),
               ("bcast_last", (4, 8, 16), (16,), "to_output_scale", "float32"),
               ("bcast_both", (4, 1, 16), (1, 8, 16), "to_output_scale", "float32"),
               ("bcast_size1", (1,), (8, 16), "to_output_scale", "float32"),
               ("bf16", (4, 8, 16), (8, 16), "to_output_scale", "bfloat16")]
    configs += [(f"c_{c}", (4, 8, 16), (8, 1), c, "float32")
                for c in ("to_left_grad_scale", "to_right_grad_scale", "gmean", "hmean", "amean",
                          "none")]
    for tag, ashape, bshape, c, dt in configs:
        c = None if c == "none" else c
        name = f"add/{tag}"
        inputs = dict(a=randn(name, "a", ashape, dt), b=randn(name, "b", bshape, dt))
        fn = (lambda c: lambda a, b: U.add(a, b, constraint=c))(c)
        record(name, "add", fn, inputs, ["a", "b"], args=["a", "b"], kwargs=dict(constraint=c),
               dtype=dt)
    name = "add/python_scalar"
    inputs = dict(a=randn(name, "a", (8, 16)))
    record(name, "add", lambda a: U.add(a, 2.5), inputs, ["a"], args=["a", {"scalar": 2.5}])


def elementwise_cases():
    shape = (4, 8, 16)
    for mult in (1.0, 0.5):
        for approx in (False, True):
            for c in (("to_output_scale",)
                      + (("to_grad_input_scale", "gmean", "hmean", "amean", None)
                         if mult == 0.5 and not approx else ())):
                name = f"gelu/mult{mult}_approx{int(approx)}_c{c}"
                x = randn(name, "x", shape, scale=2.0)
                fn = (lambda m, a, c: lambda x: U.gelu(x, mult=m, constraint=c,
                                                      approximate="tanh" if a else "none"))(
                    mult, approx, c)
                record(name, "gelu", fn, dict(x=x), ["x"], args=["x"],
                       kwargs=dict(mult=mult, approximate=approx, constraint=c))
    name = "gelu/bf16"
    record(name, "gelu", lambda x: U.gelu(x, mult=0.5), dict(x=randn(name, "x", shape, "bfloat16")),
           ["x"], args=["x"], kwargs=dict(mult=0.5), dtype="bfloat16")
    for mult in (1.0, 2.0):
        for c in ("to_output_scale",) + (("to_grad_input_scale", "gmean", None)
                                         if mult == 2.0 else ()):
            name = f"silu/mult{mult}_c{c}"
            fn = (lambda m, c: lambda x: U.silu(x, mult=m, constraint=c))(mult, c)
            record(name, "silu", fn, dict(x=randn(name, "x", shape, scale=2.0)), ["x"], args=["x"],
                   kwargs=dict(mult=mult, constraint=c))
    for mult, dt in ((1.0, "float32"), (0.7, "float32"), (0.7, "bfloat16")):
        name = f"silu_glu/mult{mult}_{dt}"
        inputs = dict(x=randn(name, "x", shape, dt), gate=randn(name, "gate", shape, dt, 2.0))
        fn = (lambda m: lambda x, gate: U.silu_glu(x, gate, mult=m))(mult)
        record(name, "silu_glu", fn, inputs, ["x", "gate"], args=["x", "gate"],
               kwargs=dict(mult=mult), dtype=dt)
    for mult in (1.0, 3.0):
        for axis in (-1, 0, 1):
            for c in ("to_output_scale",) + (("to_grad_input_scale", None) if axis == -1 else ()):
                name = f"softmax/mult{mult}_axis{axis}_c{c}"
                fn = (lambda m, a, c: lambda x: U.softmax(x, dim=a, mult=m, constraint=c))(
                    mult, axis, c)
                record(name, "softmax", fn, dict(x=randn(name, "x", shape)), ["x"], args=["x"],
                       kwargs=dict(axis=axis, mult=mult, constraint=c))
    name = "softmax/bf16"
    record(name, "softmax", lambda x: U.softmax(x, dim=-1, mult=3.0),
           dict(x=randn(name, "x", shape, "bfloat16")), ["x"], args=["x"],
           kwargs=dict(axis=-1, mult=3.0), dtype="bfloat16")
    # Dropout: RNGs differ between frameworks, so only p=0 and evaluation mode.
    for tag, p, training in (("p0_train", 0.0, True), ("p0.3_eval", 0.3, False),
                             ("p0_eval", 0.0, False)):
        name = f"dropout/{tag}"
        fn = (lambda p, t: lambda x: U.dropout(x, p, training=t))(p, training)
        record(name, "dropout", fn, dict(x=randn(name, "x", shape)), ["x"], args=["x"],
               kwargs=dict(rate=p, deterministic=not training))


def norm_cases():
    shape = (4, 8, 16)
    for w in (False, True):
        for b in (False, True):
            for dt in ("float32",) + (("bfloat16",) if w and b else ()):
                name = f"layer_norm/w{int(w)}_b{int(b)}_{dt}"
                inputs = dict(x=randn(name, "x", shape, dt, 3.0))
                if w:
                    inputs["scale"] = (1.0 + randn(name, "scale", (16,), "float32", 0.5)).to(
                        TORCH_DTYPES[dt])
                if b:
                    inputs["bias"] = randn(name, "bias", (16,), dt)
                fn = lambda x, scale=None, bias=None: U.layer_norm(x, (16,), scale, bias)  # noqa: E731
                record(name, "layer_norm", fn, inputs, list(inputs), args=["x"],
                       kwarrays=[k for k in ("scale", "bias") if k in inputs], dtype=dt)
    name = "layer_norm/eps1e-2"
    inputs = dict(x=randn(name, "x", shape, scale=0.1), scale=randn(name, "scale", (16,)))
    record(name, "layer_norm", lambda x, scale: U.layer_norm(x, (16,), scale, None, eps=1e-2),
           inputs, ["x", "scale"], args=["x"], kwarrays=["scale"], kwargs=dict(eps=1e-2))
    for w in (False, True):
        for dt in ("float32", "bfloat16"):
            name = f"rms_norm/w{int(w)}_{dt}"
            inputs = dict(x=randn(name, "x", shape, dt, 3.0))
            if w:
                inputs["scale"] = (1.0 + randn(name, "scale", (16,), "float32", 0.5)).to(
                    TORCH_DTYPES[dt])
            fn = lambda x, scale=None: U.rms_norm(x, (16,), scale)  # noqa: E731
            record(name, "rms_norm", fn, inputs, list(inputs), args=["x"],
                   kwarrays=["scale"] if w else [], dtype=dt)
    name = "rms_norm/eps1e-2"
    inputs = dict(x=randn(name, "x", shape, scale=0.1), scale=randn(name, "scale", (16,)))
    record(name, "rms_norm", lambda x, scale: U.rms_norm(x, (16,), scale, eps=1e-2), inputs,
           ["x", "scale"], args=["x"], kwarrays=["scale"], kwargs=dict(eps=1e-2))


def embedding_cases():
    for tag, ids_shape, vocab in (("2d", (4, 8), 16), ("1d", (10,), 32)):
        name = f"embedding/{tag}"
        ids = torch.from_numpy(rng_for(name + "/ids").integers(0, vocab, ids_shape)).long()
        table = randn(name, "table", (vocab, 8))
        record(name, "embedding", lambda ids, table: U.embedding(ids, table),
               dict(ids=ids, table=table), ["table"], args=["ids", "table"])


def attention_cases():
    b, h, d = 2, 4, 16
    configs = [(f"causal{int(c)}_mult{m}", 8, 8, c, m, False, "float32")
               for c in (False, True) for m in (1.0, 2.0)]
    configs += [("cross_q6_kv8", 6, 8, False, 1.0, False, "float32"),
                ("causal1_q6_kv8", 6, 8, True, 1.0, False, "float32"),  # torch: top-left causal
                ("mask_mult2", 8, 8, False, 2.0, True, "float32"),
                ("causal1_bf16", 8, 8, True, 1.0, False, "bfloat16")]
    for tag, sq, skv, causal, mult, use_mask, dt in configs:
        name = f"scaled_dot_product_attention/{tag}"
        inputs = dict(q=randn(name, "q", (b, h, sq, d), dt, 4.0),
                      k=randn(name, "k", (b, h, skv, d), dt, 4.0),
                      v=randn(name, "v", (b, h, skv, d), dt))
        kwarrays = []
        if use_mask:  # padding mask [b, 1, 1, kv]; key 0 always visible (no empty rows)
            valid = torch.tensor([[True] * skv, [True] * (skv - 3) + [False] * 3])
            inputs["mask"] = valid[:, None, None, :]
            kwarrays = ["mask"]
        fn = (lambda c, m: lambda q, k, v, mask=None: U.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=c, mult=m))(causal, mult)
        record(name, "scaled_dot_product_attention", fn, inputs, ["q", "k", "v"],
               args=["q", "k", "v"], kwarrays=kwarrays, kwargs=dict(is_causal=causal, mult=mult),
               layouts=dict(q=BHSD, k=BHSD, v=BHSD), out_layouts=[BHSD], dtype=dt)


def loss_cases():
    n, vocab = 16, 12
    for mult in (1.0, 2.0):
        name = f"cross_entropy/mult{mult}"
        logits = randn(name, "logits", (n, vocab), scale=2.0)
        labels = torch.from_numpy(rng_for(name + "/labels").integers(0, vocab, (n,))).long()
        fn = (lambda m: lambda logits, labels: U.cross_entropy(logits, labels, mult=m))(mult)
        record(name, "cross_entropy", fn, dict(logits=logits, labels=labels), ["logits"],
               args=["logits", "labels"], kwargs=dict(mult=mult))
    # Ours takes [..., V]; the reference only [B, V]: same values after flattening.
    name = "cross_entropy/3d_mult2.0"
    logits = randn(name, "logits", (2, 8, vocab), scale=2.0)
    labels = torch.from_numpy(rng_for(name + "/labels").integers(0, vocab, (2, 8))).long()
    record(name, "cross_entropy",
           lambda logits, labels: U.cross_entropy(logits.flatten(0, 1), labels.flatten(), mult=2.0),
           dict(logits=logits, labels=labels), ["logits"], args=["logits", "labels"],
           kwargs=dict(mult=2.0))
    name = "cross_entropy/1d"  # a single position: logits [V], labels []
    logits = randn(name, "logits", (vocab,), scale=2.0)
    labels = torch.tensor(int(rng_for(name + "/labels").integers(0, vocab)))
    record(name, "cross_entropy", lambda logits, labels: U.cross_entropy(logits, labels),
           dict(logits=logits, labels=labels), ["logits"], args=["logits", "labels"])
    # Masked: the reference's ignore_index divides the sum by all rows, ours (where=) by the valid
    # ones. Gradients do not depend on the divisor; the value is checked against the manual mean.
    for mult in (1.0, 2.0):
        name = f"cross_entropy/masked_mult{mult}"
        logits = randn(name, "logits", (n, vocab), scale=2.0)
        labels = torch.from_numpy(rng_for(name + "/labels").integers(0, vocab, (n,))).long()
        valid = torch.from_numpy(rng_for(name + "/valid").random(n) > 0.3)
        valid[0] = True
        ref_labels = torch.where(valid, labels, torch.full_like(labels, -100))
        manual = F.cross_entropy(mult * logits.double(), ref_labels, reduction="mean")
        fn = (lambda m, rl: lambda logits, labels, where: U.cross_entropy(logits, rl, mult=m))(
            mult, ref_labels)
        record(name, "cross_entropy", fn, dict(logits=logits, labels=labels, where=valid),
               ["logits"],
               args=["logits", "labels"], kwarrays=["where"], kwargs=dict(mult=mult),
               extra=dict(manual_mean=np.array(manual.item(), np.float32)),
               note="out/0 is the reference's sum/n_rows; ours is the mean over valid rows "
                    "(extra/manual_mean, from plain torch cross_entropy on mult*logits)")
    for tag, shape in (("2d", (8, 16)), ("3d", (4, 8, 16))):
        name = f"mse_loss/{tag}"
        inputs = dict(pred=randn(name, "pred", shape), target=randn(name, "target", shape))
        record(name, "mse_loss", lambda pred, target: U.mse_loss(pred, target), inputs,
               ["pred", "target"], args=["pred", "target"])


def residual_cases():
    shape = (4, 8, 16)
    for tau in (0.5, 1.0, 2.0):
        name = f"residual_split/tau{tau}"
        record(name, "residual_split", (lambda t: lambda x: U.residual_split(x, tau=t))(tau),
               dict(x=randn(name, "x", shape)), ["x"], args=["x"], kwargs=dict(tau=tau))
        name = f"residual_add/tau{tau}"
        record(name, "residual_add", (lambda t: lambda r, s: U.residual_add(r, s, tau=t))(tau),
               dict(r=randn(name, "r", shape), s=randn(name, "s", shape)), ["r", "s"],
               args=["r", "s"], kwargs=dict(tau=tau))
        # residual_apply with fn = unit-scaled linear (kernel is an input, so its grad is checked).
        name = f"residual_apply/linear_tau{tau}"
        inputs = dict(x=randn(name, "x", shape), w=randn(name, "w", (16, 16)))
        fn = (lambda t: lambda x, w: U.residual_apply(lambda r: U.linear(r, w, None), x,
                                                      tau=t))(tau)
        record(name, "residual_apply_linear", fn, inputs, ["x", "w"], args=["x", "w"],
               kwargs=dict(tau=tau), layouts=dict(w=KERNEL),
               note="our fn: lambda r: ops.linear(r, w)")


def primitive_cases():
    from unit_scaling.scale import scale_bwd, scale_fwd

    for op, f in (("scale_fwd", scale_fwd), ("scale_bwd", scale_bwd)):
        for s in (0.25, 3.0):
            name = f"{op}/s{s}"
            record(name, op, (lambda f, s: lambda x: f(x, s))(f, s),
                   dict(x=randn(name, "x", (8, 16))), ["x"], args=["x", {"scalar": s}])


def scalar_cases():
    """Exact values of pure-Python helpers (JSON floats round-trip exactly)."""
    out = {}
    out["logarithmic_interpolation"] = [
        dict(args=[a, lo, hi], value=logarithmic_interpolation(a, lo, hi))
        for a, lo, hi in ((0.0, 1e-3, 0.1), (0.5, 1e-3, 0.1), (1.0, 1e-3, 0.1), (0.3, 2.0, 2**0.5),
                          (0.8, 16.0, 4.0), (1 / (1 + 0.25), 2.0, (2 / (1 - 1 / math.pi)) ** 0.5))]
    rules = []
    for rm, ratio in ((1.0, 1.0), (0.5, 2.0), (2.0, 0.5), (1.3, 0.7)):
        rule = transformer_residual_scaling_rule(rm, ratio)
        for layers in (1, 3):
            rules.append(dict(residual_mult=rm, residual_attn_ratio=ratio, n_branches=2 * layers,
                              taus=[rule(i, 2 * layers) for i in range(2 * layers)]))
    out["transformer_residual_scaling_rule"] = rules
    cons = []
    for scales in ((0.25, 0.5), (0.125, 2.0), (0.25, 0.5, 0.1), (1.0, 0.3, 3.0)):
        names = ["to_output_scale", "gmean", "hmean", "amean", None]
        names += (["to_grad_input_scale"] if len(scales) == 2
                  else ["to_left_grad_scale", "to_right_grad_scale"])
        for c in names:
            cons.append(dict(constraint=c, scales=list(scales),
                             value=list(UC.apply_constraint(c, *scales))))
    out["apply_constraint"] = cons
    return out


# ------------------------------------------------------------------------------- modules

MOD_ARRAYS: dict[str, np.ndarray] = {}
MOD_CASES: list[dict] = []


def record_module(name, module, x, *, config, loss_fn=None):
    """Stores a module's state_dict (torch layout), input, output(s) and parameter gradients.

    Float inputs: grads of ``sum(out * g)`` w.r.t. input and every parameter. Token inputs
    (decoder): logits, plus grads of ``loss_fn(module, x)`` (the reference's ``.loss``).
    """
    rng = rng_for(name + "/g")
    params = dict(module.named_parameters())
    for k, p in module.state_dict().items():
        MOD_ARRAYS[f"{name}/param/{k}"] = to_np(p)
    MOD_ARRAYS[f"{name}/in/x"] = to_np(x)
    entry = dict(name=name, cls=type(module).__name__, config=config, params=sorted(params))
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
        out = module(x)
        g = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))
        grads = torch.autograd.grad(out, [x, *params.values()], grad_outputs=g)
        MOD_ARRAYS[f"{name}/grad_in/x"] = to_np(grads[0])
        MOD_ARRAYS[f"{name}/g"] = to_np(g)
        grads = grads[1:]
        entry["grad_of"] = "sum(out * g)"
    else:
        out = module(x)
        loss = loss_fn(module, x)
        grads = torch.autograd.grad(loss, list(params.values()))
        MOD_ARRAYS[f"{name}/loss"] = np.array(loss.item(), np.float32)
        entry["grad_of"] = "loss"
    MOD_ARRAYS[f"{name}/out"] = to_np(out)
    for k, gr in zip(params, grads):
        MOD_ARRAYS[f"{name}/grad/{k}"] = to_np(gr)
    MOD_CASES.append(entry)


def module_cases():
    d, heads, vocab, b, s = 16, 2, 32, 2, 8

    def x_for(name):
        return randn(name, "x", (b, s, d))

    torch.manual_seed(0)
    record_module("Linear", uu.Linear(d, 24), x_for("Linear"),
                  config=dict(in_features=d, out_features=24, bias=False,
                              constraint="to_output_scale"))
    torch.manual_seed(1)
    m = uu.Linear(d, 24, bias=True)
    with torch.no_grad():
        m.bias.normal_()  # non-zero bias so that its effect is visible
    record_module("Linear_bias", m, x_for("Linear_bias"),
                  config=dict(in_features=d, out_features=24, bias=True,
                              constraint="to_output_scale"))
    torch.manual_seed(2)
    record_module("LinearReadout", uu.LinearReadout(d, vocab), x_for("LinearReadout"),
                  config=dict(in_features=d, out_features=vocab, bias=False, constraint=None))
    torch.manual_seed(3)
    record_module("MLP", uu.MLP(d), x_for("MLP"), config=dict(hidden_size=d, expansion_factor=4))
    for causal, mult in ((True, 1.0), (False, 2.0)):
        name = f"MHSA_causal{int(causal)}_mult{mult}"
        torch.manual_seed(4)
        record_module(name, uu.MHSA(d, heads, is_causal=causal, mult=mult), x_for(name),
                      config=dict(hidden_size=d, heads=heads, is_causal=causal, dropout_p=0.0,
                                  mult=mult))
    torch.manual_seed(5)
    rule = transformer_residual_scaling_rule()
    taus = dict(mhsa_tau=rule(0, 4), mlp_tau=rule(1, 4))
    record_module("TransformerLayer", uu.TransformerLayer(d, heads, is_causal=True, **taus),
                  x_for("TransformerLayer"), config=dict(hidden_size=d, heads=heads, is_causal=True,
                                                         dropout_p=0.0, **taus))

    def decoder_loss(model, ids):
        return model.loss(ids)

    for tag, rm, ratio in (("", 1.0, 1.0), ("_res0.5_ratio2", 0.5, 2.0)):
        name = f"TransformerDecoder{tag}"
        torch.manual_seed(6)
        model = uu.TransformerDecoder(d, vocab, layers=2, heads=heads,
                                      residual_scaling=transformer_residual_scaling_rule(rm, ratio))
        model.eval()
        ids = torch.from_numpy(rng_for(name + "/ids").integers(0, vocab, (b, s))).long()
        record_module(name, model, ids, loss_fn=decoder_loss,
                      config=dict(hidden_size=d, vocab_size=vocab, layers=2, heads=heads,
                                  dropout_p=0.0, residual_mult=rm, residual_attn_ratio=ratio))


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    primitive_cases()
    linear_cases()
    matmul_cases()
    add_cases()
    elementwise_cases()
    norm_cases()
    embedding_cases()
    attention_cases()
    loss_cases()
    residual_cases()
    scalars = scalar_cases()
    np.savez_compressed(os.path.join(HERE, "fixtures.npz"), **ARRAYS)
    meta = dict(generator="tests/reference/make_fixtures.py", torch=torch.__version__,
                unit_scaling=uu.__version__ if hasattr(uu, "__version__") else "0.3.5",
                cases=CASES, scalars=scalars)
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    module_cases()
    np.savez_compressed(os.path.join(HERE, "fixtures_modules.npz"), **MOD_ARRAYS)
    with open(os.path.join(HERE, "cases_modules.json"), "w") as f:
        json.dump(dict(generator="tests/reference/make_fixtures.py", torch=torch.__version__,
                       cases=MOD_CASES), f, indent=1)
    print(f"{len(CASES)} op cases, {sum(len(v) for v in scalars.values())} scalar values, "
          f"{len(MOD_CASES)} module cases")


if __name__ == "__main__":
    main()
