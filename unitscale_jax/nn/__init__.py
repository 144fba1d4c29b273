"""Flax NNX unit-scaled modules and models (``unitscale_jax.nn``)."""

from unitscale_jax.nn.params import PARAM_TYPES, ParamInfo, info_of, param_info, umup_param

__all__ = ["PARAM_TYPES", "ParamInfo", "info_of", "param_info", "umup_param"]
