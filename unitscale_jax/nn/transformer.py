"""Pre-norm Transformer layer and the (scanned) stack of layers.

Residual scheme (u-muP, Blake et al., 2025, section 4 and appendix G): each branch ``f``
computes ``residual_add(f(norm(r)), skip, tau)`` after ``(r, skip) = residual_split(x, tau)``,
with ``tau`` from ``ops.transformer_residual_scaling_rule``: in a stack of ``n`` layers the
attention branch of layer ``l`` has index ``2 l`` and the MLP branch ``2 l + 1`` of ``2 n``.
Layers with cross attention have three branches (self, cross, MLP); their taus use the
same rule generalised to any sequence of branches (``branch_taus``): the cross-attention
branch counts as an attention branch. The residual itself is the parametrization's
(``Parametrization.residual``: ``ops.residual_apply`` for u-muP, the plain
``x + f(norm(x))`` for SP / muP).

``scan_layers=True`` builds the layers with ``nnx.vmap`` (parameters stacked on a leading
``layers`` axis; each keeps its one-layer fan-in and the stack's depth as metadata) and runs
them with ``jax.lax.scan``, so compile time does not grow with depth. The per-layer taus are
then carried as a constant array through the scan (``ops.residual_apply`` takes them so).

Attention patterns (``TransformerConfig.attention_pattern`` / ``attention_window``): each
layer's sliding window is static. An unrolled stack gives each layer its own; a scanned stack
whose layers all share one uses it; a scanned stack that mixes them carries each layer's index
into the distinct windows through the scan and runs ``jax.lax.switch`` over them, each branch
with its window static (so the chunked backend still skips the blocks outside it).

KV caches (``cache_layout``): when every layer is global, or every layer local, the
self-attention cache is one stacked ``{"k", "v"}`` with a leading ``n_layers`` axis. A pattern
that mixes them keeps one such stack per group, ``{"global": {"k", "v"}, "local": {"k", "v"}}``
(``[n_global, ...]`` of the full length, ``[n_local, ...]`` of a ring of ``min(W, length)``
slots), and layer ``l`` owns entry ``cache_layout(windows)[l]`` of it: unrolled stacks index it
directly; scanned ones carry the groups through the scan (their sizes differ) and each layer
reads and writes its entry of every group (the others unchanged) around its ``lax.switch``.

Stack runners (``stack_runner``): inside ``with stack_runner(runner):`` a scanned stack called
without a cache hands its layers to ``runner`` instead of ``jax.lax.scan`` (pipeline
parallelism, ``unitscale_jax.train.pipeline``); the layer function it gets is the scan's body.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitscale_jax import ops
from unitscale_jax.nn.attention import MultiHeadAttention
from unitscale_jax.nn.config import TransformerConfig
from unitscale_jax.nn.layers import make_norm
from unitscale_jax.nn.mlp import MLP
from unitscale_jax.nn.sharding import constrain
from unitscale_jax.taps import suspend_taps, tap

_STREAM = ("batch", "sequence", "embed")
_RUNNER: contextvars.ContextVar = contextvars.ContextVar("unitscale_jax.nn.stack_runner",
                                                         default=None)


@contextlib.contextmanager
def stack_runner(runner: Optional[Callable]) -> Iterator[None]:
    """Runs every scanned ``TransformerStack`` traced inside (without a KV cache) through
    ``runner`` instead of ``jax.lax.scan`` over its layers.

    ``runner(layer_fn, x, xs, batched) -> y``: ``x`` the stack's input ``[batch, ...]``,
    ``xs`` the per-layer inputs (stacked on a leading ``layers`` axis), ``batched`` a dict of
    the arrays whose leading axis is the batch (the attention masks, cross-attention context);
    ``layer_fn(h, layer_xs, batched_rows, microbatch)`` applies one layer to rows ``h`` of the
    stream with those rows of ``batched``; ``microbatch`` (an int32 scalar) is folded into
    the layer's dropout key. ``y`` must equal ``jax.lax.scan`` of ``layer_fn`` over ``xs``.
    ``None`` restores the scan.
    """
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


def branch_taus(kinds: Sequence[str], residual_mult: float = 1.0,
                residual_attn_ratio: float = 1.0,
                depth_exponent: float = 0.5) -> tuple[float, ...]:
    """u-muP residual weights for a sequence of branches (``"attn"`` or ``"mlp"``).

    ``tau_i = alpha_i / sqrt(n_layers^(2 a) + sum_{j<i} alpha_j^2)`` with ``alpha_mlp =
    residual_mult * sqrt(2 / (1 + rho^2))``, ``alpha_attn = rho * alpha_mlp`` and ``a =
    depth_exponent``, where the embedding weighs as ``n_layers^(2 a)`` (at ``a = 1/2``: half
    the branches of a standard stack). For alternating attn/mlp branches this is exactly
    ``ops.transformer_residual_scaling_rule`` (which it calls).

    Args:
      kinds: the branch kinds in order.
      residual_mult: u-muP's ``alpha_res``.
      residual_attn_ratio: u-muP's ``alpha_res-attn-ratio``.
      depth_exponent: the depth exponent ``a`` (0.5: u-muP, 1: CompleteP).

    Returns:
      One tau per branch.
    """
    kinds = tuple(kinds)
    if any(k not in ("attn", "mlp") for k in kinds):
        raise ValueError(f"branch kinds must be 'attn' or 'mlp', got {kinds}.")
    n = len(kinds)
    if n % 2 == 0 and kinds == ("attn", "mlp") * (n // 2):
        rule = ops.transformer_residual_scaling_rule(residual_mult, residual_attn_ratio,
                                                     depth_exponent)
        return tuple(rule(i, n) for i in range(n))
    alpha_mlp = residual_mult * (2.0 / (1.0 + residual_attn_ratio**2)) ** 0.5
    alpha = {"mlp": alpha_mlp, "attn": residual_attn_ratio * alpha_mlp}
    n_layers = kinds.count("mlp")
    taus, total = [], float(n_layers) ** (2.0 * depth_exponent)
    for k in kinds:
        taus.append(alpha[k] / total**0.5)
        total += alpha[k] ** 2
    return tuple(taus)


def cache_group(window: Optional[int]) -> str:
    """The self-attention KV-cache group of a layer with sliding ``window``: ``"global"``
    (None: a cache of the full length) or ``"local"`` (a ring of ``min(W, length)`` slots)."""
    return "global" if window is None else "local"


def cache_layout(windows: Sequence[Optional[int]]) -> Optional[tuple[tuple[str, int], ...]]:
    """Where each layer's self-attention KV cache lives, given the layers' windows.

    Returns:
      None when all layers fall in one ``cache_group`` (the cache is then one stack with a
      leading ``n_layers`` axis), else each layer's ``(group, index in that group's stack)``.
    """
    groups = [cache_group(w) for w in windows]
    if len(set(groups)) < 2:
        return None
    return tuple((g, groups[:l].count(g)) for l, g in enumerate(groups))


def sp_init_stds(config: TransformerConfig, depth: int) -> tuple[Optional[float], Optional[float]]:
    """SP std of (input projections, residual output projections): GPT-2's scheme."""
    if config.sp_init_std is None:
        return None, None
    return config.sp_init_std, config.sp_init_std / (2 * depth) ** 0.5


class TransformerLayer(nnx.Module):
    """Pre-norm Transformer layer: self attention, optional cross attention, MLP.

    Args:
      config: the model's ``TransformerConfig``.
      rngs: ``nnx.Rngs``.
      causal: causal self attention.
      cross_attention: add a cross-attention branch (encoder-decoder's decoder).
      depth: number of layers of the stack (parameter metadata).
      layer: this layer's index (for per-layer precision exceptions; None when scanned).
      window: the self attention's sliding window (None: global).
      window_options: a scanned stack's distinct windows when its layers differ; the call's
        ``window_index`` then picks this layer's (``jax.lax.switch``).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, causal: bool,
                 cross_attention: bool = False, depth: int = 1, layer: Optional[int] = None,
                 window: Optional[int] = None, window_options: Optional[tuple] = None):
        c = config
        self.parametrization = c.parametrization
        self.dropout = float(c.dropout)
        self.deterministic = False
        in_std, out_std = sp_init_stds(c, depth)
        attn_kw = dict(rngs=rngs, d_head=c.head_dim, bias=c.bias, mult=c.attn_mult,
                       dropout=c.dropout, attention_impl=c.attention_impl,
                       attention_kind=c.attention_kind, depth=depth,
                       parametrization=c.parametrization,
                       init_std=in_std, out_init_std=out_std, precision=c.precision,
                       layer=layer, dtype=c.dtype, param_dtype=c.param_dtype,
                       n_kv_heads=c.n_kv_heads, block_q=c.attention_block_q,
                       block_kv=c.attention_block_kv, lora=c.lora_spec)
        self.attn_norm = make_norm(c, depth=depth)
        self.attn = MultiHeadAttention(c.d_model, c.n_heads, causal=causal, use_rope=c.rope,
                                       rope_theta=c.rope_theta, window=window, **attn_kw)
        self.window_options = None if window_options is None else tuple(window_options)
        # a scanned mixed stack hands this layer its entry of every cache group
        self.grouped_cache = (window_options is not None
                              and cache_layout(self.window_options) is not None)
        if cross_attention:
            self.cross_norm = make_norm(c, depth=depth)
            self.cross_attn = MultiHeadAttention(c.d_model, c.n_heads, cross=True, **attn_kw)
        else:
            self.cross_norm = self.cross_attn = None
        self.mlp_norm = make_norm(c, depth=depth)
        self.mlp = MLP(c.d_model, c.ffn_dim, rngs=rngs, kind=c.mlp, act_mult=c.act_mult,
                       bias=c.bias, depth=depth, parametrization=c.parametrization,
                       init_std=in_std, out_init_std=out_std, precision=c.precision,
                       layer=layer, dtype=c.dtype, param_dtype=c.param_dtype,
                       lora=c.lora_spec)

    @property
    def n_branches(self) -> int:
        return 3 if self.cross_attn is not None else 2

    def _branch(self, x, tau, norm, fn, rng, name):
        rate = 0.0 if self.deterministic else self.dropout
        if rate > 0.0 and rng is None:
            raise ValueError("residual dropout is on (dropout > 0, not deterministic): pass rng=, "
                             "or call model.eval() for deterministic evaluation.")
        p = self.parametrization

        def branch(r):
            y = fn(tap(f"{name}.norm", norm(r)))
            return p.dropout(y, rate, rng=rng, deterministic=rate == 0.0)

        return tap(f"{name}.resid", constrain(p.residual(branch, x, tau), _STREAM))

    def __call__(self, x: jax.Array, taus: Any, *, mask: Optional[jax.Array] = None,
                 context: Optional[jax.Array] = None, context_mask: Optional[jax.Array] = None,
                 rng: Optional[jax.Array] = None, cache: Optional[dict] = None,
                 cache_index: Any = None, scale_seq_len: Optional[int] = None,
                 window_index: Any = None):
        """Applies the layer to the stream ``x`` ``[batch, seq, d_model]``.

        Args:
          x: residual stream.
          taus: the branch weights (``n_branches`` floats, or an array under scan).
          mask: self-attention mask (boolean, broadcastable to ``[b, h, q, kv]``).
          context: encoder output for cross attention.
          context_mask: cross-attention mask.
          rng: PRNG key for dropout.
          cache: ``{"self": {"k", "v"}, "cross": {"k", "v"}}`` for incremental decoding (in a
            scanned stack whose windows span cache groups, ``"self"`` holds this layer's entry
            of each group, ``{group: {"k", "v"}}``; its own group's is used and updated).
          cache_index: position of ``x``'s first token.
          scale_seq_len: sequence length of the attention scaling rule (KV cache).
          window_index: this layer's entry of ``window_options`` (scanned mixed stacks).

        Returns:
          The new stream, or ``(stream, new_cache)`` when ``cache`` is given.
        """
        n = self.n_branches
        keys = list(jax.random.split(rng, 2 * n)) if rng is not None else [None] * (2 * n)
        new_cache = {} if cache is not None else None

        def run_attn(h, window):
            if cache is None:
                return self.attn(h, mask=mask, rng=keys[0], window=window)
            own = cache["self"][cache_group(window)] if self.grouped_cache else cache["self"]
            y, c = self.attn(h, mask=mask, rng=keys[0], cache=own, cache_index=cache_index,
                             scale_seq_len=scale_seq_len, window=window)
            if self.grouped_cache:  # every switch branch returns every group's entry
                c = {**cache["self"], cache_group(window): c}
            return y, c

        def self_attn(h):
            if self.window_options is None:
                out = run_attn(h, self.attn.window)
            else:
                out = jax.lax.switch(window_index, [functools.partial(run_attn, window=w)
                                                    for w in self.window_options], h)
            if cache is None:
                return out
            y, new_cache["self"] = out
            return y

        x = self._branch(x, taus[0], self.attn_norm, self_attn, keys[1], "attn")
        if self.cross_attn is not None:
            def cross_attn(h):
                c = None if cache is None else cache.get("cross")
                y = self.cross_attn(h, context=context, mask=context_mask, rng=keys[2], cache=c)
                if c is None:
                    return y
                y, new_cache["cross"] = y
                return y
            x = self._branch(x, taus[1], self.cross_norm, cross_attn, keys[3], "cross_attn")
        x = self._branch(x, taus[-1], self.mlp_norm, lambda h: self.mlp(h, rng=keys[-2]),
                         keys[-1], "mlp")
        return x if cache is None else (x, new_cache)


class TransformerStack(nnx.Module):
    """``n_layers`` ``TransformerLayer`` s with u-muP's residual taus, scanned or unrolled.

    Args:
      config: ``TransformerConfig`` (``scan_layers``, ``remat`` (scanned stacks only) and
        the residual hyperparameters are read from it).
      n_layers: number of layers (also every parameter's ``depth``).
      rngs: ``nnx.Rngs``.
      causal: causal self attention.
      cross_attention: layers with cross attention.
    """

    def __init__(self, config: TransformerConfig, *, n_layers: int, rngs: nnx.Rngs,
                 causal: bool, cross_attention: bool = False):
        self.n_layers = int(n_layers)
        self.scan = bool(config.scan_layers)
        self.remat = bool(config.remat)
        self.deterministic = False
        kinds = (("attn", "attn", "mlp") if cross_attention else ("attn", "mlp")) * self.n_layers
        per = len(kinds) // self.n_layers
        flat = branch_taus(kinds, config.residual_mult, config.residual_attn_ratio,
                           config.depth_exponent)
        self.taus = tuple(tuple(flat[l * per:(l + 1) * per]) for l in range(self.n_layers))
        self.windows = config.layer_windows(self.n_layers)
        options = tuple(dict.fromkeys(self.windows))
        mixed = self.scan and len(options) > 1
        self.window_index = (tuple(options.index(w) for w in self.windows) if mixed
                             else None)
        self.cache_layout = cache_layout(self.windows)

        def make(r, layer):
            return TransformerLayer(
                config, rngs=r, causal=causal, layer=layer, cross_attention=cross_attention,
                depth=self.n_layers, window=None if mixed else self.windows[layer or 0],
                window_options=options if mixed else None)

        if self.scan:
            stacked = nnx.split_rngs(splits=self.n_layers)(
                nnx.vmap(lambda r: make(r, None), in_axes=(0,), out_axes=0,
                         transform_metadata={nnx.PARTITION_NAME: "layers"}))
            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([make(rngs, l) for l in range(self.n_layers)])
        if config.depth_exponent != 0.5:
            # the stack's parameters carry its depth exponent: the u-muP optimizer's depth
            # factor depth^(a - 1) reads it from there (ParamInfo.depth_exponent)
            for _, var in nnx.iter_graph(self.layers):
                if isinstance(var, nnx.Param) and var.get_metadata().get("depth") is not None:
                    var.set_metadata(depth_exponent=float(config.depth_exponent))

    def map_layers(self, fn):
        """Applies ``fn(layer) -> pytree`` to each layer; results stacked on axis 0."""
        if not self.scan:
            outs = [fn(layer) for layer in self.layers]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        graphdef, state = nnx.split(self.layers)

        def body(_, st):
            return None, fn(nnx.merge(graphdef, st))

        with suspend_taps():
            return jax.lax.scan(body, None, state)[1]

    def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None,
                 context: Optional[jax.Array] = None, context_mask: Optional[jax.Array] = None,
                 rng: Optional[jax.Array] = None, cache: Optional[dict] = None,
                 cache_index: Any = None, scale_seq_len: Optional[int] = None):
        """Runs the stack. ``cache`` leaves carry a leading ``n_layers`` axis (a mixed pattern's
        ``cache["self"]`` one per group: see the module docstring and ``cache_layout``).

        Returns:
          The stream, or ``(stream, new_cache)`` when ``cache`` is given.
        """
        kw = dict(mask=mask, context=context, context_mask=context_mask,
                  cache_index=cache_index, scale_seq_len=scale_seq_len)
        keys = None if rng is None else jax.random.split(rng, self.n_layers)
        layout = None if cache is None else self.cache_layout
        if layout is not None:
            self._check_grouped_cache(cache)
        if not self.scan:
            if _RUNNER.get() is not None and cache is None:
                raise ValueError("TransformerStack: a stack runner (pipeline parallelism) "
                                 "needs the stacked layers of scan_layers=True.")
            new = []
            for l, layer in enumerate(self.layers):
                c = None if cache is None else self._layer_cache(cache, l)
                out = layer(x, self.taus[l], rng=None if keys is None else keys[l], cache=c, **kw)
                if cache is None:
                    x = out
                else:
                    x, nc = out
                    new.append(nc)
            if cache is None:
                return x
            return x, self._stack_caches(new)

        graphdef, state = nnx.split(self.layers)
        taus = jnp.asarray(np.array(self.taus, np.float32))
        index = (None if self.window_index is None
                 else jnp.asarray(np.array(self.window_index, np.int32)))
        if layout is not None:
            return self._scan_grouped(graphdef, state, x, taus, keys, cache, index, kw)
        runner = _RUNNER.get()
        if runner is not None and cache is None:
            return self._run_with(runner, graphdef, (state, taus, keys, index), x, kw)

        def body(carry, xs):
            st, tau, key, c, idx = xs
            layer = nnx.merge(graphdef, st)
            out = layer(carry, tau, rng=key, cache=c, window_index=idx, **kw)
            return (out, None) if c is None else out

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        with suspend_taps():
            x, new_cache = jax.lax.scan(body, x, (state, taus, keys, cache, index))
        return x if cache is None else (x, new_cache)

    def _run_with(self, runner: Callable, graphdef, xs: tuple, x: jax.Array, kw: dict):
        """The scanned stack through a ``stack_runner``: the scan's body with the batch-led
        arguments (masks, context) handed over per microbatch, the rest closed over."""
        names = ("mask", "context", "context_mask")
        batched = {k: kw[k] for k in names
                   if kw[k] is not None and jnp.ndim(kw[k]) and kw[k].shape[0] == x.shape[0]}
        shared = {k: v for k, v in kw.items() if k not in batched}

        def layer_fn(h, layer_xs, rows, microbatch):
            st, tau, key, idx = layer_xs
            if key is not None:
                key = jax.random.fold_in(key, microbatch)
            layer = nnx.merge(graphdef, st)
            return layer(h, tau, rng=key, window_index=idx, **shared, **rows)

        if self.remat:
            layer_fn = jax.checkpoint(layer_fn, prevent_cse=False)
        with suspend_taps():
            return runner(layer_fn, x, xs, batched)

    def _check_grouped_cache(self, cache: dict) -> None:
        groups = sorted({g for g, _ in self.cache_layout})
        got = cache.get("self")
        if not isinstance(got, dict) or sorted(got) != groups:
            found = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise ValueError(f"TransformerStack: layers {self.windows} mix local and global "
                             f"attention, so the self-attention KV cache is grouped by "
                             f"{groups} (got {found}); make it with the model's init_cache.")

    def _layer_cache(self, cache: dict, l: int) -> dict:
        """Layer ``l``'s entry of a stacked (or grouped) cache (unrolled stacks)."""
        if self.cache_layout is None:
            return jax.tree.map(lambda a: a[l], cache)
        group, i = self.cache_layout[l]
        c = {k: jax.tree.map(lambda a: a[l], v) for k, v in cache.items() if k != "self"}
        return {**c, "self": jax.tree.map(lambda a: a[i], cache["self"][group])}

    def _stack_caches(self, new: list) -> dict:
        """The layers' new caches, stacked as ``cache`` was (unrolled stacks)."""
        stack = functools.partial(jax.tree.map, lambda *xs: jnp.stack(xs))
        if self.cache_layout is None:
            return stack(*new)
        out = stack(*[{k: v for k, v in nc.items() if k != "self"} for nc in new])
        by_group: dict = {}
        for (group, _), nc in zip(self.cache_layout, new):
            by_group.setdefault(group, []).append(nc["self"])
        return {**out, "self": {g: stack(*cs) for g, cs in by_group.items()}}

    def _scan_grouped(self, graphdef, state, x, taus, keys, cache, index, kw):
        """The scanned stack over a grouped cache: the groups ride in the carry; layer ``l``
        reads entry ``slots[l, j]`` of group ``j`` (its own index in its own group, 0 in the
        others), and writes back what the layer returns (the others' entries unchanged)."""
        names = sorted(cache["self"])
        slots = jnp.asarray(np.array([[i if g == name else 0 for name in names]
                                      for g, i in self.cache_layout], np.int32))
        rest = {k: v for k, v in cache.items() if k != "self"}

        def body(carry, xs):
            h, groups = carry
            st, tau, key, c, idx, slot = xs
            own = {g: jax.tree.map(lambda a, j=j: jax.lax.dynamic_index_in_dim(
                a, slot[j], keepdims=False), groups[g]) for j, g in enumerate(names)}
            layer = nnx.merge(graphdef, st)
            h, nc = layer(h, tau, rng=key, cache={**c, "self": own}, window_index=idx, **kw)
            groups = {g: jax.tree.map(lambda a, n, j=j: jax.lax.dynamic_update_index_in_dim(
                a, n.astype(a.dtype), slot[j], 0), groups[g], nc["self"][g])
                for j, g in enumerate(names)}
            return (h, groups), {k: v for k, v in nc.items() if k != "self"}

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        with suspend_taps():
            (x, groups), new_rest = jax.lax.scan(body, (x, cache["self"]),
                                                 (state, taus, keys, rest, index, slots))
        return x, {**new_rest, "self": groups}
