"""rwkv7 family: exact x070 semantics against an independent float64 numpy RNN loop, packing, causality,
state resume, BlinkDL state-dict round trips, config validation, preset parameter counts, init recipe.

The numpy reference below is written from rwkv7-and-kernels.md §7.2 token by token (RNN form), so it
shares no code or structure with the model (sequence form over the chunked WKV kernel).
"""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wuneng_jax.convert.blinkdl_rwkv7 import (
    export_rwkv7,
    load_rwkv7,
    read_state_dict,
    save_state_dict,
)
from wuneng_jax.models.rwkv7 import RWKV7, RWKV7Config, RWKV7State, rwkv7_preset

# Tiny shapes: C=64, head 16 (H=4), 3 layers, ffn 3.5C, distinct LoRA ranks (so swapped ranks fail).
SPEC = dict(L=3, C=64, N=16, F=224, V=96, Dw=16, Da=8, Dv=12, Dg=24)
T = 20
SPLIT = 7


# ----------------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------------


def random_state_dict(seed: int, L, C, N, F, V, Dw, Da, Dv, Dg) -> dict[str, np.ndarray]:
    """A BlinkDL x070 state dict (§7.2 key list and shapes) with random, non-degenerate float32 values."""
    rng = np.random.default_rng(seed)
    H = C // N
    nrm = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(np.float32)
    uni = lambda *shape: rng.uniform(0, 1, shape).astype(np.float32)
    sd = {
        "emb.weight": nrm(V, C),
        "blocks.0.ln0.weight": 1 + nrm(C, s=0.1),
        "blocks.0.ln0.bias": nrm(C, s=0.1),
    }
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = 1 + nrm(C, s=0.1)
            sd[p + ln + ".bias"] = nrm(C, s=0.1)
        for m in "rwkvag":
            sd[p + f"att.x_{m}"] = uni(1, 1, C)
        sd[p + "att.w0"] = nrm(1, 1, C, s=2.0)
        sd[p + "att.a0"] = nrm(1, 1, C, s=0.5)
        sd[p + "att.v0"] = nrm(1, 1, C, s=0.5) * (100.0 if i == 0 else 1.0)  # layer 0's is unused
        sd[p + "att.k_k"] = 0.7 + nrm(1, 1, C, s=0.1)
        sd[p + "att.k_a"] = 1.0 + nrm(1, 1, C, s=0.1)
        for name, r in (("w", Dw), ("a", Da), ("v", Dv), ("g", Dg)):
            sd[p + f"att.{name}1"] = nrm(C, r, s=1 / math.sqrt(C))
            sd[p + f"att.{name}2"] = nrm(r, C, s=1 / math.sqrt(r))
        sd[p + "att.r_k"] = nrm(H, N, s=0.3)
        for name in ("receptance", "key", "value", "output"):
            sd[p + f"att.{name}.weight"] = nrm(C, C, s=1 / math.sqrt(C))
        sd[p + "att.ln_x.weight"] = 1 + nrm(C, s=0.1)
        sd[p + "att.ln_x.bias"] = nrm(C, s=0.1)
        sd[p + "ffn.x_k"] = uni(1, 1, C)
        sd[p + "ffn.key.weight"] = nrm(F, C, s=1 / math.sqrt(C))
        sd[p + "ffn.value.weight"] = nrm(C, F, s=0.5 / math.sqrt(F))
    sd["ln_out.weight"] = 1 + nrm(C, s=0.1)
    sd["ln_out.bias"] = nrm(C, s=0.1)
    sd["head.weight"] = nrm(V, C, s=2 / math.sqrt(C))
    return sd


def _ln(x, w, b, eps=1e-5):
    mu = x.mean()
    var = ((x - mu) ** 2).mean()
    return (x - mu) / np.sqrt(var + eps) * w + b


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_rnn(sd, tokens, state=None):
    """Float64 x070 forward of one sequence, one token at a time.

    Returns logits ``[T,V]`` and the state as three arrays ``att_x [L,C]``, ``att_kv [L,H,N,N]``,
    ``ffn_x [L,C]``.
    """
    f = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    H, N = f["blocks.0.att.r_k"].shape
    C = H * N
    L = 1 + max(int(k.split(".")[1]) for k in f if k.startswith("blocks."))
    if state is None:
        att_x, att_kv, ffn_x = np.zeros((L, C)), np.zeros((L, H, N, N)), np.zeros((L, C))
    else:
        att_x, att_kv, ffn_x = (np.array(s, np.float64) for s in state)
    out = []
    for tok in tokens:
        x = _ln(f["emb.weight"][tok], f["blocks.0.ln0.weight"], f["blocks.0.ln0.bias"])
        v_first = None
        for i in range(L):
            a = lambda n, i=i: f[f"blocks.{i}.att.{n}"].reshape(f[f"blocks.{i}.att.{n}"].shape[-1])
            m = lambda n, i=i: f[f"blocks.{i}.att.{n}"]
            xa = _ln(x, f[f"blocks.{i}.ln1.weight"], f[f"blocks.{i}.ln1.bias"])
            prev = att_x[i]
            mixed = {c: xa + (prev - xa) * a("x_" + c) for c in "rwkvag"}
            r = m("receptance.weight") @ mixed["r"]
            k = m("key.weight") @ mixed["k"]
            v = m("value.weight") @ mixed["v"]
            w = np.exp(-math.exp(-0.5) * _sig(a("w0") + np.tanh(mixed["w"] @ m("w1")) @ m("w2")))
            iclr = _sig(a("a0") + (mixed["a"] @ m("a1")) @ m("a2"))
            g = _sig(mixed["g"] @ m("g1")) @ m("g2")
            kk = (k * a("k_k")).reshape(H, N)
            kk = kk / np.maximum(np.sqrt((kk**2).sum(-1, keepdims=True)), 1e-12)
            k = k * (1 + (iclr - 1) * a("k_a"))
            if i == 0:
                v_first = v
            else:
                v = v + (v_first - v) * _sig(a("v0") + (mixed["v"] @ m("v1")) @ m("v2"))
            rh, kh, vh, wh, ih = (z.reshape(H, N) for z in (r, k, v, w, iclr))
            y = np.zeros((H, N))
            for h in range(H):
                S = att_kv[i, h]
                aa, bb = -kk[h], kk[h] * ih[h]
                S = S * wh[h][None, :] + np.outer(S @ aa, bb) + np.outer(vh[h], kh[h])
                att_kv[i, h] = S
                o = S @ rh[h]
                o = (o - o.mean()) / np.sqrt(((o - o.mean()) ** 2).mean() + 64e-5)
                y[h] = o * m("ln_x.weight").reshape(H, N)[h] + m("ln_x.bias").reshape(H, N)[h]
                y[h] += np.sum(rh[h] * kh[h] * m("r_k")[h]) * vh[h]
            x = x + m("output.weight") @ (y.reshape(C) * g)
            att_x[i] = xa
            xf = _ln(x, f[f"blocks.{i}.ln2.weight"], f[f"blocks.{i}.ln2.bias"])
            kf = xf + (ffn_x[i] - xf) * f[f"blocks.{i}.ffn.x_k"].reshape(C)
            x = (
                x
                + f[f"blocks.{i}.ffn.value.weight"] @ np.maximum(f[f"blocks.{i}.ffn.key.weight"] @ kf, 0) ** 2
            )
            ffn_x[i] = xf
        out.append(f["head.weight"] @ _ln(x, f["ln_out.weight"], f["ln_out.bias"]))
    return np.stack(out), (att_x, att_kv, ffn_x)


def rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def maxabs(x, ref) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64))))


# ----------------------------------------------------------------------------------------------------
# Fixtures: one state dict, its reference outputs, one jitted forward
# ----------------------------------------------------------------------------------------------------


@nnx.jit
def _forward(model, tokens, segment_ids, state):
    return model(tokens, segment_ids, state=state, return_state=True)


def forward(model, tokens, segment_ids=None, state=None):
    """Jitted ``model(tokens, segment_ids, state=state, return_state=True)``; ``state`` defaults to zeros
    (always passed so that each input shape compiles once)."""
    tokens = jnp.asarray(tokens)
    if state is None:
        state = model.init_state(tokens.shape[0])
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    return _forward(model, tokens, seg, RWKV7State(*(jnp.asarray(x) for x in state)))


def batch_state(states) -> RWKV7State:
    """Per-sequence numpy states (att_x [L,C], att_kv [L,H,N,N], ffn_x [L,C]) -> batched RWKV7State."""
    return RWKV7State(*(np.stack([s[j] for s in states], axis=1) for j in range(3)))


@pytest.fixture(scope="module")
def sd():
    return random_state_dict(7, **SPEC)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(3).integers(0, SPEC["V"], (2, T)).astype(np.int32)


@pytest.fixture(scope="module")
def reference(sd, tokens):
    """Per row: full logits and final state, and the state after the first SPLIT tokens."""
    full = [numpy_rnn(sd, row) for row in tokens]
    mid = [numpy_rnn(sd, row[:SPLIT])[1] for row in tokens]
    return {
        "logits": np.stack([lg for lg, _ in full]),
        "state": batch_state([st for _, st in full]),
        "mid": batch_state(mid),
    }


@pytest.fixture(scope="module")
def model32(sd):
    """float32 model on the sequential WKV reference (cheap to compile); the chunked kernel (the CPU
    default) is exercised by test_chunked_default_packed_matches_numpy_reference."""
    _, model = load_rwkv7(sd, config_overrides=dict(wkv_impl="reference"))
    return model


# ----------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------


def test_float64_matches_numpy_reference(sd, tokens, reference):
    """x64: logits, final state and the resume from a mid-sequence state match the float64 loop to 1e-11 (measured ~2e-15)
    (a LayerNorm eps of 1e-6 instead of 1e-5 would move the logits ~1e-5, see §7.5)."""
    with jax.enable_x64(True):
        _, model = load_rwkv7(
            sd, config_overrides=dict(dtype="float64", param_dtype="float64", wkv_impl="reference")
        )
        assert model.head[...].dtype == jnp.float64
        logits, state = forward(model, tokens)
        assert logits.dtype == jnp.float64
        errs = {"logits": rel(logits, reference["logits"])}
        for name, got, want in zip(RWKV7State._fields, state, reference["state"], strict=True):
            assert got.dtype == jnp.float64
            errs[name] = rel(got, want)
        # resume from the reference's mid state (first half is the same shape: one compile)
        _, mid = forward(model, tokens[:, :SPLIT])
        for name, got, want in zip(RWKV7State._fields, mid, reference["mid"], strict=True):
            errs["mid_" + name] = rel(got, want)
        resumed, end = forward(model, tokens[:, SPLIT:], state=reference["mid"])
        errs["resumed"] = rel(resumed, reference["logits"][:, SPLIT:])
        errs["resumed_att_kv"] = rel(end.att_kv, reference["state"].att_kv)
    print("float64 vs numpy float64 (max|d|/max|ref|):", errs)
    assert max(errs.values()) < 1e-11, errs


def test_float32_matches_numpy_reference(model32, tokens, reference):
    logits, state = forward(model32, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (2, T, SPEC["V"])
    assert np.abs(reference["logits"]).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(logits, reference["logits"], atol=2e-5, rtol=0)
    assert state.att_kv.dtype == jnp.float32
    for got, want in zip(state, reference["state"], strict=True):
        assert rel(got, want) < 1e-5
    _, mid = forward(model32, tokens[:, :SPLIT])
    for got, want in zip(mid, reference["mid"], strict=True):
        assert rel(got, want) < 1e-5
    resumed, end = forward(model32, tokens[:, SPLIT:], state=mid)
    np.testing.assert_allclose(resumed, reference["logits"][:, SPLIT:], atol=2e-5, rtol=0)
    assert rel(end.att_kv, reference["state"].att_kv) < 1e-5


SEGMENTS = np.array([[1] * 6 + [2] * 9 + [3] * 3 + [0] * 2, [1] * 1 + [2] * 12 + [3] * 7], np.int32)


def test_chunked_default_packed_matches_numpy_reference(sd, tokens):
    """The default WKV implementation on packed rows == the float64 loop run on each document alone:
    the WKV state AND the token shift restart at document starts (padding = segment 0 is a document too)."""
    cfg, model = load_rwkv7(sd)
    assert cfg.wkv_impl == "auto"
    logits, _ = forward(model, tokens, SEGMENTS)
    worst = 0.0
    for b in range(2):
        for doc in np.unique(SEGMENTS[b]):
            idx = np.nonzero(SEGMENTS[b] == doc)[0]
            want, _ = numpy_rnn(sd, tokens[b, idx])
            worst = max(worst, maxabs(np.asarray(logits)[b, idx], want))
    print("chunked float32 packed vs numpy float64 per document, max|d|:", worst)
    assert worst < 2e-5


def test_bfloat16_compute_is_close(sd, tokens, reference):
    _, model = load_rwkv7(sd, config_overrides=dict(dtype="bfloat16", wkv_impl="reference"))
    logits, state = forward(model, tokens)
    assert logits.dtype == jnp.float32 and state.att_kv.dtype == jnp.float32
    assert rel(logits, reference["logits"]) < 0.05


# ----------------------------------------------------------------------------------------------------
# Causality, packing, state interface
# ----------------------------------------------------------------------------------------------------


def test_causality(model32, tokens):
    other = tokens.copy()
    other[:, 11:] = (other[:, 11:] + 5) % SPEC["V"]
    a, _ = forward(model32, tokens)
    b, _ = forward(model32, other)
    np.testing.assert_allclose(a[:, :11], b[:, :11], atol=1e-6, rtol=0)
    assert maxabs(a[:, 11:], b[:, 11:]) > 1e-2


def test_packed_documents_equal_documents_alone(model32, tokens):
    """Each document of a packed row, run alone (left-aligned in a row; what follows it cannot matter by
    causality), gives the packed row's logits."""
    packed, _ = forward(model32, tokens, SEGMENTS)
    docs = [(b, np.nonzero(SEGMENTS[b] == d)[0]) for b in range(2) for d in np.unique(SEGMENTS[b])]
    for j in range(0, len(docs), 2):
        rows = np.zeros((2, T), np.int32)
        for r, (b, idx) in enumerate(docs[j : j + 2]):
            rows[r, : len(idx)] = tokens[b, idx]
        alone, _ = forward(model32, rows)
        for r, (b, idx) in enumerate(docs[j : j + 2]):
            np.testing.assert_allclose(packed[b, idx], alone[r, : len(idx)], atol=1e-5, rtol=0)
    # without segment ids the later documents see the earlier ones
    plain, _ = forward(model32, tokens)
    assert maxabs(plain[0, 6:15], packed[0, 6:15]) > 1e-2


def test_init_state(model32):
    zero = model32.init_state(3)
    assert zero.att_kv.shape == (SPEC["L"], 3, 4, 16, 16) and zero.att_kv.dtype == jnp.float32
    assert zero.att_x.shape == zero.ffn_x.shape == (SPEC["L"], 3, SPEC["C"])
    assert not any(np.any(np.asarray(x)) for x in zero)


def test_input_errors(model32):
    with pytest.raises(ValueError, match="vocab_size"):
        model32(jnp.array([[0, SPEC["V"]]], jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must be int \[B,T\]"):
        model32(jnp.array([1, 2], jnp.int32))
    with pytest.raises(ValueError, match="segment_ids has shape"):
        model32(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="init_state"):
        model32(jnp.ones((1, 4), jnp.int32), state=model32.init_state(2))


def test_sharded_forward_matches(sd, tokens, model32):
    """Built under an 8-device mesh with the default rules: params carry the logical names' shardings and
    the jitted forward equals the single-device one."""
    from wuneng_jax.sharding import DEFAULT_RULES

    mesh = jax.make_mesh(
        (1, 2, 4, 1), ("data", "fsdp", "tensor", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 4
    )
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        _, model = load_rwkv7(sd, config_overrides=dict(wkv_impl="reference"))
        assert tuple(model.blocks.view(1).att.receptance[...].sharding.spec) == ("fsdp", "tensor")
        assert tuple(model.blocks.view(1).ffn.value[...].sharding.spec) == ("tensor", "fsdp")
        logits, _ = forward(model, tokens)
    want, _ = forward(model32, tokens)
    np.testing.assert_allclose(logits, want, atol=2e-5, rtol=0)


def test_every_param_has_logical_names(model32):
    for path, var in nnx.to_flat_state(nnx.state(model32, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, (path, names)


# ----------------------------------------------------------------------------------------------------
# BlinkDL state dicts
# ----------------------------------------------------------------------------------------------------


def test_config_inferred_from_shapes(model32):
    cfg = model32.cfg
    assert (cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.n_head, cfg.dim_ffn, cfg.vocab_size) == (
        3,
        64,
        16,
        4,
        224,
        96,
    )
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (16, 8, 12, 24)


def test_export_load_round_trip_exact(sd, model32, tmp_path):
    out = export_rwkv7(model32)
    assert set(out) == set(sd)
    for key, value in sd.items():
        assert out[key].shape == value.shape, key
        if key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):  # unused; written as zeros
            assert not np.any(out[key])
        else:
            assert out[key].dtype == np.float32 and np.array_equal(out[key], value), key
    for suffix in (".safetensors", ".npz"):
        path = tmp_path / f"ckpt{suffix}"
        save_state_dict(out, path)
        back = read_state_dict(path)
        assert set(back) == set(out)
        assert all(np.array_equal(back[k], out[k]) for k in out)
        _, again = load_rwkv7(path)
        again_sd = export_rwkv7(again)
        assert all(np.array_equal(again_sd[k], out[k]) for k in out)


def test_load_errors(sd, tmp_path, monkeypatch):
    missing = {k: v for k, v in sd.items() if k != "blocks.1.att.g2"}
    with pytest.raises(ValueError, match=r"missing keys \(1\).*blocks\.1\.att\.g2"):
        load_rwkv7(missing)
    extra = {**sd, "blocks.1.att.g0": sd["blocks.1.att.a0"]}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*blocks\.1\.att\.g0"):
        load_rwkv7(extra)
    bad = {**sd, "blocks.2.att.key.weight": sd["blocks.2.att.key.weight"][:, :-1]}
    with pytest.raises(ValueError, match=r"shape mismatches.*blocks\.2\.att\.key\.weight"):
        load_rwkv7(bad)
    bad_rk = {**sd, "blocks.0.att.r_k": np.zeros((3, 16), np.float32)}
    with pytest.raises(ValueError, match="r_k"):
        load_rwkv7(bad_rk)
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "x.bin2").write_bytes(b"")
        load_rwkv7(tmp_path / "x.bin2")
    # .pth without torch: a clear pointer to `pip install torch`
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    (tmp_path / "m.pth").write_bytes(b"not really")
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match="pip install torch"):
        load_rwkv7(tmp_path / "m.pth")


# ----------------------------------------------------------------------------------------------------
# Config, presets, init
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_embd=100, head_size=64), "head_size=64 does not divide n_embd=100"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-3), "vocab_size must be a positive integer"),
        (dict(d_gate=0), "d_gate must be a positive integer"),
        (dict(dim_ffn=2.5), "dim_ffn must be a positive integer"),
        (dict(dtype="fp8"), "dtype='fp8' is not supported"),
        (dict(param_dtype="int8"), "param_dtype='int8' is not supported"),
        (dict(wkv_impl="cuda"), "wkv_impl='cuda' is unknown"),
        (dict(wkv_chunk_size=0), "wkv_chunk_size must be a positive integer"),
    ],
)
def test_config_validation(kwargs, match):
    base = dict(vocab_size=64, n_embd=128, n_layer=2)
    with pytest.raises(ValueError, match=match):
        RWKV7Config(**{**base, **kwargs})


def test_config_defaults():
    cfg = RWKV7Config(vocab_size=65536, n_embd=768, n_layer=12)
    assert (cfg.head_size, cfg.n_head, cfg.dim_ffn) == (64, 12, 3072)
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (64, 64, 32, 128)  # the 0.1B model (§1.5)
    big = rwkv7_preset("rwkv7-1.5b")
    assert (big.d_decay, big.d_aaa, big.d_mv, big.d_gate) == (96, 96, 64, 256)
    with pytest.raises(ValueError, match="unknown rwkv7 preset"):
        rwkv7_preset("rwkv7-3b")


def expected_param_count(cfg: RWKV7Config) -> int:
    """From the §7.2 shapes (layer 0 has no v0/v1/v2 in the model)."""
    V, C, F, L = cfg.vocab_size, cfg.n_embd, cfg.dim_ffn, cfg.n_layer
    per_layer = (
        4 * C  # ln1, ln2
        + 10 * C  # x_r..x_g, w0, a0, k_k, k_a
        + 2 * C * (cfg.d_decay + cfg.d_aaa + cfg.d_gate)
        + C  # r_k (H*N)
        + 4 * C * C
        + 2 * C  # ln_x
        + C
        + 2 * C * F  # ffn
    )
    value_residual = (L - 1) * (C + 2 * C * cfg.d_mv)
    return 2 * V * C + 2 * C + 2 * C + L * per_layer + value_residual


@pytest.mark.parametrize(
    "path, name",
    [
        ("rwkv7_tiny", "rwkv7_tiny"),
        ("rwkv7_0.1b", "rwkv7-0.1b"),
        ("rwkv7_0.4b", "rwkv7-0.4b"),
        ("rwkv7_1.5b", "rwkv7-1.5b"),
    ],
)
def test_yaml_configs_and_registry(path, name):
    from wuneng_jax.config import count_params, load_model_config, preset

    root = Path(__file__).resolve().parents[1]
    cfg = load_model_config(root / "configs" / "models" / f"{path}.yaml")
    assert cfg == preset(name) == rwkv7_preset(name)
    assert count_params(cfg) == expected_param_count(cfg)


def test_build_model_dispatch():
    from wuneng_jax.config import config_from_dict
    from wuneng_jax.models import build_model

    cfg = config_from_dict({"family": "rwkv7", "preset": "rwkv7_tiny", "n_layer": 1})
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(model, RWKV7) and len(model.blocks) == 1
    with pytest.raises(ValueError, match="head_size=16 does not divide n_embd=72"):
        config_from_dict({"family": "rwkv7", "preset": "rwkv7_tiny", "n_embd": 72})


def test_preset_0p1b_count_is_plausible():
    # 2*65536*768 embeddings + 12 layers of 4C^2 + 8C^2 matrices and small LoRAs: ~191M
    assert 190e6 < expected_param_count(rwkv7_preset("rwkv7-0.1b")) < 192e6


def test_fresh_init_recipe():
    """A fresh model follows BlinkDL's recipe (§1.5): the zero inits, the vector formulas, orthogonality."""
    cfg = rwkv7_preset("rwkv7_tiny", n_layer=3)
    model = nnx.jit(lambda: RWKV7(cfg, rngs=nnx.Rngs(1)))()  # one compile instead of many eager ops
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    n = np.arange(C)
    for i, blk in enumerate(model.blocks.views()):
        att = blk.att
        r1, r0 = 1 - i / L, i / (L - 1)
        np.testing.assert_allclose(att.x_r[...], 1 - (n / C) ** (0.2 * r1), atol=1e-6)
        np.testing.assert_allclose(att.x_w[...], 1 - (n / C) ** (0.9 * r1), atol=1e-6)
        z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zz = z * np.abs(z)
        www = -6 + 6 * (n / (C - 1)) ** (1 + r0**0.3)
        np.testing.assert_allclose(att.w0[...], www + 0.5 + 2.5 * zz, atol=1e-5)
        np.testing.assert_allclose(att.a0[...], -0.19 + 0.3 * zz + 0.4 * (n / (C - 1) - 0.5), atol=1e-6)
        np.testing.assert_allclose(att.ln_x.scale[...], ((i + 1) / L) ** 0.7, atol=1e-6)
        np.testing.assert_allclose(blk.ffn.x_k[...], 1 - (n / C) ** (r1**4), atol=1e-6)
        for name in ("w1", "a1", "g1", "output"):
            assert not np.any(getattr(att, name)[...]), name
        assert not np.any(blk.ffn.value[...])
        w2 = np.asarray(att.w2[...])  # orthogonal rows * 0.1
        np.testing.assert_allclose(w2 @ w2.T, 0.01 * np.eye(w2.shape[0]), atol=1e-5)
        rw = np.asarray(att.receptance[...])
        np.testing.assert_allclose(rw.T @ rw, np.eye(C), atol=1e-5)
        assert (i == 0) != hasattr(att, "v0")
    np.testing.assert_allclose(model.blocks.view(1).att.r_k[...], -0.04)
    np.testing.assert_allclose(model.blocks.view(1).att.k_a[...], 1.02)
    assert np.abs(np.asarray(model.emb[...])).max() <= 1e-4
    head = np.asarray(model.head[...])  # [C,V]: orthogonal columns' rows, gain 0.5*sqrt(V/C)
    np.testing.assert_allclose(head @ head.T, 0.25 * (cfg.vocab_size / C) * np.eye(C), atol=1e-4)
