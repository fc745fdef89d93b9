"""The jitted train and eval steps: pure functions of ``(TrainState, batch)``.

Batch (global arrays, sharded ``(activation_batch, activation_length)`` by the rules table)::

    tokens      int32   [B, T]   token ids fed to the model
    targets     int32   [B, T]   next-token ids
    segment_ids int32   [B, T]   document id within the packed row (>= 1), 0 = padding
    positions   int32   [B, T]   position within the document
    loss_mask   float32 [B, T]   1 where the target counts, 0 elsewhere

Loss: token-mean cross-entropy over ``loss_mask`` of the whole global batch, plus
``z_loss * mean(logsumexp(logits)^2)`` (PaLM's z-loss) when ``z_loss > 0``. With ``vocab_tile > 0`` (the
config's ``loss_vocab_tile``) the loss is computed from the model's final hidden state and head weight
over vocabulary tiles (``wuneng_jax.layers.vocab_tiling``): same values and gradients, no ``[B,T,V]``
float32 logits in the step; ``0`` computes the full logits. With gradient
accumulation the batch is split into ``A`` micro-batches (row ``i`` goes to micro-batch ``i % A``,
so each keeps the batch sharding) and a ``lax.scan`` sums their gradients; the result equals the
single-batch gradient up to float summation order.

Other objectives (``Objective``: the ``align`` / ``distill`` stages of ``train.upcycle``) plug in
through ``make_train_step(objective=...)``, frozen inputs (teacher parameters) through the step's
third argument, and a trainable/frozen split of the parameters through ``trainable=``.

Non-finite loss or gradient norm skips the update: params, optimizer state and model variables
keep their values (``jnp.where`` on every leaf), the step counter still advances (the batch was
consumed) and ``metrics["skipped"] = 1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.config import Rules
from train.mesh import check_divisible, logical_to_spec
from train.optimizer import Schedule, update_count
from train.state import ParamSplit, StateLayout, TrainState
from wuneng_jax import sharding as S
from wuneng_jax.layers import vocab_tiling

BATCH_KEYS: tuple[str, ...] = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def batch_spec(rules: Rules) -> PartitionSpec:
    return logical_to_spec((S.BATCH, S.LENGTH), rules)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(rules))


def check_batch_shape(global_batch: int, seq_len: int, accum: int, mesh: Mesh, rules: Rules) -> None:
    """The (micro-)batch and sequence must divide the mesh axes they are sharded over."""
    spec = batch_spec(rules)
    check_divisible(
        (global_batch // accum, seq_len), spec, mesh, f"micro-batch of {global_batch // accum} rows"
    )


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed CE and summed ``logsumexp^2`` over ``mask``. logits [B,T,V] (computed in float32 at least);
    targets, mask [B,T]."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(lse.dtype)
    return jnp.sum((lse - target_logit) * mask), jnp.sum(jnp.square(lse) * mask)


def model_ce_sums(model: nnx.Module, batch: Batch, vocab_tile: int = 0) -> tuple[jax.Array, jax.Array]:
    """Summed CE and summed ``logsumexp^2`` of ``model`` on ``batch`` over ``loss_mask``: over vocabulary
    tiles of ``vocab_tile`` ids when the model exposes ``hidden``/``head_weight`` and the tile splits its
    vocabulary (``wuneng_jax.layers.vocab_tiling``), else from the full logits."""
    inputs = (batch["tokens"],)
    kw = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    if not vocab_tiling.tiles_for(model, vocab_tile):
        return cross_entropy(model(*inputs, **kw), batch["targets"], batch["loss_mask"])
    x, weight, transposed = vocab_tiling.model_head(model, *inputs, **kw)
    stats = vocab_tiling.ce_stats(x, weight, batch["targets"], transposed=transposed, tile=vocab_tile)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((stats.lse - stats.target) * mask), jnp.sum(jnp.square(stats.lse) * mask)


def _forward_sums(
    graphdef: Any, params: Any, rest: Any, batch: Batch, vocab_tile: int = 0
) -> tuple[jax.Array, jax.Array, Any]:
    model = nnx.merge(graphdef, params, rest)
    ce_sum, z_sum = model_ce_sums(model, batch, vocab_tile)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return ce_sum, z_sum, new_rest


def _split_micro(batch: Batch, accum: int, rules: Rules) -> Batch:
    """[B, ...] -> [A, B/A, ...] with row i in micro-batch i % A (keeps each shard local)."""

    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        y = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        names = (None, S.BATCH, S.LENGTH) + (None,) * (x.ndim - 2)
        return S.constrain(y, names)

    return {k: split(v) for k, v in batch.items()}


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


class Objective(Protocol):
    """What a train step minimises (``train.upcycle.objectives`` has the stage objectives).

    ``count(batch)``: the normaliser (e.g. the number of loss tokens of the whole global batch).
    ``objective(params, rest, batch, extra) -> (value_sum, metric_sums, new_rest)``: the step
    minimises ``value_sum / count``; every entry of ``metric_sums`` is reported divided by ``count``
    (``loss`` must be one of them); ``extra`` carries frozen inputs of the step (a teacher's
    parameters) or None. Sums (not means) make gradient accumulation exact.
    """

    def count(self, batch: Batch) -> jax.Array: ...

    def __call__(
        self, params: Any, rest: Any, batch: Batch, extra: Any
    ) -> tuple[jax.Array, dict[str, jax.Array], Any]: ...


@dataclasses.dataclass(frozen=True)
class CrossEntropyObjective:
    """Next-token CE over ``loss_mask`` plus ``z_loss * logsumexp^2`` (the default objective);
    ``vocab_tile``: ids per vocabulary tile of the loss (0 = full logits)."""

    graphdef: Any
    z_loss: float = 0.0
    vocab_tile: int = 0

    def count(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def __call__(self, params: Any, rest: Any, batch: Batch, extra: Any = None):
        ce_sum, z_sum, new_rest = _forward_sums(self.graphdef, params, rest, batch, self.vocab_tile)
        return ce_sum + self.z_loss * z_sum, {"loss": ce_sum, "z_loss": z_sum}, new_rest


def make_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: Schedule,
    *,
    accum_steps: int = 1,
    z_loss: float = 0.0,
    rules: Rules = S.DEFAULT_RULES,
    objective: Objective | None = None,
    trainable: ParamSplit | None = None,
    vocab_tile: int = 0,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The pure train step ``step(state, batch, extra=None)`` (un-jitted; see :func:`jit_train_step`).

    Rematerialisation is per layer, a field of the model config (``wuneng_jax.layers.remat``).

    ``objective`` replaces the default CE objective (``z_loss`` and ``vocab_tile`` configure the default
    only). ``trainable`` splits the parameters: gradients, optimizer state, clipping
    and weight decay cover the trainable part only; the frozen part is passed through unchanged
    (bit for bit). ``extra`` (frozen inputs such as teacher parameters) goes to the objective.
    """
    if objective is None:
        objective = CrossEntropyObjective(graphdef, z_loss, vocab_tile)
    if trainable is None:
        split, merge = (lambda p: (p, None)), (lambda t, f: t)
    else:
        split, merge = trainable.split, trainable.merge

    def value(train_p: Any, frozen_p: Any, rest: Any, batch: Batch, extra: Any, n_tokens: jax.Array):
        total, sums, new_rest = objective(merge(train_p, frozen_p), rest, batch, extra)
        return total / n_tokens, (sums, new_rest)

    grad_fn = jax.value_and_grad(value, has_aux=True)

    def step(state: TrainState, batch: Batch, extra: Any = None) -> tuple[TrainState, Metrics]:
        batch = {k: batch[k] for k in BATCH_KEYS}
        n_tokens = jnp.maximum(objective.count(batch), 1.0)
        train_p, frozen_p = split(state.params)
        if accum_steps == 1:
            (_, (sums, rest)), grads = grad_fn(train_p, frozen_p, state.rest, batch, extra, n_tokens)
        else:
            micro = _split_micro(batch, accum_steps, rules)

            def body(carry, mb):
                g_acc, s_acc, rest = carry
                (_, (s, rest)), g = grad_fn(train_p, frozen_p, rest, mb, extra, n_tokens)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s), rest), None

            first = jax.tree.map(lambda x: x[0], micro)
            (_, (sums_shape, _)), _ = jax.eval_shape(
                grad_fn, train_p, frozen_p, state.rest, first, extra, n_tokens
            )  # the metric names (abstract trace only)
            init = (
                jax.tree.map(jnp.zeros_like, train_p),
                jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape),
                state.rest,
            )
            (grads, sums, rest), _ = jax.lax.scan(body, init, micro)
        grad_norm = optax.tree.norm(grads)
        count = update_count(state.opt_state)
        updates, opt_state = tx.update(grads, state.opt_state, train_p)
        new_train = optax.apply_updates(train_p, updates)
        finite = jnp.isfinite(grad_norm)
        for v in sums.values():
            finite = finite & jnp.all(jnp.isfinite(v))
        new_state = TrainState(
            step=state.step + 1,
            params=merge(_select(finite, new_train, train_p), frozen_p),
            opt_state=_select(finite, opt_state, state.opt_state),
            rest=_select(finite, rest, state.rest),
            rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)),
        )
        metrics = {k: v / n_tokens for k, v in sums.items()}
        metrics.update(
            grad_norm=grad_norm,
            lr=schedule(count),
            skipped=(~finite).astype(jnp.int32),
            loss_tokens=n_tokens,
        )
        return new_state, metrics

    return step


def jit_train_step(
    step: Callable[..., tuple[TrainState, Metrics]],
    layout: StateLayout,
    mesh: Mesh,
    rules: Rules,
    *,
    extra_shardings: Any = None,
):
    """``jax.jit`` with explicit shardings; the input state is donated (updated in place).

    With ``extra_shardings`` the jitted step takes a third argument (frozen inputs such as teacher
    parameters, laid out with those shardings, not donated): ``step(state, batch, extra)``.
    """
    bs = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sh = {k: bs for k in BATCH_KEYS}
    if extra_shardings is None:
        return jax.jit(
            lambda state, batch: step(state, batch),
            in_shardings=(layout.shardings, batch_sh),
            out_shardings=(layout.shardings, replicated),
            donate_argnums=(0,),
        )
    return jax.jit(
        step,
        in_shardings=(layout.shardings, batch_sh, extra_shardings),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(graphdef: Any, vocab_tile: int = 0) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Summed CE and token count of one batch (sum over batches, divide at the end)."""

    def step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        batch = {k: batch[k] for k in BATCH_KEYS}
        ce_sum, _, _ = _forward_sums(graphdef, state.params, state.rest, batch, vocab_tile)
        return {"ce_sum": ce_sum, "loss_tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32))}

    return step


def jit_eval_step(step, layout: StateLayout, mesh: Mesh, rules: Rules):
    bs = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(layout.shardings, {k: bs for k in BATCH_KEYS}),
        out_shardings=replicated,
    )
