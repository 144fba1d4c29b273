"""unitscale_jax: unit scaling and u-muP for JAX, Flax NNX and Optax."""

__version__ = "0.1.0"
