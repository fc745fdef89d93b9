"""Decode state: the pytrees carried from one decode step to the next, and the batch layout.

Every family shares one outer structure, :class:`DecodeState`::

    caches      the layers' caches in the model's stacked layout (``model.init_cache``): per attention
                layer a KVLayer (k, v ``[B,S_max,G,D]``, keys after RoPE), per RWKV-7 block a LayerState,
                per WuNeng hybrid layer a HybridCache (KV and recurrent state);
                ``model.layers.layer_caches(caches)`` lists them per layer
    valid       bool [B,S_max]   slots holding a real (non-pad) token; None for RWKV-7 (no KV cache)
    index       int32 []         cache slots written so far (the same for every row)
    positions   int32 [B]        position of each row's next token (= its number of real tokens so far)

Layout of a batch of prompts of different lengths: **left padding**. A prompt of ``n`` tokens fills the
last ``n`` of ``T`` prefill slots; ``valid`` ``[B,T]`` is False on the pads. So after prefill every row's
last real token sits in the same column (its logits are ``logits[:, -1]``) and decode writes every row's
next token into the same cache slot ``index``. Pads never reach a result:

* attention: a pad slot is marked invalid in ``DecodeState.valid`` and masked out of every later query;
* RWKV-7 state and token shift: the state restarts (zero) at each row's first real token, exactly as for
  a packed document start, so whatever the pads did to the state before is discarded;
* positions (RoPE) count real tokens only: a row's first real token has position 0.

Shapes are static (``S_max`` slots, fixed batch), so one decode step compiles once per
``(batch, S_max)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class DecodeState(NamedTuple):
    """What one decode step reads and writes (see the module docstring)."""

    caches: Any
    valid: jax.Array | None
    index: jax.Array
    positions: jax.Array

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    @property
    def max_len(self) -> int | None:
        """``S_max`` (None for families without a KV cache)."""
        return None if self.valid is None else int(self.valid.shape[1])


def state_nbytes(state: Any) -> int:
    """Bytes held by a state pytree (every array leaf)."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def left_pad(
    prompts: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``[B, length]`` -> ``(tokens int32, valid bool)``.

    ``length`` defaults to the longest prompt. Raises ValueError for an empty prompt (nothing to
    condition on: start it with a BOS/EOS token) or a prompt longer than ``length``.
    """
    if len(prompts) == 0:
        raise ValueError("left_pad: no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        i = lengths.index(0)
        raise ValueError(
            f"prompt {i} is empty: decoding needs at least one token to condition on; start the prompt "
            "with a BOS/EOS token"
        )
    length = max(lengths) if length is None else int(length)
    if max(lengths) > length:
        raise ValueError(f"a prompt has {max(lengths)} tokens, more than the padded length {length}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        n = len(p)
        tokens[i, length - n :] = np.asarray(p, np.int64)
        valid[i, length - n :] = True
    return tokens, valid


def bucket_length(n: int, bucket: int) -> int:
    """``n`` rounded up to a multiple of ``bucket`` (``bucket <= 1``: ``n``): fewer prefill compiles."""
    if bucket <= 1:
        return int(n)
    return int(-(-n // bucket) * bucket)
