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


FAMILIES = ("qwen2_tiny", "rwkv7_tiny", "wuneng_tiny")


def _model_loss(name: str):
    from flax import nnx

    from wuneng_jax.config import preset
    from wuneng_jax.models import build_model

    cfg = preset(name)
    graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
        return jnp.mean(nll), logits

    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    return loss, params, tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_models_with_the_sequence_split_match_the_unsplit_run(name):
    """The model under a mesh with sequence = 4 (the logical rules put LENGTH on "sequence"): attention and the
    recurrence run as context parallelism (shard_maps over the sequence blocks) and give the unsplit logits
    and gradients."""
    loss, params, tokens = _model_loss(name)
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (ref_loss, ref_logits), ref_grads = grad(params, tokens)
    with mesh_context(_mesh(), DEFAULT_RULES):
        assert "sequence" in str(jax.make_jaxpr(loss)(params, tokens)).split("shard_map")[1][:2000]
        (got_loss, got_logits), got_grads = grad(params, tokens)
        if (
            name == "rwkv7_tiny"
        ):  # the recurrence gathers no activation: only [P,B,H,N,N] summaries, token flags
            hlo = grad.lower(params, tokens).compile().as_text()
            gathered = set(re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo))
            assert gathered, "expected the block summaries' all-gathers"
            for dtype, dims in gathered:
                shape = tuple(int(x) for x in dims.split(","))
                assert (dtype == "f32" and len(shape) == 5 and shape[0] == 4 and shape[-1] == shape[-2]) or (
                    dtype in ("pred", "s32") and len(shape) == 2
                ), (dtype, shape)
    assert rel_err(got_logits, ref_logits) <= 1e-5, rel_err(got_logits, ref_logits)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    worst = max(
        rel_err(g, r) for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True)
    )
    assert worst <= 1e-4, worst
