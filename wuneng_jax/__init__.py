"""wuneng-jax: the WuNeng hybrid (attention + RWKV-7 state heads) model library in Flax NNX."""

__version__ = "0.1.0"
