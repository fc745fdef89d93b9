"""Context parallelism (``mesh.sequence > 1``) in the models: blocked attention across sequence blocks
(``wuneng_jax.layers.context_attention``) and the RWKV-7 recurrence joined across blocks
(``pallas_kernels.wkv7_sequence``) give the unsplit results, for all three families; 8 CPU devices."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from wkv7_cases import rel_err

from train.config import MeshConfig
from train.mesh import make_mesh, mesh_context
from wuneng_jax.layers.attention import attention_mask, dot_product_attention, reference_attention
from wuneng_jax.sharding import DEFAULT_RULES


def _mesh():
    return make_mesh(MeshConfig(data=2, sequence=4), jax.devices()[:8])


def test_attention_with_the_sequence_split_matches_the_reference():
    """GQA, causal, documents crossing block boundaries: values and the q/k/v gradients vs the reference, and
    the blocked path is the one taken (a shard_map over the sequence)."""
    rng = np.random.default_rng(0)
    b, t, h, g, d = 2, 64, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, g, d)), jnp.float32) for _ in range(2))
    seg = np.ones((b, t), np.int32)
    seg[0, 20:], seg[1, 33:] = 2, 3  # 20: inside a block of 16; 33: just after a block boundary
    seg = jnp.asarray(seg)

    def ref(q, k, v):
        return reference_attention(q, k, v, attention_mask(seg, seg, t, t, True), d**-0.5)

    def split(q, k, v):
        return dot_product_attention(q, k, v, segment_ids_q=seg, segment_ids_kv=seg, impl="xla")

    loss = lambda fn: lambda *xs: jnp.sum(fn(*xs) ** 2)
    with mesh_context(_mesh(), DEFAULT_RULES):
        assert "shard_map" in str(jax.make_jaxpr(split)(q, k, v))
        out = jax.jit(split)(q, k, v)
        grads = jax.jit(jax.grad(loss(split), argnums=(0, 1, 2)))(q, k, v)
    assert rel_err(out, ref(q, k, v)) <= 1e-5
    for got, want in zip(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v), strict=True):
        assert rel_err(got, want) <= 1e-5
    assert "shard_map" not in str(jax.make_jaxpr(split)(q, k, v))  # no mesh: the plain path


def test_splash_with_the_sequence_split_matches_the_reference():
    """Splash (Pallas interpret mode) under sequence = 4: each device runs its query block against the
    all-gathered keys/values with the kernel's mask tables cut per block; values and gradients vs the
    reference, documents crossing block boundaries."""
    rng = np.random.default_rng(1)
    b, t, h, g, d = 2, 512, 4, 2, 32
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, g, d)), jnp.float32) for _ in range(2))
    seg = np.ones((b, t), np.int32)
    seg[0, 200:], seg[1, 256:] = 2, 3  # 200: inside the second block of 128; 256: on a block boundary
    seg = jnp.asarray(seg)

    def ref(q, k, v):
        return reference_attention(q, k, v, attention_mask(seg, seg, t, t, True), d**-0.5)

    def split(q, k, v):
        return dot_product_attention(
            q, k, v, segment_ids_q=seg, segment_ids_kv=seg, impl="splash", splash_interpret=True
        )

    loss = lambda fn: lambda *xs: jnp.sum(fn(*xs) ** 2)
    with mesh_context(_mesh(), DEFAULT_RULES):
        jaxpr = str(jax.make_jaxpr(split)(q, k, v))
        out = jax.jit(split)(q, k, v)
        grads = jax.jit(jax.grad(loss(split), argnums=(0, 1, 2)))(q, k, v)
    # q sharded over the sequence, k/v whole on every device (gathered): [B,T/4,H/..,D] vs [B,T,G,D] blocks
    assert "f32[1,128,4,32]" in jaxpr and "f32[1,512,2,32]" in jaxpr, jaxpr[:3000]
    assert rel_err(out, ref(q, k, v)) <= 1e-5
    for got, want in zip(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v), strict=True):
        assert rel_err(got, want) <= 1e-5


FAMILIES = ("qwen2_tiny", "rwkv7_tiny", "wuneng_tiny")
SEQ_MESHES = {2: MeshConfig(data=4, sequence=2), 4: MeshConfig(data=2, sequence=4), 8: MeshConfig(sequence=8)}
T = 32


def _packed_batch(vocab: int, b: int = 2):
    """Tokens, segment ids and in-document positions ``[B, 32]``: row 0 packs documents of 11, 14 and 7
    tokens (boundaries inside blocks for every split, documents spanning block boundaries), row 1 two of 16
    (the boundary on a block boundary for every split)."""
    from wuneng_jax.layers.packing import positions_from_segments

    tokens = jax.random.randint(jax.random.key(1), (b, T), 0, vocab)
    seg = np.ones((b, T), np.int32)
    seg[0, 11:25], seg[0, 25:] = 2, 3
    seg[1, 16:] = 2
    seg = jnp.asarray(seg)
    return tokens, seg, positions_from_segments(seg)


def _model_loss(name: str, **overrides):
    import dataclasses

    from flax import nnx

    from wuneng_jax.config import preset
    from wuneng_jax.models import build_model

    cfg = dataclasses.replace(preset(name), **overrides)
    graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))

    def loss(params, batch):
        tokens, seg, pos = batch
        logits = nnx.merge(graphdef, params)(tokens, seg, pos)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
        return jnp.mean(nll), logits

    return loss, params, _packed_batch(cfg.vocab_size)


def _worst(a, b) -> float:
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_models_with_the_sequence_split_match_the_unsplit_run(name):
    """The model under meshes with sequence = 2, 4, 8 (the logical rules put LENGTH on "sequence"), packed
    documents crossing block boundaries: attention and the recurrence run as context parallelism (shard_maps
    over the sequence blocks) and give the unsplit logits and gradients (float32, <= 1e-5 relative)."""
    loss, params, batch = _model_loss(name)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (ref_loss, ref_logits), ref_grads = grad(params, batch)
    for n_seq, mesh_cfg in SEQ_MESHES.items():
        with mesh_context(make_mesh(mesh_cfg, jax.devices()[:8]), DEFAULT_RULES):
            assert "sequence" in str(jax.make_jaxpr(loss)(params, batch)).split("shard_map")[1][:2000]
            (got_loss, got_logits), got_grads = grad(params, batch)
            if name == "rwkv7_tiny" and n_seq == 4:  # the recurrence gathers no activation
                hlo = grad.lower(params, batch).compile().as_text()
                gathered = set(re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo))
                # FSDP over fsdp x sequence gathers parameters (any shape of a parameter or a layer's slice)
                param_shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
                param_shapes |= {s[1:] for s in param_shapes}
                assert gathered, "expected the block summaries' all-gathers"
                for dtype, dims in gathered:  # only [P,B,H,N,N] summaries, per-token flags and parameters
                    shape = tuple(int(x) for x in dims.split(","))
                    assert (
                        (dtype == "f32" and len(shape) == 5 and shape[0] == 4 and shape[-1] == shape[-2])
                        or (dtype in ("pred", "s32") and len(shape) == 2)
                        or (dtype == "f32" and shape in param_shapes)
                    ), (dtype, shape)
        assert rel_err(got_logits, ref_logits) <= 1e-5, (n_seq, rel_err(got_logits, ref_logits))
        assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert _worst(got_grads, ref_grads) <= 1e-5, (n_seq, _worst(got_grads, ref_grads))


@pytest.mark.parametrize(
    "overrides",
    [
        {"fusion": "concat"},
        {"fusion": "add"},
        {"fusion": "gate"},
        {"fusion": "full", "state_query": False},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_fusion_mode_with_the_sequence_split(overrides):
    """WuNeng's other fusion modes and λ = 0 (the full fusion with the state→query injection is the family
    test above): logits under sequence = 4 equal the unsplit ones."""
    loss, params, batch = _model_loss("wuneng_tiny", **overrides)
    fwd = jax.jit(lambda p, b: loss(p, b)[1])
    ref = fwd(params, batch)
    with mesh_context(make_mesh(SEQ_MESHES[4], jax.devices()[:8]), DEFAULT_RULES):
        got = fwd(params, batch)
    assert rel_err(got, ref) <= 1e-5, rel_err(got, ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_with_the_sequence_split_matches_the_unsplit_prefill(name):
    """Prefill (left-padded prompts into a fresh decode state) under sequence = 4: the logits and every
    cache (KV slots, recurrent and token-shift states) equal the unsplit prefill's."""
    from flax import nnx

    from wuneng_jax.config import preset
    from wuneng_jax.decode.steps import init_state, prefill
    from wuneng_jax.models import build_model

    cfg = preset(name)
    graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(2), (2, T), 0, cfg.vocab_size)
    valid = jnp.asarray(np.arange(T)[None] >= np.array([[0], [13]]))  # row 1: 13 pads (a block and a bit)

    @jax.jit
    def run(params, tokens, valid):
        model = nnx.merge(graphdef, params)
        return prefill(model, tokens, valid, init_state(model, 2, T + 8))

    ref_logits, ref_state = run(params, tokens, valid)
    with mesh_context(make_mesh(SEQ_MESHES[4], jax.devices()[:8]), DEFAULT_RULES):
        assert "sequence" in str(jax.make_jaxpr(run)(params, tokens, valid)).split("shard_map")[1][:2000]
        logits, state = run(params, tokens, valid)
    assert rel_err(logits, ref_logits) <= 1e-5, rel_err(logits, ref_logits)
    assert _worst(state, ref_state) <= 1e-5, _worst(state, ref_state)
