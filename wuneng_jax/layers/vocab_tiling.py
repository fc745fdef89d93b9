"""Vocabulary-tiled LM-head losses: cross-entropy, z-loss, distillation KL and greedy checks without a
``[tokens, V]`` float32 logits buffer (MaxText's ``num_vocab_tiling``).

The loss needs, per token, only a few numbers of the logits row ``z = x W`` (``x`` the final-normed hidden
state ``[B,T,d]``, ``W`` the LM-head weight):

    lse = logsumexp(z)            target = z[y]            (CE = lse − target, z-loss = lse²)
    KL·τ² = τ² (Σ_v p_T(v)(t_v − s_v) − lse(t) + lse(s)),   t = z_teacher/τ, s = z/τ, p_T = softmax(t)

The vocabulary is split into ``n`` tiles; a loop over them computes each tile's logits ``[B,T,V/n]``,
folds them into running (online-softmax) statistics and drops them. The backward pass (a custom VJP)
runs the loop again, recomputing each tile's logits, and accumulates ``dx`` and the tile's columns of
``dW``. The largest loss buffer is then one tile of logits, and only one tile of the head weight is
gathered at a time.

Tiles are *strided*: tile ``j`` holds the vocabulary ids ``j, j + n, j + 2n, …``. Reshaping the weight
``[d, V] -> [d, V/n, n]`` (``[V, d] -> [V/n, n, d]`` for a tied embedding) is free, the vocabulary
sharding (``VOCAB`` over ``tensor``) lands on the ``V/n`` axis, and picking tile ``j`` indexes the
unsharded ``n`` axis, so no device gathers the whole vocabulary. ``n`` is a divisor of ``V`` near
``V / tile`` when one exists (no padding); otherwise the weight is padded with zero columns that the
statistics mask out.

``tile <= 0`` or ``tile >= V`` computes the full logits (plain autodiff): the reference path.

Numerics: logits and statistics in float32 (float64 for a float64 model), the per-tile products in the
compute dtype with float32 accumulation (as :func:`wuneng_jax.layers.embed.logits_from_hidden`); the
logits' cotangent is cast to the compute dtype for the backward products, as autodiff does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from wuneng_jax.sharding import ACT_VOCAB, BATCH, EMBED, LENGTH, VOCAB, constrain

#: Default ids per vocabulary tile (the training config's ``loss_vocab_tile``, the evaluators' default).
DEFAULT_VOCAB_TILE = 8192

#: Teacher logits of ids the teacher does not have (exp underflows to exactly 0); as ``match_vocab``.
NEG_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class Tiling:
    """``n`` strided tiles of ``size`` ids over a vocabulary of ``vocab`` (``n * size >= vocab``)."""

    vocab: int
    n: int
    size: int

    @property
    def padded(self) -> bool:
        return self.n * self.size > self.vocab

    def ids(self, j: jax.Array) -> jax.Array:
        """Vocabulary ids of tile ``j``: ``j + n * arange(size)`` (int32 ``[size]``)."""
        return j + self.n * jnp.arange(self.size, dtype=jnp.int32)


def plan_tiles(vocab: int, tile: int) -> Tiling:
    """Tiles of at most ``tile`` ids: the smallest divisor ``n >= ceil(V / tile)`` of ``V`` up to
    ``2 ceil(V / tile)`` (exact, no padding), else ``n = ceil(V / tile)`` tiles with padding."""
    if vocab < 1:
        raise ValueError(f"vocab={vocab} must be >= 1")
    if tile <= 0 or tile >= vocab:
        return Tiling(vocab, 1, vocab)
    lo = -(-vocab // tile)
    for n in range(lo, 2 * lo + 1):
        if vocab % n == 0:
            return Tiling(vocab, n, vocab // n)
    return Tiling(vocab, lo, -(-vocab // lo))


def is_tiled(vocab: int, tile: int) -> bool:
    """Whether ``tile`` splits a vocabulary of ``vocab`` (else the full-logits path runs)."""
    return plan_tiles(vocab, tile).n > 1


# ---------------------------------------------------------------------------------------------------
# weight views


def _tile_weight(w: jax.Array, transposed: bool, t: Tiling) -> jax.Array:
    """``[d, V]`` -> ``[d, size, n]`` (``[V, d]`` -> ``[size, n, d]`` when ``transposed``), zero-padded."""
    extra = t.n * t.size - w.shape[0 if transposed else 1]
    if transposed:
        if extra > 0:
            w = jnp.pad(w, ((0, extra), (0, 0)))
        elif extra < 0:
            w = w[: t.n * t.size]
        return w.reshape(t.size, t.n, w.shape[1])
    if extra > 0:
        w = jnp.pad(w, ((0, 0), (0, extra)))
    elif extra < 0:
        w = w[:, : t.n * t.size]
    return w.reshape(w.shape[0], t.size, t.n)


def _untile_weight(w3: jax.Array, transposed: bool, vocab: int) -> jax.Array:
    if transposed:
        return w3.reshape(-1, w3.shape[2])[:vocab]
    return w3.reshape(w3.shape[0], -1)[:, :vocab]


def _w3_names(transposed: bool) -> tuple[str | None, ...]:
    return (VOCAB, None, EMBED) if transposed else (EMBED, VOCAB, None)


def _pick(w3: jax.Array, transposed: bool, j: jax.Array) -> jax.Array:
    """Tile ``j`` of the reshaped weight: ``[size, d]`` (transposed) or ``[d, size]``."""
    tile = jax.lax.dynamic_index_in_dim(w3, j, axis=1 if transposed else 2, keepdims=False)
    return constrain(tile, (VOCAB, EMBED) if transposed else (EMBED, VOCAB))


def _acc_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def _logits(x: jax.Array, tile: jax.Array, transposed: bool) -> jax.Array:
    """``x [B,T,d]`` times one weight tile -> float32 (float64) logits ``[B,T,size]``."""
    spec = "btd,kd->btk" if transposed else "btd,dk->btk"
    out = jnp.einsum(spec, x, tile.astype(x.dtype), preferred_element_type=_acc_dtype(x))
    return constrain(out, (BATCH, LENGTH, ACT_VOCAB))


# ---------------------------------------------------------------------------------------------------
# the tiled core


@dataclasses.dataclass(frozen=True)
class _Static:
    tiling: Tiling
    transposed: bool
    teacher_transposed: bool = False
    teacher_vocab: int = 0  # 0: no teacher
    temperature: float = 1.0
    argmax: bool = False

    @property
    def teacher(self) -> bool:
        return self.teacher_vocab > 0


def _online(m: jax.Array, l: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold logits ``z [..., K]`` into a running ``(max, Σ exp(z − max))``; also returns the rescale."""
    new_m = jnp.maximum(m, jnp.max(z, axis=-1))
    scale = jnp.exp(m - new_m)
    return new_m, l * scale + jnp.sum(jnp.exp(z - new_m[..., None]), axis=-1), scale


def _student_tile(st: _Static, x, w3, j) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Logits of tile ``j`` (padded ids at -inf), its ids and the valid-id mask (None: all valid)."""
    t = st.tiling
    ids = t.ids(j)
    s = _logits(x, _pick(w3, st.transposed, j), st.transposed)
    valid = None
    if t.padded:
        valid = ids < t.vocab
        s = jnp.where(valid, s, -jnp.inf)
    return s, ids, valid


def _teacher_tile(st: _Static, xt, wt3, j, ids, valid) -> jax.Array:
    tz = _logits(xt, _pick(wt3, st.teacher_transposed, j), st.teacher_transposed)
    if st.teacher_vocab < st.tiling.vocab:
        tz = jnp.where(ids < st.teacher_vocab, tz, NEG_LOGIT)
    if valid is not None:
        tz = jnp.where(valid, tz, -jnp.inf)
    return tz


def _forward(st: _Static, x, w3, targets, xt, wt3) -> dict[str, jax.Array]:
    """Per-token statistics over all tiles: ``lse``, ``target`` (and ``lse_s``/``lse_t``/``kl`` with a
    teacher, ``argmax`` when asked)."""
    acc = _acc_dtype(x)
    rows = x.shape[:-1]
    neg = jnp.full(rows, -jnp.inf, acc)
    zero = jnp.zeros(rows, acc)
    tau = st.temperature
    carry: dict[str, jax.Array] = {"m": neg, "l": zero, "target": zero}
    if st.argmax:
        carry["best_v"] = neg
        carry["best_i"] = jnp.zeros(rows, jnp.int32)
    if st.teacher:
        carry.update(mt=neg, lt=zero, a=zero)
        if tau != 1.0:
            carry.update(ms=neg, ls=zero)

    def body(j, c):
        c = dict(c)
        s, ids, valid = _student_tile(st, x, w3, j)
        c["m"], c["l"], _ = _online(c["m"], c["l"], s)
        c["target"] = c["target"] + jnp.sum(jnp.where(ids == targets[..., None], s, 0.0), axis=-1)
        if st.argmax:
            tile_v = jnp.max(s, axis=-1)
            tile_i = j + st.tiling.n * jnp.argmax(s, axis=-1).astype(jnp.int32)
            better = tile_v > c["best_v"]
            tie = tile_v == c["best_v"]
            c["best_i"] = jnp.where(
                better, tile_i, jnp.where(tie, jnp.minimum(c["best_i"], tile_i), c["best_i"])
            )
            c["best_v"] = jnp.maximum(c["best_v"], tile_v)
        if st.teacher:
            tz = _teacher_tile(st, xt, wt3, j, ids, valid) / tau
            ss = s / tau
            c["mt"], c["lt"], scale = _online(c["mt"], c["lt"], tz)
            e = jnp.exp(tz - c["mt"][..., None])
            term = e * (tz - ss)
            if valid is not None:
                term = jnp.where(valid, term, 0.0)
            c["a"] = c["a"] * scale + jnp.sum(term, axis=-1)
            if tau != 1.0:
                c["ms"], c["ls"], _ = _online(c["ms"], c["ls"], ss)
        return c

    c = jax.lax.fori_loop(0, st.tiling.n, body, carry)
    out = {"lse": c["m"] + jnp.log(c["l"]), "target": c["target"]}
    if st.argmax:
        out["argmax"] = c["best_i"]
    if st.teacher:
        lse_t = c["mt"] + jnp.log(c["lt"])
        lse_s = out["lse"] if tau == 1.0 else c["ms"] + jnp.log(c["ls"])
        out.update(lse_t=lse_t, lse_s=lse_s, kl=(c["a"] / c["lt"] - lse_t + lse_s) * tau**2)
    return out


def _backward(st: _Static, x, w3, targets, xt, wt3, res: dict[str, jax.Array], g: dict[str, jax.Array]):
    """``(dx, dW)`` for cotangents ``g`` of ``lse``, ``target`` (and ``kl``)."""
    acc = _acc_dtype(x)
    tau = st.temperature
    names = _w3_names(st.transposed)
    dw3 = constrain(jnp.zeros(w3.shape, jnp.promote_types(w3.dtype, jnp.float32)), names)
    dx = jnp.zeros(x.shape, acc)
    lse = res["lse"][..., None]
    g_lse = g["lse"][..., None]
    g_tgt = g["target"][..., None]

    def body(j, carry):
        dx, dw3 = carry
        s, ids, _ = _student_tile(st, x, w3, j)
        dl = g_lse * jnp.exp(s - lse) + jnp.where(ids == targets[..., None], g_tgt, 0.0)
        if st.teacher:
            tz = _teacher_tile(st, xt, wt3, j, ids, (ids < st.tiling.vocab) if st.tiling.padded else None)
            p_s = jnp.exp(s / tau - res["lse_s"][..., None])
            p_t = jnp.exp(tz / tau - res["lse_t"][..., None])
            dl = dl + (g["kl"][..., None] * tau) * (p_s - p_t)
        dl = dl.astype(x.dtype)
        tile = _pick(w3, st.transposed, j).astype(x.dtype)
        if st.transposed:
            dx = dx + jnp.einsum("btk,kd->btd", dl, tile, preferred_element_type=acc)
            dw = jnp.einsum("btk,btd->kd", dl, x, preferred_element_type=acc)
            dw = constrain(dw, (VOCAB, EMBED))
        else:
            dx = dx + jnp.einsum("btk,dk->btd", dl, tile, preferred_element_type=acc)
            dw = jnp.einsum("btk,btd->dk", dl, x, preferred_element_type=acc)
            dw = constrain(dw, (EMBED, VOCAB))
        axis = 1 if st.transposed else 2
        dw3 = jax.lax.dynamic_update_index_in_dim(dw3, dw.astype(dw3.dtype), j, axis)
        return dx, constrain(dw3, names)

    dx, dw3 = jax.lax.fori_loop(0, st.tiling.n, body, (dx, dw3))
    return dx.astype(x.dtype), dw3.astype(w3.dtype)


# -- custom VJPs ------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce(st: _Static, x, w3, targets):
    out = _forward(st, x, w3, targets, None, None)
    return out["lse"], out["target"]


def _ce_fwd(st, x, w3, targets):
    out = _forward(st, x, w3, targets, None, None)
    return (out["lse"], out["target"]), (x, w3, targets, out["lse"])


def _ce_bwd(st, res, g):
    x, w3, targets, lse = res
    dx, dw3 = _backward(st, x, w3, targets, None, None, {"lse": lse}, {"lse": g[0], "target": g[1]})
    return dx, dw3, None


_ce.defvjp(_ce_fwd, _ce_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _distill(st: _Static, x, w3, targets, xt, wt3):
    out = _forward(st, x, w3, targets, xt, wt3)
    return out["lse"], out["target"], out["kl"]


def _distill_fwd(st, x, w3, targets, xt, wt3):
    out = _forward(st, x, w3, targets, xt, wt3)
    res = (x, w3, targets, xt, wt3, out["lse"], out["lse_s"], out["lse_t"])
    return (out["lse"], out["target"], out["kl"]), res


def _distill_bwd(st, res, g):
    x, w3, targets, xt, wt3, lse, lse_s, lse_t = res
    r = {"lse": lse, "lse_s": lse_s, "lse_t": lse_t}
    dx, dw3 = _backward(st, x, w3, targets, xt, wt3, r, {"lse": g[0], "target": g[1], "kl": g[2]})
    return dx, dw3, None, None, None  # the teacher is frozen


_distill.defvjp(_distill_fwd, _distill_bwd)


# ---------------------------------------------------------------------------------------------------
# public functions


def full_logits(x: jax.Array, weight: jax.Array, *, transposed: bool) -> jax.Array:
    """The untiled head: float32 (float64) logits ``[B,T,V]`` (as the models' own head)."""
    return _logits(x, weight, transposed)


class HeadStats(NamedTuple):
    """Per-token statistics of the logits rows, float32 ``[B,T]``: ``lse`` = logsumexp, ``target`` = the
    target's logit; ``kl`` (distillation) = ``τ² KL(p_T ‖ p_S)``; ``argmax`` int32 (greedy checks)."""

    lse: jax.Array
    target: jax.Array
    kl: jax.Array | None = None
    argmax: jax.Array | None = None


def _check(x: jax.Array, weight: jax.Array, transposed: bool) -> int:
    if x.ndim != 3:
        raise ValueError(f"vocab tiling: hidden states must be [B,T,d], got shape {x.shape}")
    d = weight.shape[1] if transposed else weight.shape[0]
    if d != x.shape[-1]:
        raise ValueError(
            f"vocab tiling: head weight {weight.shape} (transposed={transposed}) vs hidden {x.shape}"
        )
    return int(weight.shape[0] if transposed else weight.shape[1])


def ce_stats(
    x: jax.Array, weight: jax.Array, targets: jax.Array, *, transposed: bool, tile: int
) -> HeadStats:
    """``lse`` and target logit of ``x [B,T,d] @ head`` (differentiable in ``x`` and ``weight``).

    ``weight``: ``[d, V]`` (an LM-head kernel) or ``[V, d]`` when ``transposed`` (a tied embedding).
    ``tile``: ids per vocabulary tile; ``<= 0`` or ``>= V``: full logits (plain autodiff).
    """
    vocab = _check(x, weight, transposed)
    t = plan_tiles(vocab, tile)
    targets = targets.astype(jnp.int32)
    if t.n == 1:
        z = full_logits(x, weight, transposed=transposed)
        lse = jax.nn.logsumexp(z, axis=-1)
        return HeadStats(lse, jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0])
    st = _Static(t, transposed)
    w3 = constrain(_tile_weight(weight, transposed, t), _w3_names(transposed))
    return HeadStats(*_ce(st, x, w3, targets))


def distill_stats(
    x: jax.Array,
    weight: jax.Array,
    x_teacher: jax.Array,
    w_teacher: jax.Array,
    targets: jax.Array,
    *,
    transposed: bool,
    teacher_transposed: bool,
    temperature: float = 1.0,
    tile: int,
) -> HeadStats:
    """Student ``lse``/target logit and per-token ``τ² KL(p_T ‖ p_S)`` (``p = softmax(logits / τ)``) with
    the teacher's logits ``x_teacher @ w_teacher`` matched to the student's vocabulary as
    ``train.upcycle.objectives.match_vocab`` does (cut when larger; ids the teacher lacks get
    probability 0). The teacher gets no gradient."""
    vocab = _check(x, weight, transposed)
    t_vocab = _check(x_teacher, w_teacher, teacher_transposed)
    x_teacher = jax.lax.stop_gradient(x_teacher)
    w_teacher = jax.lax.stop_gradient(w_teacher)
    targets = targets.astype(jnp.int32)
    t = plan_tiles(vocab, tile)
    if t.n == 1:
        return _distill_full(
            x,
            weight,
            x_teacher,
            w_teacher,
            targets,
            transposed,
            teacher_transposed,
            temperature,
            vocab,
            t_vocab,
        )
    st = _Static(t, transposed, teacher_transposed, min(t_vocab, vocab), float(temperature))
    w3 = constrain(_tile_weight(weight, transposed, t), _w3_names(transposed))
    wt3 = constrain(_tile_weight(w_teacher, teacher_transposed, t), _w3_names(teacher_transposed))
    return HeadStats(*_distill(st, x, w3, targets, x_teacher, wt3))


def _distill_full(x, weight, xt, wt, targets, transposed, teacher_transposed, tau, vocab, t_vocab):
    s = full_logits(x, weight, transposed=transposed)
    tz = full_logits(xt, wt, transposed=teacher_transposed)
    if t_vocab >= vocab:
        tz = tz[..., :vocab]
    else:
        tz = jnp.pad(tz, [(0, 0), (0, 0), (0, vocab - t_vocab)], constant_values=NEG_LOGIT)
    logp_t = jax.nn.log_softmax(tz / tau, axis=-1)
    logp_s = jax.nn.log_softmax(s / tau, axis=-1)
    p_t = jnp.exp(logp_t)
    kl = jnp.sum(jnp.where(p_t > 0, p_t * (logp_t - logp_s), 0.0), axis=-1) * tau**2
    lse = jax.nn.logsumexp(s, axis=-1)
    return HeadStats(lse, jnp.take_along_axis(s, targets[..., None], axis=-1)[..., 0], kl)


def greedy_stats(
    x: jax.Array, weight: jax.Array, targets: jax.Array, *, transposed: bool, tile: int
) -> HeadStats:
    """``lse``, target logit and ``argmax`` (the first maximal id, as ``jnp.argmax``); forward only."""
    vocab = _check(x, weight, transposed)
    t = plan_tiles(vocab, tile)
    targets = targets.astype(jnp.int32)
    if t.n == 1:
        z = full_logits(x, weight, transposed=transposed)
        tgt = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
        return HeadStats(jax.nn.logsumexp(z, axis=-1), tgt, None, jnp.argmax(z, axis=-1).astype(jnp.int32))
    st = _Static(t, transposed, argmax=True)
    w3 = _tile_weight(weight, transposed, t)
    out = _forward(st, x, w3, targets, None, None)
    return HeadStats(out["lse"], out["target"], None, out["argmax"])


# ---------------------------------------------------------------------------------------------------
# models


def model_head(
    model: Any, tokens: jax.Array, segment_ids=None, positions=None
) -> tuple[jax.Array, jax.Array, bool]:
    """``(normed hidden [B,T,d], head weight, transposed)`` of a model with ``hidden`` / ``head_weight``."""
    x = model.hidden(tokens, segment_ids=segment_ids, positions=positions)
    weight, transposed = model.head_weight()
    return x, weight, transposed


def has_head(model: Any) -> bool:
    """Whether ``model`` exposes ``hidden`` and ``head_weight`` (the tiled path); else only logits."""
    return callable(getattr(model, "hidden", None)) and callable(getattr(model, "head_weight", None))


def tiles_for(model: Any, tile: int) -> bool:
    """Whether the tiled path applies: ``model`` exposes its head and ``tile`` splits its vocabulary."""
    return has_head(model) and is_tiled(int(model.cfg.vocab_size), tile)


__all__ = [
    "DEFAULT_VOCAB_TILE",
    "NEG_LOGIT",
    "HeadStats",
    "Tiling",
    "ce_stats",
    "distill_stats",
    "full_logits",
    "greedy_stats",
    "has_head",
    "is_tiled",
    "model_head",
    "plan_tiles",
    "tiles_for",
]
