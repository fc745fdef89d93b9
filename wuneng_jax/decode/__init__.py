"""Inference: decode state (KV cache + RWKV-7 state), prefill, one-token decode steps, sampling.

::

    from wuneng_jax.decode import Decoder, SamplingConfig

    dec = Decoder(model)                                   # qwen2, rwkv7 or wuneng
    out = dec.generate([[1, 2, 3], [4, 5]], max_new_tokens=32,
                       sampling=SamplingConfig(temperature=0.8, top_p=0.95), stop_tokens=[eos], seed=0)
    out.tokens                                             # new token ids per prompt

Lower level (pure functions, usable under any ``jax.jit``): :func:`init_state`, :func:`prefill`,
:func:`extend`, :func:`decode_step` on a :class:`DecodeState`.
"""

from wuneng_jax.decode.engine import Decoder, Generation
from wuneng_jax.decode.sampling import SamplingConfig, filter_logits, sample
from wuneng_jax.decode.state import DecodeState, bucket_length, left_pad, state_nbytes
from wuneng_jax.decode.steps import FAMILIES, decode_step, extend, init_state, model_family, prefill

__all__ = [
    "FAMILIES",
    "DecodeState",
    "Decoder",
    "Generation",
    "SamplingConfig",
    "bucket_length",
    "decode_step",
    "extend",
    "filter_logits",
    "init_state",
    "left_pad",
    "model_family",
    "prefill",
    "sample",
    "state_nbytes",
]
