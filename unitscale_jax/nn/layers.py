"""Basic Flax NNX layers: ``Linear``, ``LinearReadout``, ``Embedding``, ``LayerNorm``, ``RMSNorm``.

Every parameter is created with ``umup_param(value, type, fan_in, depth)`` and logical
sharding names. Each layer holds a ``Parametrization`` (``parametrization=`` takes the
object or its name) and asks it for its maths and initialisation
(``Parametrization.init_std``):

  ============  ===============  ====================  ===================
  type          ``"umup"``       ``"sp"``              ``"mup"``
  ============  ===============  ====================  ===================
  weight        N(0, 1)          N(0, sp_std)          N(0, 1/fan_in)
  embedding     N(0, 1)          N(0, sp_std)          N(0, 1)
  output        N(0, 1)          N(0, sp_std)          N(0, 1)
  bias / gain   0 / 1            0 / 1                 0 / 1
  ============  ===============  ====================  ===================

``sp_std`` is the caller's ``init_std`` argument (GPT-2's 0.02 from the config), or ``fan_in^-1/2``
(LeCun, Flax's default) when None.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.nn import hooks
from unitscale_jax.nn.lora import LoRAAdapter, LoRASpec
from unitscale_jax.nn.parametrization import Parametrization, get_parametrization
from unitscale_jax.nn.sharding import param_metadata
from unitscale_jax.params import umup_param

ParametrizationLike = Union[str, Parametrization]


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _cast(x: Optional[jax.Array], dtype) -> Optional[jax.Array]:
    return x if x is None or dtype is None else x.astype(dtype)


class Linear(nnx.Module):
    """Unit-scaled linear layer ``y = x @ kernel (+ bias)`` with a ``[fan_in, fan_out]`` kernel.

    u-muP: ``ops.linear`` (``alpha = fan_in^-1/2``; input gradient ``fan_out^-1/2``; kernel and
    bias gradients ``B^-1/2``), kernel N(0, 1), parameter type ``"weight"``.

    Args:
      in_features: fan-in.
      out_features: fan-out.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      bias: add a bias (initialised to 0).
      constraint: the u-muP scale constraint (``"to_output_scale"`` or None, see ops).
      depth: depth of the residual stack this layer belongs to (None outside one).
      parametrization: a ``Parametrization`` or ``"umup"``, ``"sp"``, ``"mup"``.
      init_std: SP's weight std (None: ``fan_in^-1/2``).
      sharding: logical axis names of the kernel ``(in, out)``.
      precision: low-precision policy (see ``unitscale_jax.nn.hooks``), or None.
      role: this projection's role for the precision policy (e.g. ``"mlp.down_proj"``).
      layer: layer index for per-layer precision exceptions (None in scanned stacks).
      dtype: compute dtype (None: the input's).
      param_dtype: storage dtype of the parameters.
      lora: a ``unitscale_jax.nn.lora.LoRASpec``; if it targets ``role``, the layer carries a
        LoRA adapter (attribute ``lora``, added to the projection's output), else None.
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 bias: bool = False, constraint: Optional[str] = "to_output_scale",
                 depth: Optional[int] = None, parametrization: ParametrizationLike = "umup",
                 init_std: Optional[float] = None,
                 sharding: Sequence[Optional[str]] = (None, None), precision: Any = None,
                 role: str = "linear", layer: Optional[int] = None, dtype: Any = None,
                 param_dtype: Any = jnp.float32, param_type: str = "weight",
                 lora: Optional[LoRASpec] = None):
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.constraint = constraint
        self.parametrization = p = get_parametrization(parametrization)
        self.precision = precision
        self.role = role
        self.layer = layer
        self.readout = param_type == "output"
        self.dtype = dtype
        hooks.check_policy(precision)
        std = p.init_std(param_type, self.in_features, init_std)
        self.kernel = umup_param(
            _normal(rngs, (self.in_features, self.out_features), std, param_dtype),
            param_type, self.in_features, depth, **param_metadata(tuple(sharding)))
        self.bias = (umup_param(jnp.zeros((self.out_features,), param_dtype), "bias",
                                self.out_features, depth, **param_metadata((sharding[1],)))
                     if bias else None)
        self.lora = (LoRAAdapter(self.in_features, self.out_features, rank=lora.rank,
                                 mult=lora.mult, rngs=rngs, depth=depth, parametrization=p,
                                 sharding=sharding, dtype=dtype, param_dtype=param_dtype)
                     if lora is not None and lora.applies_to(role) else None)

    def __call__(self, x: jax.Array, *, rng: Optional[jax.Array] = None) -> jax.Array:
        """Projects ``x[..., in_features]``; ``rng`` only for stochastic-rounding policies."""
        dtype = self.dtype or x.dtype
        kernel = _cast(self.kernel[...], dtype)
        bias = _cast(None if self.bias is None else self.bias[...], dtype)
        y = hooks.project(self.precision, self.parametrization, _cast(x, self.dtype), kernel,
                             bias, role=self.role, constraint=self.constraint,
                             readout=self.readout, layer=self.layer, rng=rng)
        return y if self.lora is None else y + self.lora(_cast(x, self.dtype)).astype(y.dtype)


class LinearReadout(Linear):
    """Unit-scaled readout (final projection): ``ops.linear_readout``, ``alpha = 1/fan_in``.

    Parameter type ``"output"``; no constraint (the readout's input gradient is a cut edge).
    In muP form the output is multiplied by ``1/fan_in``; in SP form it is plain.
    Arguments as ``Linear`` (without ``constraint``).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 bias: bool = False, depth: Optional[int] = None,
                 parametrization: ParametrizationLike = "umup", init_std: Optional[float] = None,
                 sharding: Sequence[Optional[str]] = ("embed", "vocab"), precision: Any = None,
                 role: str = "readout", dtype: Any = None, param_dtype: Any = jnp.float32):
        super().__init__(in_features, out_features, rngs=rngs, bias=bias, constraint=None,
                         depth=depth, parametrization=parametrization, init_std=init_std,
                         sharding=sharding, precision=precision, role=role, dtype=dtype,
                         param_dtype=param_dtype, param_type="output")


class Embedding(nnx.Module):
    """Token embedding ``table[ids]`` with a ``[vocab, d]`` table.

    u-muP: ``ops.embedding`` (forward plain gather; table gradient ``sqrt(vocab / ids.size)``),
    table N(0, 1), parameter type ``"embedding"`` with fan-in ``d`` (u-muP's convention).

    Args:
      num_embeddings: vocabulary size.
      features: embedding width ``d``.
      rngs: ``nnx.Rngs``.
      parametrization: a ``Parametrization`` or ``"umup"``, ``"sp"``, ``"mup"``.
      init_std: SP's std (None: ``d^-1/2``).
      check_ids: raise if an id is outside ``[0, vocab)`` (eagerly or, under jit, when run).
      sharding: logical names of the table.
      dtype: compute dtype of the output.
      param_dtype: storage dtype.
    """

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs,
                 parametrization: ParametrizationLike = "umup", init_std: Optional[float] = None,
                 check_ids: bool = False, sharding: Sequence[Optional[str]] = ("vocab", "embed"),
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        self.num_embeddings, self.features = int(num_embeddings), int(features)
        self.parametrization = p = get_parametrization(parametrization)
        self.check_ids = check_ids
        self.dtype = dtype
        std = p.init_std("embedding", self.features, init_std)
        self.embedding = umup_param(
            _normal(rngs, (self.num_embeddings, self.features), std, param_dtype),
            "embedding", self.features, None, **param_metadata(tuple(sharding)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
            raise TypeError("Embedding: ids must be integer token ids, "
                            f"got dtype {jnp.result_type(ids)}.")
        table = _cast(self.embedding[...], self.dtype)
        return self.parametrization.embedding(ids, table, check_ids=self.check_ids)


class _Norm(nnx.Module):
    def __init__(self, features: int, *, use_scale: bool, use_bias: bool, eps: float,
                 depth: Optional[int], parametrization: ParametrizationLike, param_dtype: Any):
        self.features = int(features)
        self.eps = float(eps)
        self.parametrization = get_parametrization(parametrization)
        meta = param_metadata(("embed",))
        self.scale = (umup_param(jnp.ones((self.features,), param_dtype), "norm", self.features,
                                 depth, **meta) if use_scale else None)
        self.bias = (umup_param(jnp.zeros((self.features,), param_dtype), "bias", self.features,
                                depth, **meta) if use_bias else None)

    def _params(self):
        return (None if self.scale is None else self.scale[...],
                None if self.bias is None else self.bias[...])


class RMSNorm(_Norm):
    """RMS normalisation over the last axis; non-parametric by default (u-muP).

    u-muP: ``ops.rms_norm`` (forward unchanged; gain gradient ``1/sqrt(tokens)``).

    Args:
      features: size of the last axis.
      use_scale: learnable gain (type ``"norm"``, initialised to 1).
      eps: added to the mean square.
      depth: residual-stack depth of the gain.
      parametrization: a ``Parametrization`` or ``"umup"``, ``"sp"``, ``"mup"``.
      param_dtype: storage dtype.
    """

    def __init__(self, features: int, *, use_scale: bool = False, eps: float = 1e-5,
                 depth: Optional[int] = None, parametrization: ParametrizationLike = "umup",
                 param_dtype: Any = jnp.float32, rngs: Optional[nnx.Rngs] = None):
        del rngs
        super().__init__(features, use_scale=use_scale, use_bias=False, eps=eps, depth=depth,
                         parametrization=parametrization, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale, _ = self._params()
        return self.parametrization.rms_norm(x, scale, eps=self.eps)


class LayerNorm(_Norm):
    """Layer normalisation over the last axis; non-parametric by default (u-muP).

    u-muP: ``ops.layer_norm`` (forward unchanged; gain and bias gradients ``1/sqrt(tokens)``).

    Args:
      features: size of the last axis.
      use_scale: learnable gain (type ``"norm"``, initialised to 1).
      use_bias: learnable bias (type ``"bias"``, initialised to 0).
      eps: added to the variance.
      depth: residual-stack depth of the parameters.
      parametrization: a ``Parametrization`` or ``"umup"``, ``"sp"``, ``"mup"``.
      param_dtype: storage dtype.
    """

    def __init__(self, features: int, *, use_scale: bool = False, use_bias: bool = False,
                 eps: float = 1e-5, depth: Optional[int] = None,
                 parametrization: ParametrizationLike = "umup",
                 param_dtype: Any = jnp.float32, rngs: Optional[nnx.Rngs] = None):
        del rngs
        super().__init__(features, use_scale=use_scale, use_bias=use_bias, eps=eps,
                         depth=depth, parametrization=parametrization, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = self._params()
        return self.parametrization.layer_norm(x, scale, bias, eps=self.eps)


def make_norm(config, *, depth: Optional[int]) -> _Norm:
    """The norm a ``TransformerConfig`` asks for (``norm``, ``parametric_norm``, ``bias``)."""
    kw = dict(eps=config.norm_eps, depth=depth, parametrization=config.parametrization,
              param_dtype=config.param_dtype, use_scale=config.parametric_norm)
    if config.norm == "rms":
        return RMSNorm(config.d_model, **kw)
    return LayerNorm(config.d_model, use_bias=config.parametric_norm and config.bias, **kw)


def make_embedding(config, rngs: nnx.Rngs) -> Embedding:
    """The token embedding a ``TransformerConfig`` asks for."""
    c = config
    return Embedding(c.vocab_size, c.d_model, rngs=rngs, parametrization=c.parametrization,
                     init_std=c.sp_init_std, check_ids=c.check_ids, dtype=c.dtype,
                     param_dtype=c.param_dtype)


def make_readout(config, rngs: nnx.Rngs, n_out: int, *, role: str = "readout",
                 sharding: Sequence[Optional[str]] = ("embed", "vocab")) -> LinearReadout:
    """A readout from ``d_model`` to ``n_out`` (vocabulary or classes) for a config."""
    c = config
    return LinearReadout(c.d_model, n_out, rngs=rngs, bias=c.bias, role=role, sharding=sharding,
                         parametrization=c.parametrization, init_std=c.sp_init_std,
                         precision=c.precision, dtype=c.dtype, param_dtype=c.param_dtype)


__all__ = ["Embedding", "LayerNorm", "Linear", "LinearReadout", "RMSNorm", "make_embedding",
           "make_norm", "make_readout"]
