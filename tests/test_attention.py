"""wuneng_jax.layers.attention.dot_product_attention against a naive float64 numpy softmax attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from wuneng_jax.layers import attention
from wuneng_jax.layers.attention import resolve_impl
from wuneng_jax.sharding import DEFAULT_RULES

# jit once per static configuration (eager op-by-op dispatch is slow on a busy CPU)
dot_product_attention = jax.jit(
    attention.dot_product_attention, static_argnames=("causal", "scale", "impl", "splash_interpret")
)


def naive_attention(q, k, v, seg_q, seg_kv, causal: bool) -> np.ndarray:
    """Float64 loops over batch, head and query: softmax over the allowed keys only."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    s, g = k.shape[1], k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)  # repeat-interleave mapping
            for i in range(t):
                allowed = np.ones(s, bool)
                if seg_q is not None:
                    allowed &= np.asarray(seg_kv)[bi] == np.asarray(seg_q)[bi, i]
                if causal:
                    allowed &= np.arange(s) <= i + (s - t)
                if not allowed.any():
                    continue
                sc = k[bi, allowed, gi] @ q[bi, i, hi] / np.sqrt(d)
                p = np.exp(sc - sc.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, allowed, gi]
    return out


def _inputs(seed, b, t, s, h, g, d, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)) * 1.5
    k = rng.normal(size=(b, s, g, d)) * 1.5
    v = rng.normal(size=(b, s, g, d))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


# row 0: three documents; row 1: two documents then padding (segment 0)
SEG = np.array([[1] * 7 + [2] * 5 + [3] * 4, [1] * 9 + [2] * 4 + [0] * 3], np.int32)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("g", [1, 2, 6])
def test_matches_naive_float32(impl, g):
    q, k, v = _inputs(0, 2, 16, 16, 6, g, 8)
    seg = jnp.asarray(SEG)
    out = dot_product_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), segment_ids_q=seg, segment_ids_kv=seg, impl=impl
    )
    ref = naive_attention(q, k, v, SEG, SEG, causal=True)
    assert out.dtype == jnp.float32
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=0)


def test_reference_float64_is_exact():
    with jax.enable_x64(True):
        q, k, v = _inputs(1, 2, 16, 16, 4, 2, 8, np.float64)
        seg = jnp.asarray(SEG)
        out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), segment_ids_q=seg)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(
            np.asarray(out), naive_attention(q, k, v, SEG, SEG, True), atol=1e-13, rtol=0
        )


def test_no_segments_is_plain_causal_and_gqa_mapping():
    q, k, v = _inputs(2, 1, 10, 10, 4, 2, 8)
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla")
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, None, None, True), atol=2e-6, rtol=0)
    # a tiled (not repeat-interleaved) mapping must give a different answer: the test can fail
    tiled = naive_attention(q, np.concatenate([k[:, :, 1:], k[:, :, :1]], 2), v, None, None, True)
    assert np.abs(np.asarray(out) - tiled).max() > 1e-2


def test_non_causal_and_cross_attention_bottom_right():
    q, k, v = _inputs(3, 2, 5, 12, 4, 2, 8)
    for causal in (False, True):
        for impl in ("reference", "xla"):
            out = dot_product_attention(
                jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal, impl=impl
            )
            np.testing.assert_allclose(
                np.asarray(out), naive_attention(q, k, v, None, None, causal), atol=2e-6, rtol=0
            )


def test_fully_masked_rows_are_finite():
    # non-causal with query ids absent from the keys: every score masked; must not give NaN
    q, k, v = _inputs(4, 1, 4, 6, 2, 1, 8)
    seg_q = jnp.asarray([[5, 5, 1, 0]], jnp.int32)
    seg_kv = jnp.asarray([[1, 1, 1, 2, 2, 2]], jnp.int32)
    for impl in ("reference", "xla"):
        out = np.asarray(
            dot_product_attention(
                jnp.asarray(q),
                jnp.asarray(k),
                jnp.asarray(v),
                segment_ids_q=seg_q,
                segment_ids_kv=seg_kv,
                causal=False,
                impl=impl,
            )
        )
        assert np.isfinite(out).all()
        ref = naive_attention(q, k, v, np.asarray(seg_q), np.asarray(seg_kv), False)
        np.testing.assert_allclose(out[0, 2], ref[0, 2], atol=2e-6)  # the row that has keys is right


def test_bfloat16_close_to_float64():
    q, k, v = _inputs(5, 2, 16, 16, 4, 2, 16)
    seg = jnp.asarray(SEG)
    out = dot_product_attention(
        jnp.asarray(q, jnp.bfloat16),
        jnp.asarray(k, jnp.bfloat16),
        jnp.asarray(v, jnp.bfloat16),
        segment_ids_q=seg,
    )
    assert out.dtype == jnp.bfloat16
    ref = naive_attention(q, k, v, SEG, SEG, True)
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05


def test_splash_interpret_matches_naive():
    b, t, h, g, d = 1, 128, 4, 2, 16
    q, k, v = _inputs(6, b, t, t, h, g, d)
    seg = np.repeat([[1, 2, 0]], [60, 50, 18], axis=1).astype(np.int32)
    out = dot_product_attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        segment_ids_q=jnp.asarray(seg),
        impl="splash",
        splash_interpret=True,
    )
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, seg, seg, True), atol=3e-6, rtol=0)


def test_splash_key_blocks_grow_at_long_context(monkeypatch):
    """The block tables splash prefetches into TPU scalar memory stay small at long context: key blocks grow
    (1M tokens over 4 devices: 1024-query x 2048-key blocks, 131 072 entries instead of 1 048 576); short
    contexts keep 512 x 512. Values with grown blocks (a tiny table limit forces them at T = 2048)."""
    assert attention.splash_blocks(32768) == (512, 512, 512)
    q_block, kv_block, _ = attention.splash_blocks(1 << 20, 4)
    assert (q_block, kv_block) == (1024, 2048) and (1 << 18) // q_block * (1 << 20) // kv_block <= 1 << 17
    monkeypatch.setattr(attention, "_SPLASH_TABLE_ENTRIES", 1)
    assert attention.splash_blocks(2048) == (1024, 2048, 512)
    b, t, h, g, d = 1, 2048, 2, 1, 16
    q, k, v = _inputs(7, b, t, t, h, g, d)
    seg = np.repeat([[1, 2]], [1300, 748], axis=1).astype(np.int32)
    out = attention.dot_product_attention(
        *(jnp.asarray(x) for x in (q, k, v)),
        segment_ids_q=jnp.asarray(seg),
        impl="splash",
        splash_interpret=True,
    )
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, seg, seg, True), atol=3e-6, rtol=0)


def test_cached_causal_mask_gives_splash_the_same_tables():
    """The library's causal mask with cached chunks builds the same splash block tables (forward, dK/dV and
    dQ; sequence split or not) as jax's own CausalMask, and every chunk it returns equals the mask's."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi

    for t, shards in ((2048, 4), (1024, 1)):
        q_block, kv_block, block = attention.splash_blocks(t, shards)
        sizes = sa.BlockSizes(
            block_q=q_block, block_kv=kv_block, block_kv_compute=block, block_q_dkv=q_block,
            block_kv_dkv=kv_block, block_kv_dkv_compute=block, block_q_dq=q_block, block_kv_dq=kv_block,
        )  # fmt: skip
        built = []
        for mask in (sa.CausalMask((t, t)), attention._causal_mask_type()((t, t))):
            mi._process_mask.cache_clear()
            kernel = sa.make_splash_mha(
                mask=sa.MultiHeadMask([mask] * 2), block_sizes=sizes, head_shards=1, q_seq_shards=shards
            )
            built.append([np.asarray(x) for x in jax.tree.leaves(kernel.tree_flatten()[0])])
        mi._process_mask.cache_clear()
        assert len(built[0]) == len(built[1]) and all(
            np.array_equal(a, b) for a, b in zip(*built, strict=True)
        )
    mask = attention._causal_mask_type()((1024, 1024))
    for idx in (
        (slice(0, 128), slice(0, 256)),
        (slice(512, 640), slice(256, 384)),
        (slice(3, 900), slice(5, 6)),
    ):
        np.testing.assert_array_equal(
            mask[idx], np.arange(1024)[idx[0], None] >= np.arange(1024)[None, idx[1]]
        )


def test_splash_under_mesh_uses_shard_map():
    b, t, h, g, d = 2, 128, 4, 2, 16
    q, k, v = _inputs(7, b, t, t, h, g, d)
    seg = np.repeat([[1, 2]], [70, 58], axis=1).repeat(2, 0).astype(np.int32)
    mesh = jax.make_mesh(
        (2, 1, 2, 1), ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4
    )
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        out = dot_product_attention(
            jnp.asarray(q),
            jnp.asarray(k),
            jnp.asarray(v),
            segment_ids_q=jnp.asarray(seg),
            impl="splash",
            splash_interpret=True,
        )
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, seg, seg, True), atol=3e-6, rtol=0)


def test_auto_impl_choice():
    q = jnp.zeros((1, 128, 4, 16), jnp.float32)
    assert resolve_impl("auto", q, q, True) == "xla"  # CPU
    with jax.enable_x64(True):
        q64 = jnp.zeros((1, 4, 4, 16), jnp.float64)
        assert resolve_impl("auto", q64, q64, True) == "reference"


def test_bad_inputs_raise():
    q, k, v = (jnp.asarray(x) for x in _inputs(8, 1, 4, 4, 3, 2, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        dot_product_attention(q, k, v)
    q, k, v = (jnp.asarray(x) for x in _inputs(8, 1, 4, 4, 4, 2, 8))
    with pytest.raises(ValueError, match="impl"):
        dot_product_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="segment ids"):
        dot_product_attention(q, k, v, segment_ids_q=jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="dtypes differ"):
        dot_product_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="multiple of 128"):
        dot_product_attention(q, k, v, impl="splash")
