"""WuNeng's ``init`` option: ``upcycle`` (default, the identity recipe, unchanged) and ``scratch`` (fusion
weights and λ drawn with fan-in scaling): the scratch values' statistics, that only the fusion/λ parameters
differ, and that a scratch model's state branch is live at step 0 (its logits differ from the upcycle
model built from the same seed; that the upcycle model equals its attention model is tests/test_wuneng.py's)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wuneng_jax.models.registry import get_family
from wuneng_jax.models.wuneng_config import WUNENG_TINY, WuNengConfig
from wuneng_jax.models.wuneng_params import init_hybrid_params, scratch_overrides

FUSION_PARAMS = {
    "concat": {"o_state"},
    "add": {"beta"},
    "gate": {"gamma", "gate_w", "gate_b"},
    "full": {"beta", "o_state", "gamma", "gate_w", "gate_b", "o_middle_b"},
}


def _params(cfg: WuNengConfig, seed: int = 0) -> dict[str, np.ndarray]:
    d, hd = cfg.hidden_size, cfg.head_dim
    q = jax.random.normal(jax.random.key(seed), (d, cfg.num_heads * hd)) * 0.02
    k = jax.random.normal(jax.random.key(seed + 1), (d, cfg.num_kv_heads * hd)) * 0.02
    init = init_hybrid_params(cfg, 0, q_kernel=q, k_kernel=k, key=jax.random.key(seed + 2))
    return {n: np.asarray(v) for n, (v, _) in init.items()}


def test_default_is_upcycle_and_validation():
    assert (
        WuNengConfig(
            vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64
        ).init
        == "upcycle"
    )
    assert WUNENG_TINY.init == "upcycle"
    with pytest.raises(ValueError, match="WuNengConfig.init"):
        dataclasses.replace(WUNENG_TINY, init="random")


@pytest.mark.parametrize("fusion", ["concat", "add", "gate", "full"])
@pytest.mark.parametrize("state_query", [True, False])
def test_scratch_changes_only_fusion_and_lambda(fusion, state_query):
    up = dataclasses.replace(WUNENG_TINY, fusion=fusion, state_query=state_query)
    a, b = _params(up), _params(dataclasses.replace(up, init="scratch"))
    assert a.keys() == b.keys()
    changed = {n for n in a if not np.array_equal(a[n], b[n])}
    want = FUSION_PARAMS[fusion] | ({"state_q_proj", "state_q_scale"} if state_query else set())
    want -= {"gate_b"}  # zero in both recipes
    if fusion == "full":
        want -= {"beta", "gamma"}  # ones in both
    assert changed == want
    # the upcycle recipe's identity values are untouched by the option's existence
    for name in FUSION_PARAMS[fusion] - {"gate_w", "gate_b", "beta"}:
        if name in ("o_state", "o_middle_b") or (name == "gamma" and fusion == "gate"):
            assert not a[name].any(), name
    if state_query:
        assert not a["state_q_scale"].any()  # λ = 0: the queries are the attention queries
        np.testing.assert_array_equal(b["state_q_scale"], 1.0)


def test_scratch_statistics():
    """Fan-in scaling: each matrix has mean ~0 and std ~1/sqrt(fan_in); gains are one; gate bias zero."""
    cfg = dataclasses.replace(
        WUNENG_TINY,
        hidden_size=128,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        state_head_size=32,
        init="scratch",
    )
    p = {k: np.asarray(v, np.float64) for k, v in scratch_overrides(cfg, jax.random.key(3)).items()}
    hd, c, r = cfg.head_dim, cfg.state_size, cfg.middle_out_rank
    fan_in = {"state_q_proj": hd, "o_state": c, "gate_w": 2 * hd, "o_middle_b": r}
    for name, n_in in fan_in.items():
        x = p[name]
        want = 1 / np.sqrt(n_in)
        # sample std of x.size normals: relative error ~ 1/sqrt(2 x.size)
        assert abs(x.std() / want - 1) < 5 / np.sqrt(2 * x.size), (name, x.std(), want)
        assert abs(x.mean()) < 5 * want / np.sqrt(x.size), name
    for name in ("state_q_scale", "beta", "gamma"):
        np.testing.assert_array_equal(p[name], 1.0)
    np.testing.assert_array_equal(p["gate_b"], 0.0)
    # different draws for different matrices and keys
    other = scratch_overrides(cfg, jax.random.key(4))
    assert not np.allclose(p["o_state"], np.asarray(other["o_state"]))


def test_scratch_model_uses_its_state_branch_at_step_0():
    cfg = dataclasses.replace(WUNENG_TINY, wkv_impl="reference")
    build = get_family("wuneng").model_cls
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    seg = jnp.ones_like(tokens)
    pos = jnp.broadcast_to(jnp.arange(12), tokens.shape)

    def logits(c):
        return np.asarray(build(c, rngs=nnx.Rngs(0))(tokens, segment_ids=seg, positions=pos))

    up, scratch = logits(cfg), logits(dataclasses.replace(cfg, init="scratch"))
    assert np.isfinite(scratch).all()
    # same seed, same trunk weights: only the fusion/λ values differ, and they change the output
    assert np.abs(scratch - up).max() > 1e-2
