"""Model FLOPs per token (dense, causal attention, RWKV-7 state terms), device peaks, MFU arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
from flax import nnx

from train.metrics import (
    FlopsDims,
    Throughput,
    device_peak_flops,
    flops_dims,
    flops_per_token,
    format_line,
    truncate_jsonl,
)
from train.state import count_params
from wuneng_jax.config import load_model_config
from wuneng_jax.models import build_model


def _n_params(model) -> int:
    return count_params(nnx.state(model, nnx.Param))


def test_qwen2_flops_by_hand():
    cfg = load_model_config("qwen2_tiny")  # V=512, d=64, L=2, H=4, G=2, D=16, F=160, untied
    n = _n_params(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))))
    V, d, L, H, G, D, F = 512, 64, 2, 4, 2, 16, 160
    per_layer = d * H * D + H * D + 2 * (d * G * D + G * D) + H * D * d + 3 * d * F + 2 * d
    assert n == V * d + L * per_layer + d + d * V
    T = 128
    f = flops_per_token(flops_dims(cfg, n), T)
    assert f["dense"] == 6 * (n - V * d)  # the embedding lookup is free; the untied head is a matmul
    assert f["attention"] == 6 * L * H * D * T  # causal: half of PaLM's 12·L·H·D·T
    assert f["state"] == 0
    assert f["total"] == f["dense"] + f["attention"]
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    n_tied = _n_params(nnx.eval_shape(lambda: build_model(tied, rngs=nnx.Rngs(0))))
    assert n_tied == n - d * V
    assert flops_per_token(flops_dims(tied, n_tied), T)["dense"] == 6 * n_tied  # table used twice


def test_rwkv7_state_term():
    from wuneng_jax.models.rwkv7 import RWKV7Config

    cfg = RWKV7Config(
        vocab_size=256, n_embd=64, n_layer=2, head_size=16, d_decay=16, d_aaa=16, d_mv=8, d_gate=16
    )  # C=64, L=2, N=16 -> 4 heads
    dims = flops_dims(cfg, n_params=1000 + 256 * 64)
    assert (dims.state_layers, dims.state_heads, dims.state_dim, dims.attn_layers) == (2, 4, 16, 0)
    f = flops_per_token(dims, seq_len=4096)
    assert f["state"] == 24 * 2 * 4 * 16 * 16  # 8·N² forward per head and layer, ×3
    assert f["attention"] == 0 and f["dense"] == 6 * 1000


def test_flops_dims_hook():
    @dataclasses.dataclass
    class Custom:
        def flops_dims(self):
            return {
                "n_embedding_lookup": 10,
                "tied_head": False,
                "state_layers": 1,
                "state_heads": 2,
                "state_dim": 4,
            }

    f = flops_per_token(flops_dims(Custom(), 110), 8)
    assert f == {"dense": 600.0, "attention": 0.0, "state": 24.0 * 2 * 16, "total": 600.0 + 768.0}


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v4", 275e12),
        ("cpu", None),
        ("TFRT_CPU_0", None),
        ("Some Future Chip", None),
    ],
)
def test_device_peak_table(kind, peak):
    assert device_peak_flops(kind) == peak


def test_throughput_and_mfu_arithmetic(monkeypatch):
    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr("train.metrics._clock", lambda: next(clock))
    t = Throughput(flops_per_token=1e9, tokens_per_step=1000, n_devices=4, peak_flops=989e12)
    t.start()
    for _ in range(5):
        t.tick()
    r = t.read()
    assert r["step_time_s"] == 2.0 and r["tokens_per_s"] == 500.0
    assert r["tflops_per_device"] == pytest.approx(1e9 * 500 / 4 / 1e12)
    assert r["mfu"] == pytest.approx(1e9 * 500 / 4 / 989e12)
    assert "MFU" in format_line(10, 20, {**r, "loss": 1.0})
    assert FlopsDims(10, 4, True).n_matmul == 10


def test_truncate_jsonl_drops_steps_after_the_checkpoint(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(
        '{"step": 1, "kind": "train"}\n{"step": 2, "kind": "eval"}\n{"step": 3, "kind": "train"}\n{"ste'
    )
    truncate_jsonl(p, 2)
    assert p.read_text() == '{"step": 1, "kind": "train"}\n{"step": 2, "kind": "eval"}\n'
