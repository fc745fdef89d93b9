"""Decode parity: prefill + cached/recurrent decode steps give the logits of the model's full forward.

For each family (and each WuNeng fusion mode), a ragged batch of prompts is left-padded and prefilled
(chunked wkv7 kernel, the model's own attention), continued by a 2-token ``extend`` chunk and then
one-token decode steps (stepwise recurrence, attention over the KV cache). The reference is the
model's own full-sequence forward of each sequence alone (a right-padded batch: rows never interact and
trailing padding cannot reach earlier tokens), run with the sequential ``wkv7`` reference kernel. Tolerance: float32, max |Δlogit| <= 1e-4 (logits are
O(5); measured errors are ~3e-6).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_support import CONFIGS, make_model
from flax import nnx

from wuneng_jax.decode import Decoder, left_pad, state_nbytes
from wuneng_jax.decode.families import init_state, prefill

ATOL = 1e-4
PROMPT_LENS = (7, 3)
N_CONT = 4


def _reference_twin(model):
    """The same model and parameters with the sequential ``wkv7`` reference (``lax.scan``), an independent
    kernel that also compiles fast; attention families are returned as they are."""
    cfg = model.cfg
    if not hasattr(cfg, "wkv_impl"):
        return model
    twin = nnx.eval_shape(
        lambda: type(model)(dataclasses.replace(cfg, wkv_impl="reference"), rngs=nnx.Rngs(0))
    )
    nnx.update(twin, nnx.state(model))
    return twin


def _full_forward(model, seqs: list[np.ndarray]) -> np.ndarray:
    """The model's own forward of each sequence alone (right-padded batch with segment ids)."""
    model = _reference_twin(model)
    t = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), t), np.int32)
    seg = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], seg[i, : len(s)] = s, 1
    return np.asarray(jax.jit(lambda m, x, s: m(x, segment_ids=s))(model, tokens, seg))


def _check_decode_parity(model, prompt_lens=PROMPT_LENS, n_cont=N_CONT, extend_chunk=2, seed=0) -> float:
    """Prefill (left-padded to 8) + extend(``extend_chunk``) + single steps vs the full forward; returns the
    max abs logit error (and asserts it is within ``ATOL``)."""
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, n).astype(np.int32) for n in prompt_lens]
    cont = rng.integers(0, vocab, (len(prompts), n_cont)).astype(np.int32)
    ref = _full_forward(model, [np.concatenate([p, c]) for p, c in zip(prompts, cont, strict=True)])

    dec = Decoder(model)
    t = 8
    tokens, valid = left_pad([list(p) for p in prompts], t)
    state = dec.init_state(len(prompts), t + n_cont)
    logits, state = dec.prefill(tokens, valid, state, last_only=False)
    logits = np.asarray(logits)
    errs = [np.abs(logits[b, t - n :] - ref[b, :n]).max() for b, n in enumerate(prompt_lens)]
    done = 0
    if extend_chunk:
        chunk, state = dec.extend(cont[:, :extend_chunk], state)
        chunk = np.asarray(chunk)
        errs += [np.abs(chunk[b] - ref[b, n : n + extend_chunk]).max() for b, n in enumerate(prompt_lens)]
        done = extend_chunk
    for i in range(done, n_cont):
        step, state = dec.step(cont[:, i], state)
        step = np.asarray(step)
        errs += [np.abs(step[b] - ref[b, n + i]).max() for b, n in enumerate(prompt_lens)]
    assert int(state.index) == t + n_cont
    np.testing.assert_array_equal(np.asarray(state.positions), np.asarray(prompt_lens) + n_cont)
    err = float(max(errs))
    print(f"{model.cfg.family}: max |logit error| {err:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert err <= ATOL, f"decode logits differ from the full forward by {err}"
    return err


@pytest.mark.parametrize("family", ["qwen2", "rwkv7", "wuneng"])
def test_prefill_extend_decode_match_full_forward(family):
    _check_decode_parity(make_model(family, seed=1))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(fusion="concat"),
        dict(fusion="add"),
        dict(fusion="gate"),
        dict(fusion="full", state_value="attention_output", state_query=False),
    ],
    ids=["concat", "add", "gate", "full-attention_output"],
)
def test_wuneng_fusion_modes_decode(overrides):
    """Every fusion mode (``full`` with the attention-value state is the family test above). One hybrid
    layer; the recurrence runs the sequential kernel here (the chunked prefill is covered above)."""
    model = make_model("wuneng", seed=2, num_layers=1, hybrid_layers="all", wkv_impl="reference", **overrides)
    _check_decode_parity(model, prompt_lens=(5,), n_cont=2, extend_chunk=0, seed=1)


def test_pad_tokens_do_not_reach_results():
    """Changing the pad token ids leaves every real position's logits unchanged (up to float32 rounding:
    the chunked kernel's cumulative decays run over the whole chunk, pads included)."""
    model = make_model("wuneng", seed=3)
    prompts = [[5, 9, 1], [7, 7, 7, 7, 2, 3]]
    outs = []
    for pad_id in (0, 63):
        tokens, valid = left_pad(prompts, 8, pad_id=pad_id)
        state = init_state(model, 2, 8)
        logits, _ = jax.jit(prefill)(model, jnp.asarray(tokens), jnp.asarray(valid), state)
        outs.append(np.asarray(logits))
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(outs[0][b, -len(p) :], outs[1][b, -len(p) :], rtol=0, atol=1e-5)


def test_decode_state_layout_and_memory():
    """State shapes: KV cache [L,B,S,G,D] (compute dtype), RWKV state [B,H,N,N] float32, token shifts."""
    b, s = 3, 10
    q = Decoder(make_model("qwen2")).init_state(b, s)
    c = CONFIGS["qwen2"]
    assert q.kv.k.shape == (c.num_layers, b, s, c.num_kv_heads, c.head_dim) and q.recurrent is None
    r = Decoder(make_model("rwkv7")).init_state(b, s)
    rc = CONFIGS["rwkv7"]
    assert r.kv is None
    assert r.recurrent.att_kv.shape == (rc.n_layer, b, rc.n_head, rc.head_size, rc.head_size)
    assert r.recurrent.att_kv.dtype == jnp.float32 and r.recurrent.att_x.shape == (rc.n_layer, b, rc.n_embd)
    w = Decoder(make_model("wuneng")).init_state(b, s)
    wc = CONFIGS["wuneng"]
    assert w.recurrent[0] is None  # layer 0 is plain attention
    assert w.recurrent[1].wkv.shape == (b, wc.state_heads, wc.state_head_size, wc.state_head_size)
    assert w.recurrent[1].shift.shape == (b, wc.hidden_size) and w.recurrent[1].wkv.dtype == jnp.float32
    kv_bytes = 2 * c.num_layers * b * s * c.num_kv_heads * c.head_dim * 4 + b * s  # + valid mask
    assert state_nbytes(q.kv) == kv_bytes
    extra = b * (wc.hidden_size + wc.state_heads * wc.state_head_size**2) * 4  # one hybrid layer
    assert state_nbytes(w) == state_nbytes(q) + extra


def test_decode_errors():
    model = make_model("qwen2")
    dec = Decoder(model)
    state = dec.init_state(1, 4)
    tokens, valid = left_pad([[1, 2, 3]], 3)
    _, state = dec.prefill(tokens, valid, state)
    _, state = dec.step([4], state)
    with pytest.raises(ValueError, match="KV cache is full"):
        dec.step([5], state)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        left_pad([[1], []])
    with pytest.raises(ValueError, match="outside"):
        dec.generate([[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="rows"):
        dec.step([1, 2], dec.init_state(1, 4))
