"""Parameters a WuNeng hybrid layer adds to a Qwen2 attention layer: names, logical axes, initial values.

:func:`hybrid_param_names` lists them for a config's settings (the attributes of
:class:`wuneng_jax.models.wuneng_layer.WuNengAttention`, the keys of ``hybrid_attention``'s mapping, the
tensor names of the WuNeng checkpoint format). :func:`init_hybrid_params` gives their initial values:
``init: upcycle`` (default) is the upcycling recipe of ``ARCHITECTURE.md`` §2, every new parameter where the
hybrid layer equals its plain attention layer; ``init: scratch`` (:func:`scratch_overrides`) draws the fusion
weights and λ with fan-in scaling instead, so a model trained from scratch uses its state heads from step 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wuneng_jax.layers import rwkv7_ops as ops
from wuneng_jax.models.wuneng_config import WuNengConfig
from wuneng_jax.sharding import EMBED, HEAD_DIM, HEADS, LORA, NORM, STATE_HEADS

Names = tuple[str | None, ...]


def hybrid_param_names(cfg: WuNengConfig) -> tuple[str, ...]:
    """Names of the parameters a hybrid layer adds to a Qwen2 attention layer (attributes of
    ``WuNengAttention``, keys of ``hybrid_attention``'s mapping in :mod:`wuneng_jax.models.wuneng_layer`),
    for ``cfg``'s settings."""
    names = ["mu_r", "mu_kappa", "mu_w", "mu_a", "mu_g", "r_proj", "kappa_proj"]
    names += ["w0", "w1", "w2", "a0", "a1", "a2", "k_a", "g1", "g2", "r_k", "ln_x_scale", "ln_x_bias"]
    if cfg.state_query:
        names += ["state_q_proj", "state_q_scale"]
    if cfg.state_value == "attention_output":
        names += ["state_v_proj"]
    if cfg.fusion == "concat":
        names += ["o_state"]
    elif cfg.fusion == "add":
        names += ["beta"]
    elif cfg.fusion == "gate":
        names += ["gamma", "gate_w", "gate_b"]
    else:  # full
        names += ["beta", "o_state", "gamma", "gate_w", "gate_b"]
        names += ["o_middle"] if cfg.middle_out_rank is None else ["o_middle_a", "o_middle_b"]
    return tuple(names)


def init_hybrid_params(
    cfg: WuNengConfig, layer_id: int, *, q_kernel: jax.Array, k_kernel: jax.Array, key: jax.Array
) -> dict[str, tuple[jax.Array, Names]]:
    """Initial values (``param_dtype``) and logical axis names of one hybrid layer's new parameters.

    The upcycling recipe of ``ARCHITECTURE.md`` §2: ``W_R̂`` = group-mean of the query projection
    ``q_kernel`` ``[d, H·D]``; ``W_κ`` = the key projection ``k_kernel`` ``[d, G·D]``; lerps ``μ``, decay
    bias ``w0``, ``a0``, ``k_a``, ``r_k``, ``ln_x`` and the LoRAs (first factor zero, second orthogonal·0.1)
    from RWKV-7's init recipe (:mod:`wuneng_jax.layers.rwkv7_ops`); every fusion/λ parameter at the value
    that makes the layer equal to the plain attention layer.
    """
    d, hh, g, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    s, n, c = cfg.state_heads, cfg.state_head_size, cfg.state_size
    pdt = jnp.dtype(cfg.param_dtype)
    vec = lambda x: jnp.asarray(x, pdt)
    k_lora, k_ortho = jax.random.split(key)
    lora_keys = iter(jax.random.split(k_lora, 3))
    mix = ops.time_mix_init_vectors(d, 1, layer_id, cfg.num_layers)  # the [d] lerps (no heads involved)
    rec = ops.time_mix_init_vectors(c, n, layer_id, cfg.num_layers)  # the [S·N] state-stream vectors

    def lora2(rank: int) -> jax.Array:
        return ops.orthogonal(next(lora_keys), (rank, c), 0.1 * ops.torch_ortho_gain(rank, c), pdt)

    p: dict[str, tuple[jax.Array, Names]] = {
        # RWKV-7 recipe: r uses x_r, the removal key x_k, decay x_w, ICLR x_a, gate x_g.
        "mu_r": (vec(mix["x_r"]), (NORM,)),
        "mu_kappa": (vec(mix["x_k"]), (NORM,)),
        "mu_w": (vec(mix["x_w"]), (NORM,)),
        "mu_a": (vec(mix["x_a"]), (NORM,)),
        "mu_g": (vec(mix["x_g"]), (NORM,)),
        "r_proj": (
            q_kernel.reshape(d, g, hh // g, hd).mean(axis=2).reshape(d, c).astype(pdt),
            (EMBED, STATE_HEADS),
        ),
        "kappa_proj": (k_kernel.astype(pdt), (EMBED, STATE_HEADS)),
        "w0": (vec(rec["w0"]), (NORM,)),
        "w1": (jnp.zeros((d, cfg.decay_lora_rank), pdt), (EMBED, LORA)),
        "w2": (lora2(cfg.decay_lora_rank), (LORA, STATE_HEADS)),
        "a0": (vec(rec["a0"]), (NORM,)),
        "a1": (jnp.zeros((d, cfg.iclr_lora_rank), pdt), (EMBED, LORA)),
        "a2": (lora2(cfg.iclr_lora_rank), (LORA, STATE_HEADS)),
        "k_a": (vec(rec["k_a"]), (NORM,)),
        "g1": (jnp.zeros((d, cfg.gate_lora_rank), pdt), (EMBED, LORA)),
        "g2": (lora2(cfg.gate_lora_rank), (LORA, STATE_HEADS)),
        "r_k": (vec(rec["r_k"]), (NORM, None)),
        "ln_x_scale": (vec(rec["ln_x_scale"]), (NORM,)),
        "ln_x_bias": (vec(rec["ln_x_bias"]), (NORM,)),
    }
    head_vec = lambda value: (jnp.full((hh, hd), value, pdt), (HEADS, HEAD_DIM))
    if cfg.state_query:
        # W^state_h starts as the identity (adds the group's read-out itself); λ = 0 switches it off.
        p["state_q_proj"] = (jnp.broadcast_to(jnp.eye(hd, dtype=pdt), (hh, hd, hd)), (HEADS, HEAD_DIM, None))
        p["state_q_scale"] = head_vec(0.0)
    if cfg.state_value == "attention_output":
        # W_Vs starts as the group mean of the attention heads: v^s_g = mean_{h in g} A_h.
        blocks = np.kron(np.eye(g), np.tile(np.eye(hd), (hh // g, 1)) / (hh // g))  # [H·D, G·D]
        p["state_v_proj"] = (jnp.asarray(blocks, pdt), (HEADS, STATE_HEADS))
    gate_w = (jnp.zeros((hh, 2 * hd, hd), pdt), (HEADS, HEAD_DIM, None))
    if cfg.fusion == "concat":
        p["o_state"] = (jnp.zeros((c, d), pdt), (STATE_HEADS, EMBED))
    elif cfg.fusion == "add":
        p["beta"] = head_vec(0.0)
    elif cfg.fusion == "gate":
        p.update(gamma=head_vec(0.0), gate_w=gate_w, gate_b=head_vec(0.0))
    else:  # full: W_Os, W_Om zero; β, γ at one so the state and middle heads are live once W_Os/W_Om move
        p["beta"] = (jnp.ones((s, n), pdt), (STATE_HEADS, HEAD_DIM))
        p["o_state"] = (jnp.zeros((c, d), pdt), (STATE_HEADS, EMBED))
        p.update(gamma=head_vec(1.0), gate_w=gate_w, gate_b=head_vec(0.0))
        if cfg.middle_out_rank is None:
            p["o_middle"] = (jnp.zeros((hh * hd, d), pdt), (HEADS, EMBED))
        else:
            r = cfg.middle_out_rank
            p["o_middle_a"] = (ops.orthogonal(k_ortho, (hh * hd, r), 1.0, pdt), (HEADS, LORA))
            p["o_middle_b"] = (jnp.zeros((r, d), pdt), (LORA, EMBED))
    if cfg.init == "scratch":
        p.update({n: (v, p[n][1]) for n, v in scratch_overrides(cfg, key).items()})
    assert tuple(p) == hybrid_param_names(cfg), (tuple(p), hybrid_param_names(cfg))
    return p


def scratch_overrides(cfg: WuNengConfig, key: jax.Array) -> dict[str, jax.Array]:
    """The ``init: scratch`` values of the fusion and λ parameters (everything else as for upcycling).

    Every matrix that carries the state branch into the layer output or the queries is drawn from
    ``N(0, 1/fan_in)`` (LeCun normal: ``fan_in`` = the matrix's input width), every per-channel gain is one:

    * ``state_q_proj`` ``W^state_h`` ``[H,D,D]``: ``N(0, 1/D)``; ``state_q_scale`` λ: ones;
    * ``o_state`` ``W_Os`` ``[S·N, d]``: ``N(0, 1/(S·N))``; ``o_middle`` ``[H·D, d]``: ``N(0, 1/(H·D))``;
      ``o_middle_b`` ``[r, d]``: ``N(0, 1/r)`` (``o_middle_a`` stays orthogonal);
    * ``gate_w`` ``W^g_h`` ``[H, 2D, D]``: ``N(0, 1/(2D))``, ``gate_b`` zero, so each middle head starts
      near the even mix ``(A_h + Norm(R))/2``; ``beta`` β and ``gamma`` γ: ones.

    The RWKV-7 parts (LoRAs with a zero first factor, decay and ICLR biases) keep RWKV-7's own
    from-scratch recipe. Random draws use ``fold_in(key, i)``, so the upcycle recipe's draws are unchanged.
    """
    d, hh, hd, c = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.state_size
    pdt = jnp.dtype(cfg.param_dtype)
    keys = iter(jax.random.fold_in(key, 1000 + i) for i in range(8))

    def lecun(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        return (jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)).astype(pdt)

    ones = lambda *shape: jnp.ones(shape, pdt)  # noqa: E731
    out: dict[str, jax.Array] = {}
    if cfg.state_query:
        out["state_q_proj"] = lecun((hh, hd, hd), hd)
        out["state_q_scale"] = ones(hh, hd)
    if cfg.fusion in ("concat", "full"):
        out["o_state"] = lecun((c, d), c)
    if cfg.fusion in ("add", "full"):
        out["beta"] = ones(hh, hd) if cfg.fusion == "add" else ones(cfg.state_heads, cfg.state_head_size)
    if cfg.fusion in ("gate", "full"):
        out["gamma"] = ones(hh, hd)
        out["gate_w"] = lecun((hh, 2 * hd, hd), 2 * hd)
        out["gate_b"] = jnp.zeros((hh, hd), pdt)
    if cfg.fusion == "full":
        if cfg.middle_out_rank is None:
            out["o_middle"] = lecun((hh * hd, d), hh * hd)
        else:
            out["o_middle_b"] = lecun((cfg.middle_out_rank, d), cfg.middle_out_rank)
    return out
