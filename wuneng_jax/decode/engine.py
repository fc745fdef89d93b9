"""Compiled prefill / decode for one model, and text generation on top of them.

``Decoder(model)`` splits the model once (``nnx.split``) and jit-compiles:

* ``init_state(B, S_max)``: a zero :class:`DecodeState` created on the device;
* ``prefill(tokens, valid, state)``: one compile per ``(B, T, S_max)`` (prompt lengths are bucketed by
  :meth:`Decoder.generate`, so a handful of compiles serve any prompts);
* ``step(tokens, state)``: one compile per ``(B, S_max)``, reused for every generated token.

The decode state is donated to each call (updated in place): always continue with the returned state.

``Decoder.generate(prompts, ...)`` runs prefill, then one jitted ``decode step + sample`` per token,
checking stop tokens on the host after every step and streaming tokens to ``on_token``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wuneng_jax.decode import steps as families
from wuneng_jax.decode.sampling import SamplingConfig, sample
from wuneng_jax.decode.state import DecodeState, bucket_length, left_pad

#: ``on_token(tokens [B], emitted [B]) -> rows to stop [B] | None``: called after every generated token;
#: ``emitted[b]`` is True when ``tokens[b]`` was appended to row ``b``'s output.
TokenCallback = Callable[[np.ndarray, np.ndarray], Any]


@dataclasses.dataclass
class Generation:
    """New tokens per prompt (stop token excluded) and why each row ended: ``"stop"`` (a stop token),
    ``"length"`` (``max_new_tokens``) or ``"callback"`` (``on_token`` asked to stop it)."""

    tokens: list[list[int]]
    finish_reasons: list[str]


class Decoder:
    """Jitted prefill / decode steps and generation for ``model`` (any of qwen2, rwkv7, wuneng)."""

    def __init__(self, model: nnx.Module):
        self.family = families.model_family(model)
        self.cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        dn = ("state",)  # the decode state is updated in place: callers must use the returned one
        self._init = jax.jit(self._init_fn, static_argnums=(0, 1))
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("last_only",), donate_argnames=dn)
        self._extend = jax.jit(self._extend_fn, static_argnames=("last_only",), donate_argnames=dn)
        self._step = jax.jit(self._step_fn, donate_argnames=dn)
        self._prefill_sample = jax.jit(
            self._prefill_sample_fn, static_argnames=("sampling", "vocab_limit"), donate_argnames=dn
        )
        self._step_sample = jax.jit(
            self._step_sample_fn, static_argnames=("sampling", "vocab_limit"), donate_argnames=dn
        )

    # -- pure functions (jitted above) -----------------------------------------------------------

    def _model(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params)

    def _init_fn(self, batch_size: int, max_len: int) -> DecodeState:
        return families.init_state(self._model(self.params), batch_size, max_len)

    def _prefill_fn(self, params, tokens, valid, state, *, last_only):
        return families.prefill(self._model(params), tokens, valid, state, last_only=last_only)

    def _extend_fn(self, params, tokens, state, *, last_only):
        return families.extend(self._model(params), tokens, state, last_only=last_only)

    def _step_fn(self, params, tokens, state):
        return families.decode_step(self._model(params), tokens, state)

    def _prefill_sample_fn(self, params, tokens, valid, state, key, *, sampling, vocab_limit):
        logits, state = families.prefill(self._model(params), tokens, valid, state, last_only=True)
        return sample(logits[:, 0], sampling, key, 0, vocab_limit=vocab_limit), state

    def _step_sample_fn(self, params, tokens, state, key, step, *, sampling, vocab_limit):
        logits, state = families.decode_step(self._model(params), tokens, state)
        return sample(logits, sampling, key, step, vocab_limit=vocab_limit), state

    # -- compiled entry points -------------------------------------------------------------------

    def init_state(self, batch_size: int, max_len: int) -> DecodeState:
        """A fresh decode state (zeros) for ``batch_size`` rows and ``max_len`` cache slots."""
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"init_state: batch_size={batch_size} and max_len={max_len} must be >= 1")
        return self._init(int(batch_size), int(max_len))

    def prefill(self, tokens, valid, state: DecodeState, *, last_only: bool = True):
        """``families.prefill`` compiled: left-padded ``tokens``/``valid`` ``[B,T]`` into a fresh state."""
        tokens, valid = jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, jnp.bool_)
        if int(state.index) != 0:
            raise ValueError(
                f"prefill starts new sequences but the state already holds {int(state.index)} tokens; use a "
                "fresh state (init_state) or extend() to continue"
            )
        _check_fits(state, tokens.shape[1])
        return self._prefill(self.params, tokens, valid, state, last_only=last_only)

    def extend(self, tokens, state: DecodeState, *, last_only: bool = False):
        """``families.extend`` compiled: continue every row by ``tokens`` ``[B,T]``."""
        tokens = jnp.asarray(tokens, jnp.int32)
        _check_fits(state, tokens.shape[1])
        return self._extend(self.params, tokens, state, last_only=last_only)

    def step(self, tokens, state: DecodeState, *, check: bool = True):
        """One decode step: ``tokens`` int ``[B]`` -> (logits ``[B,V]``, state).

        ``check`` reads the cache index back to refuse a full cache (a host sync; benchmarks turn it off).
        """
        if check:
            _check_fits(state, 1)
        return self._step(self.params, jnp.asarray(tokens, jnp.int32), state)

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig | None = None,
        stop_tokens: Sequence[int] = (),
        seed: int = 0,
        on_token: TokenCallback | None = None,
        prompt_bucket: int = 64,
        vocab_limit: int | None = None,
        pad_id: int = 0,
    ) -> Generation:
        """Continue each prompt (token id lists, any lengths) by up to ``max_new_tokens`` tokens.

        Prompts are left-padded to a multiple of ``prompt_bucket`` and prefilled together; then one
        compiled step per token. A row ends at its first stop token (not included in the output), when
        ``on_token`` returns True for it, or after ``max_new_tokens``. Deterministic for a given
        ``seed`` and batch (greedy when ``sampling.temperature == 0``).
        """
        sampling = SamplingConfig() if sampling is None else sampling
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
        vocab = int(self.cfg.vocab_size)
        if vocab_limit is not None and not 1 <= vocab_limit <= vocab:
            raise ValueError(f"vocab_limit={vocab_limit} must be in [1, vocab_size={vocab}]")
        for i, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, vocab_size={vocab})")
        t = bucket_length(max(len(p) for p in prompts) if prompts else 0, prompt_bucket)
        tokens, valid = left_pad(prompts, t, pad_id)
        b = tokens.shape[0]
        state = self.init_state(b, t + max_new_tokens - 1)
        key = jax.random.PRNGKey(seed)
        kw = dict(sampling=sampling, vocab_limit=vocab_limit)
        tok, state = self._prefill_sample(
            self.params, jnp.asarray(tokens), jnp.asarray(valid), state, key, **kw
        )
        stops = {int(s) for s in stop_tokens}
        out: list[list[int]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        active = np.ones(b, bool)
        for i in range(max_new_tokens):
            host = np.asarray(jax.device_get(tok))
            emitted = active.copy()
            for r in np.flatnonzero(active):
                if int(host[r]) in stops:
                    active[r], emitted[r], reasons[r] = False, False, "stop"
                else:
                    out[r].append(int(host[r]))
            if on_token is not None:
                stop_rows = on_token(host, emitted)
                if stop_rows is not None:
                    stop_rows = np.asarray(stop_rows, bool) & active
                    for r in np.flatnonzero(stop_rows):
                        reasons[r] = "callback"
                    active &= ~stop_rows
            if not active.any() or i == max_new_tokens - 1:
                break
            tok, state = self._step_sample(self.params, tok, state, key, jnp.int32(i + 1), **kw)
        return Generation(out, reasons)


def _check_fits(state: DecodeState, t: int) -> None:
    s_max = state.max_len
    if s_max is not None and int(state.index) + t > s_max:
        raise ValueError(
            f"the KV cache is full: {int(state.index)} of max_len={s_max} slots used, {t} more requested; "
            "build the decode state with a larger max_len"
        )
