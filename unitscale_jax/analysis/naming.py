"""Readable, unique names for tapped activations and parameters, and the row order.

Taps (``unitscale_jax.taps.tap``) are keyed ``"<call order>.<tap name>"`` and the tap
names inside a ``TransformerLayer`` do not say which layer they belong to. Every layer's
first tap is its self-attention pre-norm (``"attn.norm"``), so layers are numbered by
counting those: ``"003.attn.q"`` becomes ``"L0.attn.q"``. A run of layer taps that follows a
non-layer tap (e.g. ``"embed"``) starts a new stack; with several stacks (encoder-decoder)
names get a stack prefix, ``"S1.L0.attn.q"``.

Parameters are named by their path with ``<stack>.layers.<i>.`` shortened to ``L<i>.``
(``stack.layers.0.attn.qkv_proj.kernel`` -> ``L0.attn.qkv_proj.kernel``; other stacks keep
their module name: ``encoder.layers.1.mlp...`` -> ``encoder.L1.mlp...``), and are placed in the
row order just before the activation they produce (``qkv_proj`` before ``attn.q``, ``readout``
before ``logits``, ...).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

_LAYER_PREFIXES = ("attn.", "cross_attn.", "mlp.")
_LAYER_START = "attn.norm"

# parameter module name -> the tap (suffix) of the op it feeds
_FEEDS = {
    "qkv_proj": "attn.q", "q_proj": "attn.q", "kv_proj": "attn.k", "out_proj": "attn.proj",
    "up_proj": "mlp.up", "gate_proj": "mlp.gate", "down_proj": "mlp.out",
    "attn_norm": "attn.norm", "cross_norm": "cross_attn.norm", "mlp_norm": "mlp.norm",
    "embed": "embed", "final_norm": "final_norm", "readout": "logits",
}


def op_names(keys: Sequence[str]) -> list[str]:
    """Display names for captured tap keys (``"<order>.<name>"``, in call order)."""
    raw = [k.split(".", 1)[1] if re.match(r"^\d+\.", k) else k for k in keys]
    stack, layer, in_layers, tagged = -1, -1, False, []
    for name in raw:
        if name.startswith(_LAYER_PREFIXES):
            if not in_layers:
                stack, layer, in_layers = stack + 1, -1, True
            if name == _LAYER_START:
                layer += 1
            tagged.append((stack, max(layer, 0), name))
        else:
            in_layers = False
            tagged.append((None, None, name))
    multi = stack > 0
    names, seen = [], {}
    for s, l, name in tagged:
        if s is not None:
            name = f"{f'S{s}.' if multi else ''}L{l}.{name}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def param_name(path: Sequence) -> str:
    """``("stack", "layers", 0, "attn", "qkv_proj", "kernel")`` -> ``"L0.attn.qkv_proj.kernel"``."""
    name = ".".join(str(p) for p in path)
    name = re.sub(r"^stack\.layers\.(\d+)\.", r"L\1.", name)
    return re.sub(r"(^|\.)layers\.(\d+)\.", r"\1L\2.", name)


def _target(weight: str, ops: Sequence[str]) -> Optional[int]:
    """Index of the op row that ``weight`` feeds, or None."""
    parts = weight.split(".")
    at = [i for i, p in enumerate(parts) if re.fullmatch(r"L\d+", p)]
    layer = parts[at[0]] if at else None
    modules = parts[at[0] + 1:-1] if at else parts[:-1]
    for i, mod in enumerate(modules):
        tap = _FEEDS.get(mod)
        if tap is None:
            continue
        if i > 0 and modules[i - 1] == "cross_attn":
            tap = "cross_attn." + tap.split(".", 1)[1]
        want = f"{layer}.{tap}" if layer else tap
        for j, op in enumerate(ops):
            if op == want or (layer is not None and op.endswith("." + want)):
                return j
    return None


def row_order(ops: Sequence[str], weights: Sequence[str]) -> list[str]:
    """All row names: ops in call order, each weight just before the op it feeds."""
    before: dict[int, list[str]] = {}
    tail = []
    for w in weights:
        j = _target(w, ops)
        (before.setdefault(j, []) if j is not None else tail).append(w)
    rows = []
    for j, op in enumerate(ops):
        rows.extend(before.get(j, []))
        rows.append(op)
    return rows + tail
