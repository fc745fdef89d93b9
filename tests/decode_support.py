"""Test support for the inference / evaluation tests: tiny configs of the three families, random
non-degenerate parameters (no eager initialisers), and a "successor" Qwen2 whose next-token distribution
is known in closed form.

Successor model: one-hot embeddings, zero attention output and MLP output, so the final hidden state
is the current token's embedding; the head puts logit ``alpha`` on ``succ(t) = (t + 1) % V`` and 0
elsewhere. Hence ``p(succ(t) | ..., t) = e^alpha / (e^alpha + V - 1)`` and every other token has
``1 / (e^alpha + V - 1)``, whatever the context: multiple-choice and generation outcomes are known by
construction.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wuneng_jax.decode import Decoder, left_pad
from wuneng_jax.layers.stack import per_layer_params, set_per_layer_params
from wuneng_jax.models.qwen2 import Qwen2, Qwen2Config
from wuneng_jax.models.rwkv7 import RWKV7, RWKV7Config
from wuneng_jax.models.wuneng import WuNeng
from wuneng_jax.models.wuneng_config import wuneng_config_from_qwen2

QWEN2 = Qwen2Config(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=48,
    rope_theta=10_000.0,
    max_position_embeddings=256,
)
RWKV7_CFG = RWKV7Config(
    vocab_size=64, n_embd=32, n_layer=2, head_size=16, dim_ffn=64, d_decay=8, d_aaa=8, d_mv=8, d_gate=8
)
# Layer 0 plain attention, layer 1 hybrid (both decode paths in one model); the paper's default fusion.
WUNENG = wuneng_config_from_qwen2(
    QWEN2,
    hybrid_layers=[1],
    state_head_size=16,
    decay_lora_rank=8,
    iclr_lora_rank=8,
    gate_lora_rank=8,
    middle_out_rank=8,
)
CONFIGS = {"qwen2": QWEN2, "rwkv7": RWKV7_CFG, "wuneng": WUNENG}
MODELS = {"qwen2": Qwen2, "rwkv7": RWKV7, "wuneng": WuNeng}


def randomize(model: nnx.Module, seed: int) -> nnx.Module:
    """Random float32 parameters: matrices ``N(0, 1/fan_in)``, norm scales ``1 + N(0, 0.2²)``, other
    vectors ``N(0, 0.5²)`` (so every branch, decay and gate is active)."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, cur in per_layer_params(model).items():
        shape = tuple(cur.shape)
        name = str(path[-1])
        if len(shape) >= 2:
            val = rng.standard_normal(shape) / math.sqrt(shape[-2])
        elif "scale" in name or name == "weight":
            val = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            val = 0.5 * rng.standard_normal(shape)
        values[path] = np.asarray(val, np.float32)
    set_per_layer_params(model, values)
    return model


def make_model(family: str, seed: int = 0, **overrides) -> nnx.Module:
    """A tiny model of ``family`` with random parameters (built abstractly: no initialiser runs)."""
    cfg = CONFIGS[family]
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    model = nnx.eval_shape(lambda: MODELS[family](cfg, rngs=nnx.Rngs(0)))
    return randomize(model, seed)


def successor_config(vocab: int, alpha: float) -> Qwen2Config:
    hidden = -(-vocab // 8) * 8  # >= vocab, room for one-hot embeddings
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=16,
        rope_theta=10_000.0,
        max_position_embeddings=512,
    )


def successor_model(vocab: int = 32, alpha: float = 3.0) -> Qwen2:
    """The successor Qwen2 (module docstring)."""
    cfg = successor_config(vocab, alpha)
    model = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    d = cfg.hidden_size
    s = 1.0 / math.sqrt(1.0 / d + cfg.rms_norm_eps)  # RMSNorm of a one-hot row
    head = np.zeros((d, vocab), np.float32)
    head[np.arange(vocab), (np.arange(vocab) + 1) % vocab] = alpha / s
    emb = np.zeros((vocab, d), np.float32)
    emb[np.arange(vocab), np.arange(vocab)] = 1.0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path[-1]
        if path[0] == "embed_tokens":
            val = emb
        elif path[0] == "lm_head":
            val = head
        elif name == "scale":
            val = np.ones(var.shape, np.float32)
        else:  # attention and MLP: zero output projections make both blocks the identity
            val = (
                0.1 * np.ones(var.shape, np.float32)
                if path[-2] not in ("o_proj", "down_proj")
                else np.zeros(var.shape, np.float32)
            )
        var.set_value(jnp.asarray(val))
    return model


def successor_logprobs(vocab: int, alpha: float) -> tuple[float, float]:
    """``(log p(successor), log p(any other token))`` of :func:`successor_model`."""
    z = math.log(math.exp(alpha) + vocab - 1)
    return alpha - z, -z


ALPHA = 3.0
# Three questions whose answers follow from the byte-level successor model (p_hi = e^a / (e^a + V - 1)):
#   q1: after "c" the successor "d" beats "x", "q"                    acc ok, acc_norm ok
#   q2: "pz" = hi + lo < "k" = lo, but per char (hi + lo)/2 > lo       acc wrong, acc_norm ok
#   q3: "wxyz" = 4 hi < "b" = lo, but per char hi > lo                 acc ok, acc_norm wrong
MC_TEXT = [
    {"context": "abc", "choices": ["d", "x", "q"], "gold": 0},
    {"context": "mno", "choices": ["pz", "k"], "gold": 0},
    {"context": "uv", "choices": ["wxyz", "b"], "gold": 1},
]


# --------------------------------------------------------------------------------------------------
# Decode parity (shared by test_decode.py and test_decode_fusion.py)
# --------------------------------------------------------------------------------------------------

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


def check_decode_parity(model, prompt_lens=PROMPT_LENS, n_cont=N_CONT, extend_chunk=2, seed=0) -> float:
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


def write_run(
    model: nnx.Module, run_dir, *, step: int = 7, store: str | None = None, seq_len: int | None = None
):
    """A training run directory (``checkpoints/<step>/{state,data,meta}`` as the trainer writes them)
    holding ``model``'s parameters, with a byte tokenizer and an optional token store in its config."""
    from train.checkpoint import Checkpointer
    from train.config import CheckpointConfig
    from train.state import TrainState
    from wuneng_jax.config import config_to_dict

    params = nnx.state(model, nnx.Param)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    state = TrainState(jnp.int32(step), params, {}, rest, jnp.zeros(2, jnp.uint32))
    ck = Checkpointer(Path(run_dir) / "checkpoints", CheckpointConfig(async_save=False))
    config = {"data": {"tokenizer": "byte", "store": store}, "seq_len": seq_len}
    ck.save(step, state, {"next_index": 0}, {"model_config": config_to_dict(model.cfg), "config": config})
    ck.close()
    return Path(run_dir)
