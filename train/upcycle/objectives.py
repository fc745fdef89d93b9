"""The ``align`` and ``distill`` objectives (``train.train_step.Objective``), and their loss functions.

``align`` (ARWKV stage 1; ``paper-notes.md`` §5.1 / §6.2): the teacher (a Qwen2) runs the batch and
gives, per layer ``l``, its input hidden state ``h_l`` and its attention-block output ``a_l``. Each
hybrid student layer runs its attention block on the *teacher's* ``h_l`` (teacher forcing: layers align
independently) and its chosen branch ``s_l`` is compared with ``a_l``::

    loss_l = mean over real tokens of ‖a_l − s_l‖₂ · d^{-1/2}        loss = mean over hybrid layers of loss_l

``align_branch: state`` uses ``s_l = W_O[R_{g(1)}..R_{g(H)}]`` (the state-driven heads alone through the
output projection, the ARWKV form); ``hybrid`` uses the fused block output (equal to ``a_l`` at the
upcycled initialisation, so its loss starts at zero). Padding (``segment_ids == 0``) does not count.

``distill`` (ARWKV stage 2)::

    loss = kl_weight · KL(p_T ‖ p_S) + ce_weight · CE,   p = softmax(logits / τ),  KL · τ²  (Hinton)

as a token mean over ``loss_mask``. Vocabularies of different sizes are matched as ARWKV does: teacher
logits beyond the student's vocabulary are cut off; a smaller teacher vocabulary gets zero probability
on the student's extra ids.

Sums, not means, are returned (``Objective``), so gradient accumulation stays exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from train.train_step import Batch, cross_entropy
from wuneng_jax.layers import vocab_tiling
from wuneng_jax.layers.context import LayerContext
from wuneng_jax.layers.stack import stack_flat, unstack_model_flat

#: Stands in for -inf on teacher logits of ids the teacher does not have (exp underflows to exactly 0).
NEG_LOGIT = -1e9


def l2_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """‖x‖₂ over ``axis`` in float32, with a zero (not NaN) gradient at x = 0."""
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def align_token_loss(teacher: jax.Array, student: jax.Array) -> jax.Array:
    """``‖teacher − student‖₂ · d^{-1/2}`` per token: ``[B,T,d]`` x2 -> float32 ``[B,T]``."""
    d = teacher.shape[-1]
    return l2_norm(teacher.astype(jnp.float32) - student.astype(jnp.float32)) * d**-0.5


def match_vocab(teacher_logits: jax.Array, vocab_size: int) -> jax.Array:
    """Teacher logits ``[..., V_T]`` -> ``[..., vocab_size]``: cut when larger, padded with ``NEG_LOGIT``
    (probability 0) when smaller."""
    v = teacher_logits.shape[-1]
    if v >= vocab_size:
        return teacher_logits[..., :vocab_size]
    pad = [(0, 0)] * (teacher_logits.ndim - 1) + [(0, vocab_size - v)]
    return jnp.pad(teacher_logits, pad, constant_values=NEG_LOGIT)


def kl_per_token(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``τ² · Σ_v p_T (log p_T − log p_S)`` with ``p = softmax(logits / τ)``; float32 ``[...]``.

    Both ``[..., V]`` (same V; see :func:`match_vocab`). Ids where ``p_T = 0`` contribute exactly 0."""
    dtype = jnp.promote_types(student_logits.dtype, jnp.float32)  # float64 in x64 runs
    t = teacher_logits.astype(dtype) / temperature
    s = student_logits.astype(dtype) / temperature
    logp_t = jax.nn.log_softmax(t, axis=-1)
    logp_s = jax.nn.log_softmax(s, axis=-1)
    p_t = jnp.exp(logp_t)
    terms = jnp.where(p_t > 0, p_t * (logp_t - logp_s), 0.0)
    return jnp.sum(terms, axis=-1) * temperature**2


def _model_inputs(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    return batch["tokens"], batch["segment_ids"], batch["positions"]


@dataclasses.dataclass(frozen=True)
class AlignObjective:
    """Teacher-forced per-layer alignment (module docstring).

    ``teacher_paths``: with ``teacher: self``, ``(per-layer paths, the teacher's stack groups)``: the
    teacher's parameters are the student's own Qwen2 parameters at these per-layer paths (frozen; ``extra``
    is None), restacked into the teacher's layout; otherwise ``None`` and ``extra`` holds them.
    """

    graphdef: Any
    layer_ids: tuple[int, ...]
    teacher_graphdef: Any
    branch: str = "state"
    teacher_paths: tuple[frozenset, tuple] | None = None

    def count(self, batch: Batch) -> jax.Array:
        return jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))

    def _teacher_params(self, model: nnx.Module, params: Any, extra: Any) -> Any:
        if extra is not None:
            return extra
        paths, groups = self.teacher_paths
        flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(params)}
        per_layer = unstack_model_flat(model, flat)
        return nnx.from_flat_state(stack_flat({p: per_layer[p] for p in paths}, groups))

    def __call__(self, params: Any, rest: Any, batch: Batch, extra: Any):
        tokens, seg, pos = _model_inputs(batch)
        model = nnx.merge(self.graphdef, params, rest)
        teacher_params = jax.lax.stop_gradient(self._teacher_params(model, params, extra))
        t_out = nnx.merge(self.teacher_graphdef, teacher_params).forward_with_intermediates(tokens, seg, pos)
        seg_ids, _, rope = model.prepare(tokens, seg, pos)
        ctx = LayerContext(rope, seg_ids)
        branch = self.branch

        def step(layer: nnx.Module, carry: None, h: jax.Array):  # the teacher's input rides in the cache slot
            out = layer(h, ctx)
            return carry, None, out.state_branch if branch == "state" else out.o

        inputs = [None] * len(model.layers)
        for i in self.layer_ids:
            inputs[i] = jax.lax.stop_gradient(t_out.hidden_states[i])
        _, _, aux = model.layers(
            step, None, model.layers.group_caches(inputs), only=frozenset(self.layer_ids)
        )
        student = model.layers.layer_caches(aux)
        mask = (seg > 0).astype(jnp.float32)
        sums: dict[str, jax.Array] = {}
        for i in self.layer_ids:
            target = jax.lax.stop_gradient(t_out.attn_outputs[i])
            sums[f"align/layer_{i}"] = jnp.sum(align_token_loss(target, student[i]) * mask)
        total = sum(sums.values()) / len(sums)
        return total, {"loss": total, **sums}, rest


@dataclasses.dataclass(frozen=True)
class DistillObjective:
    """Logit distillation from a frozen teacher in the same step (module docstring); ``extra`` holds
    the teacher's parameters. ``vocab_tile``: student and teacher logits over vocabulary tiles
    (``wuneng_jax.layers.vocab_tiling.distill_stats``; 0 = full logits)."""

    graphdef: Any
    teacher_graphdef: Any
    vocab_size: int
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    vocab_tile: int = 0

    def count(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def __call__(self, params: Any, rest: Any, batch: Batch, extra: Any):
        tokens, seg, pos = _model_inputs(batch)
        teacher = nnx.merge(self.teacher_graphdef, jax.lax.stop_gradient(extra))
        model = nnx.merge(self.graphdef, params, rest)
        if vocab_tiling.tiles_for(model, self.vocab_tile) and vocab_tiling.has_head(teacher):
            x, w, tr = vocab_tiling.model_head(model, tokens, seg, pos)
            xt, wt, ttr = vocab_tiling.model_head(teacher, tokens, seg, pos)
            st = vocab_tiling.distill_stats(
                x,
                w,
                xt,
                wt,
                batch["targets"],
                transposed=tr,
                teacher_transposed=ttr,
                temperature=self.temperature,
                tile=self.vocab_tile,
            )
            mask = batch["loss_mask"].astype(jnp.float32)
            kl_sum, ce_sum = jnp.sum(st.kl * mask), jnp.sum((st.lse - st.target) * mask)
            total = self.kl_weight * kl_sum + self.ce_weight * ce_sum
            return total, {"loss": total, "kl": kl_sum, "ce": ce_sum}, nnx.split(model, nnx.Param, ...)[2]
        t_logits = jax.lax.stop_gradient(match_vocab(teacher(tokens, seg, pos), self.vocab_size))
        s_logits = model(tokens, segment_ids=seg, positions=pos)
        new_rest = nnx.split(model, nnx.Param, ...)[2]
        mask = batch["loss_mask"].astype(jnp.float32)
        kl_sum = jnp.sum(kl_per_token(t_logits, s_logits, self.temperature) * mask)
        ce_sum, _ = cross_entropy(s_logits, batch["targets"], mask)
        total = self.kl_weight * kl_sum + self.ce_weight * ce_sum
        return total, {"loss": total, "kl": kl_sum, "ce": ce_sum}, new_rest
