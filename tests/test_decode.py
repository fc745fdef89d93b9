"""Decode parity: prefill + cached/recurrent decode steps give the logits of the model's full forward.

For each family a ragged batch of prompts is left-padded and prefilled (chunked wkv7 kernel, the
model's own attention), continued by a 2-token ``extend`` chunk and then one-token decode steps
(stepwise recurrence, attention over the KV cache). The reference is the model's own full-sequence
forward of each sequence alone (a right-padded batch: rows never interact and trailing padding cannot
reach earlier tokens), run with the sequential ``wkv7`` reference kernel
(``decode_support.check_decode_parity``). Tolerance: float32, max |Δlogit| <= 1e-4 (logits are O(3);
measured errors are ~2e-6). Fusion modes: ``test_decode_fusion.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_support import CONFIGS, check_decode_parity, make_model

from wuneng_jax.decode import Decoder, left_pad, state_nbytes
from wuneng_jax.decode.steps import init_state, prefill


@pytest.mark.parametrize("family", ["qwen2", "rwkv7", "wuneng"])
def test_prefill_extend_decode_match_full_forward(family):
    check_decode_parity(make_model(family, seed=1))


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
    """State shapes: KV cache [B,S,G,D] per layer (compute dtype; stacked [L,B,S,G,D] in one scanned group),
    RWKV state [B,H,N,N] float32, token shifts."""
    b, s = 3, 10
    qm, rm, wm = (make_model(f) for f in ("qwen2", "rwkv7", "wuneng"))
    q = Decoder(qm).init_state(b, s)
    c = CONFIGS["qwen2"]
    assert q.caches[0][0].k.shape == (c.num_layers, b, s, c.num_kv_heads, c.head_dim)
    q_layers = qm.layers.layer_caches(q.caches)
    assert len(q_layers) == c.num_layers
    assert all(kv.k.shape == kv.v.shape == (b, s, c.num_kv_heads, c.head_dim) for kv in q_layers)
    r = Decoder(rm).init_state(b, s)
    rc = CONFIGS["rwkv7"]
    assert r.valid is None and r.max_len is None
    r_layers = rm.blocks.layer_caches(r.caches)
    assert len(r_layers) == rc.n_layer
    for st in r_layers:
        assert st.att_kv.shape == (b, rc.n_head, rc.head_size, rc.head_size)
        assert st.att_kv.dtype == jnp.float32 and st.att_x.shape == st.ffn_x.shape == (b, rc.n_embd)
    w = Decoder(wm).init_state(b, s)
    wc = CONFIGS["wuneng"]
    w_layers = wm.layers.layer_caches(w.caches)
    assert not hasattr(w_layers[0], "state")  # layer 0 is plain attention: a KV cache only
    st = w_layers[1].state
    assert st.wkv.shape == (b, wc.state_heads, wc.state_head_size, wc.state_head_size)
    assert st.shift.shape == (b, wc.hidden_size) and st.wkv.dtype == jnp.float32
    kv_bytes = 2 * c.num_layers * b * s * c.num_kv_heads * c.head_dim * 4 + b * s  # + valid mask
    assert state_nbytes((q.caches, q.valid)) == kv_bytes
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
    with pytest.raises(ValueError, match="prefill starts new sequences"):
        dec.prefill(tokens, valid, state)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        left_pad([[1], []])
    with pytest.raises(ValueError, match="outside"):
        dec.generate([[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="rows"):
        dec.step([1, 2], dec.init_state(1, 4))


def test_decode_with_a_scanned_pattern_of_layers():
    """Hybrid every 2nd layer of 5: one scanned group of (hybrid, attention) blocks plus a last hybrid layer;
    decode still matches the full forward."""
    model = make_model("wuneng", seed=2, num_layers=5, hybrid_layers={"every": 2})
    assert [tuple(g) for g in model.layers.groups] == [(0, 2, 2), (4, 1, 1)]
    check_decode_parity(model, extend_chunk=0)
