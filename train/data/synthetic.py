"""Synthetic capability tasks as grain data sources: multi-query associative recall, group state tracking and
the two interleaved in one sequence.

Every example is a pure function of ``(task, seed, index)`` (``numpy.random.default_rng([seed, stream,
index])``), so a training stream is a random-access ``grain`` source (exact resume by index) and a
held-out set is the same function on another ``stream``. Rows have the batch layout of
``train.data.packing`` (all ``[seq_len]``): ``tokens``, ``targets``, ``segment_ids`` (all 1: one example
per row), ``positions`` (``arange``), ``loss_mask`` (1.0 exactly where the target is scored).

**MQAR** (multi-query associative recall; Arora et al. 2023, "Zoology", and the BASED paper). The
``seq_len + 1`` token stream is ``D`` key-value pairs ``k_1 v_1 ... k_D v_D`` (distinct keys from the key
range, values drawn with replacement from a disjoint value range) followed by a query region of
two-token slots; ``Q`` randomly chosen slots hold ``k v`` for ``Q`` distinct keys among the ``D`` (in
random order) and the other slots hold ``FILLER FILLER``. Inputs are the stream's first ``seq_len``
tokens, targets the next token; only the positions holding a *query key* are scored (target = its
value), as in Zoology. Token ids: ``0`` = filler, keys ``[1, 1 + num_keys)``, values
``[1 + num_keys, 1 + num_keys + num_values)``. With ``joint`` each pair is one token (ids from ``first_pair``,
one per (key, value) combination) and each query slot one token (the key; its target is the value), so no
model has to bind a value to the key before it: what is measured is how many pairs its memory holds.

**State tracking** (the word problem of a permutation group: Merrill et al. 2024 "The illusion of
state", Grazzi et al. 2024; RWKV-7 paper §7). Tokens are group elements ``x_1 .. x_T`` (uniform); the
target at position ``t`` is the running product ``p_t = x_1 · x_2 · ... · x_t`` where ``a · b`` means
"apply ``a``, then ``b``" (``(a · b)[i] = b[a[i]]``). **Every position is scored** (dense supervision;
accuracy is also reported at the last position only, the hardest one). Token id = the element's index
in the lexicographically sorted list of the group's permutations (the identity is 0). For ``S5`` (and
``A5``) the problem is NC¹-complete (Barrington), i.e. outside TC⁰ unless TC⁰ = NC¹: a fixed-depth
transformer cannot solve it at arbitrary length, an RNN with a non-diagonal state transition (RWKV-7's
delta rule) can. ``S3``/``S4``/``A4`` are solvable groups (their word problems are in TC⁰): easier
controls.

**Recall + state** (``recall_state``, the combined task: recall interleaved with state updates). An MQAR
context of ``D`` key-value pairs ``k_1 v_1 ... k_D v_D``, then a region that interleaves uniform random
elements of a permutation group (state updates) with ``Q`` two-token query slots ``k v`` (``Q`` distinct
keys among the ``D``, in random order, at random places), then one filler token. Scored: every group element
(target: the running product of the group elements so far, the queries skipped; the state-tracking part)
and every query key (target: its value; the recall part). Token ids: ``0`` = filler, keys
``[1, 1 + num_keys)``, values ``[1 + num_keys, 1 + num_keys + num_values)``, group elements from
``first_element = 1 + num_keys + num_values`` (element index ``e`` -> ``first_element + e``, identity first),
used both as inputs and as product targets. The metric splits by target id (``state_from =
first_element``): recall accuracy, state accuracy and their mean (balanced accuracy). A model needs a
precise recall of ``D`` pairs (attention's strength) and a running product (RWKV-7's) in the same sequence.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import cached_property

import grain
import numpy as np

from train.data.packing import ROW_KEYS

FILLER = 0
GROUPS = ("S2", "S3", "S4", "S5", "A4", "A5")
TRAIN_STREAM = 0  # rng stream of training examples
EVAL_STREAM = 1  # rng stream of held-out examples (never used for training)
_MAX_LEN = 2**31 - 1  # "infinite" training source (examples are generated on demand)


# --------------------------------------------------------------------------------------------
# Groups


def _parity(perm: tuple[int, ...]) -> int:
    """0 for even permutations, 1 for odd (count of inversions mod 2)."""
    n = len(perm)
    return sum(perm[i] > perm[j] for i in range(n) for j in range(i + 1, n)) % 2


def compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """``a · b``: apply ``a`` then ``b`` (``result[i] = b[a[i]]``)."""
    return tuple(b[a[i]] for i in range(len(a)))


@dataclasses.dataclass(frozen=True)
class PermutationGroup:
    """A permutation group by name: ``S<n>`` (symmetric) or ``A<n>`` (alternating)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in GROUPS:
            raise ValueError(f"group {self.name!r} is not supported; use one of {', '.join(GROUPS)}")

    @property
    def degree(self) -> int:
        return int(self.name[1:])

    @cached_property
    def elements(self) -> tuple[tuple[int, ...], ...]:
        """The group's permutations, sorted lexicographically (identity first)."""
        perms = itertools.permutations(range(self.degree))
        if self.name.startswith("A"):
            perms = (p for p in perms if _parity(p) == 0)
        return tuple(sorted(perms))

    @property
    def order(self) -> int:
        return len(self.elements)

    @cached_property
    def table(self) -> np.ndarray:
        """int32 ``[order, order]``: ``table[i, j]`` = index of ``elements[i] · elements[j]``."""
        index = {p: i for i, p in enumerate(self.elements)}
        out = np.empty((self.order, self.order), np.int32)
        for i, a in enumerate(self.elements):
            for j, b in enumerate(self.elements):
                out[i, j] = index[compose(a, b)]
        return out

    def prefix_products(self, xs: np.ndarray) -> np.ndarray:
        """int32 ``[T]``: ``p_t = x_1 · ... · x_t`` for element indices ``xs`` ``[T]``."""
        out = np.empty(len(xs), np.int32)
        acc = 0  # identity
        table = self.table
        for t, x in enumerate(xs):
            acc = table[acc, x]
            out[t] = acc
        return out


# --------------------------------------------------------------------------------------------
# Tasks


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), int(index)])


def _row(tokens: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray) -> dict[str, np.ndarray]:
    t = len(tokens)
    return {
        "tokens": tokens.astype(np.int32),
        "targets": targets.astype(np.int32),
        "segment_ids": np.ones((t,), np.int32),
        "positions": np.arange(t, dtype=np.int32),
        "loss_mask": loss_mask.astype(np.float32),
    }


class _PairLayout:
    """The key-value pairs of ``MQAR`` and ``RecallState``: ``k v`` token pairs, or with ``joint`` one token per
    pair (``first_pair + key_index * num_values + value_index``); query slots take as many tokens as a pair."""

    num_keys: int
    num_values: int
    joint: bool

    @property
    def tokens_per_item(self) -> int:
        """Tokens per pair and per query slot: 2 (``k v``), or 1 with ``joint``."""
        return 1 if self.joint else 2

    @property
    def first_pair(self) -> int:
        raise NotImplementedError

    def write_pairs(
        self, s: np.ndarray, key_idx: np.ndarray, value_idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Write the pairs at the start of the stream ``s``; returns the key and value token ids."""
        d = len(key_idx)
        keys, values = 1 + key_idx, 1 + self.num_keys + value_idx
        if self.joint:
            s[:d] = self.first_pair + key_idx * self.num_values + value_idx
        else:
            s[0 : 2 * d : 2] = keys
            s[1 : 2 * d : 2] = values
        return keys, values


@dataclasses.dataclass(frozen=True)
class MQAR(_PairLayout):
    """Multi-query associative recall (see the module docstring). ``num_queries`` defaults to ``num_pairs``."""

    seq_len: int
    num_pairs: int
    num_keys: int = 32
    num_values: int = 32
    num_queries: int | None = None
    min_pairs: int | None = (
        None  # training examples: pairs uniform in [min_pairs, num_pairs] (held-out: num_pairs)
    )
    joint: bool = False  # one token per pair (k, v) and one per query (see the module docstring)

    kind = "mqar"

    def __post_init__(self) -> None:
        if self.num_queries is None:
            object.__setattr__(self, "num_queries", self.num_pairs)
        for name in ("seq_len", "num_pairs", "num_keys", "num_values", "num_queries"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"mqar.{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"mqar.num_pairs: {self.num_pairs} pairs need as many distinct keys, but num_keys="
                f"{self.num_keys}; raise num_keys or lower num_pairs"
            )
        if self.num_queries > self.num_pairs:
            raise ValueError(
                f"mqar.num_queries: {self.num_queries} > num_pairs={self.num_pairs} (queries are distinct keys)"
            )
        if self.min_pairs is not None and not 1 <= int(self.min_pairs) <= self.num_pairs:
            raise ValueError(
                f"mqar.min_pairs: must be in [1, num_pairs={self.num_pairs}], got {self.min_pairs}"
            )
        if self.num_slots < self.num_queries:
            w = self.tokens_per_item
            raise ValueError(
                f"mqar.seq_len: {self.seq_len} is too short for {self.num_pairs} pairs and {self.num_queries} "
                f"queries (needs seq_len >= {w * (self.num_pairs + self.num_queries) - (w - 1)}); lower "
                "num_pairs or raise seq_len"
            )

    @property
    def vocab_size(self) -> int:
        return self.first_pair + (self.num_keys * self.num_values if self.joint else 0)

    @property
    def first_key(self) -> int:
        return 1

    @property
    def first_value(self) -> int:
        return 1 + self.num_keys

    @property
    def first_pair(self) -> int:
        """``joint``: the first pair token (after filler, keys and values)."""
        return 1 + self.num_keys + self.num_values

    @property
    def num_slots(self) -> int:
        """Query slots after the pairs whose key is an input position (of ``tokens_per_item`` tokens each)."""
        return self.slots_for(self.num_pairs)

    def slots_for(self, num_pairs: int) -> int:
        w = self.tokens_per_item
        return (self.seq_len + w - 1 - w * num_pairs) // w

    def example(self, rng: np.random.Generator, train: bool = False) -> dict[str, np.ndarray]:
        """One row; a training row (``train``) with ``min_pairs`` set has a uniform number of pairs in
        ``[min_pairs, num_pairs]`` (fewer pairs: a shorter context and more filler slots)."""
        d = self.num_pairs
        if train and self.min_pairs is not None:
            d = int(rng.integers(int(self.min_pairs), self.num_pairs + 1))
        q, w = min(self.num_queries, d), self.tokens_per_item
        s = np.full((self.seq_len + 1,), FILLER, np.int64)  # inputs s[:-1], next tokens s[1:]
        keys, values = self.write_pairs(
            s, rng.choice(self.num_keys, size=d, replace=False), rng.integers(0, self.num_values, size=d)
        )
        which = rng.choice(d, size=q, replace=False)  # which pairs are queried, in query order
        qpos = w * d + w * np.sort(rng.choice(self.slots_for(d), size=q, replace=False))
        s[qpos] = keys[which]
        if not self.joint:
            s[qpos + 1] = values[which]
        targets = s[1:].copy()  # the next token wherever nothing is scored
        targets[qpos] = values[which]
        mask = np.zeros((self.seq_len,), np.float32)
        mask[qpos] = 1.0
        return _row(s[:-1], targets, mask)


@dataclasses.dataclass(frozen=True)
class StateTracking:
    """Running product of uniform random elements of a permutation group (every position scored)."""

    seq_len: int
    group: str = "S5"

    kind = "state_tracking"

    def __post_init__(self) -> None:
        if int(self.seq_len) < 1:
            raise ValueError(f"state_tracking.seq_len: must be >= 1, got {self.seq_len}")
        PermutationGroup(self.group)  # validates the name

    @cached_property
    def perm_group(self) -> PermutationGroup:
        return PermutationGroup(self.group)

    @property
    def vocab_size(self) -> int:
        return self.perm_group.order

    def example(self, rng: np.random.Generator, train: bool = False) -> dict[str, np.ndarray]:
        xs = rng.integers(0, self.vocab_size, size=self.seq_len)
        return _row(xs, self.perm_group.prefix_products(xs), np.ones((self.seq_len,), np.float32))


@dataclasses.dataclass(frozen=True)
class RecallState(_PairLayout):
    """MQAR pairs, then group elements (running product scored) interleaved with recall queries (see the
    module docstring). ``num_queries`` defaults to ``num_pairs``."""

    seq_len: int
    num_pairs: int
    group: str = "S3"
    num_keys: int = 32
    num_values: int = 32
    num_queries: int | None = None
    joint: bool = False  # one token per pair (k, v) and one per query, as in MQAR's ``joint``

    kind = "recall_state"

    def __post_init__(self) -> None:
        if self.num_queries is None:
            object.__setattr__(self, "num_queries", self.num_pairs)
        PermutationGroup(self.group)  # validates the name
        for name in ("seq_len", "num_pairs", "num_keys", "num_values", "num_queries"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"recall_state.{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"recall_state.num_pairs: {self.num_pairs} pairs need as many distinct keys, but num_keys="
                f"{self.num_keys}; raise num_keys or lower num_pairs"
            )
        if self.num_queries > self.num_pairs:
            raise ValueError(
                f"recall_state.num_queries: {self.num_queries} > num_pairs={self.num_pairs} (queries are distinct keys)"
            )
        if self.num_moves < 1:
            raise ValueError(
                f"recall_state.seq_len: {self.seq_len} leaves no room for group elements after {self.num_pairs} "
                f"pairs and {self.num_queries} queries (needs seq_len >= {self.tokens_per_item} * (num_pairs + "
                f"num_queries) + 1)"
            )

    @cached_property
    def perm_group(self) -> PermutationGroup:
        return PermutationGroup(self.group)

    @property
    def first_value(self) -> int:
        return 1 + self.num_keys

    @property
    def first_element(self) -> int:
        return 1 + self.num_keys + self.num_values

    @property
    def state_from(self) -> int:
        """Targets with ids ``>= state_from`` are state-tracking answers, the others recall answers."""
        return self.first_element

    @property
    def first_pair(self) -> int:
        """``joint``: the first pair token (after filler, keys, values and group elements)."""
        return self.first_element + self.perm_group.order

    @property
    def vocab_size(self) -> int:
        return self.first_pair + (self.num_keys * self.num_values if self.joint else 0)

    @property
    def num_moves(self) -> int:
        """Group elements per row: the input positions after the pairs not taken by query slots."""
        return self.seq_len - self.tokens_per_item * (self.num_pairs + self.num_queries)

    def example(self, rng: np.random.Generator, train: bool = False) -> dict[str, np.ndarray]:
        d, q, m, w = self.num_pairs, self.num_queries, self.num_moves, self.tokens_per_item
        s = np.full((self.seq_len + 1,), FILLER, np.int64)
        keys, values = self.write_pairs(
            s, rng.choice(self.num_keys, size=d, replace=False), rng.integers(0, self.num_values, size=d)
        )
        moves = rng.integers(0, self.perm_group.order, size=m)
        which = rng.choice(d, size=q, replace=False)  # queried pairs, in query order
        is_query = np.zeros(m + q, bool)
        is_query[rng.choice(m + q, size=q, replace=False)] = True  # item order of the region
        products = self.perm_group.prefix_products(moves)
        query_pos, move_pos, pos = [], [], w * d
        for query in is_query:
            if query:
                query_pos.append(pos)
                s[pos] = keys[which[len(query_pos) - 1]]
                if not self.joint:
                    s[pos + 1] = values[which[len(query_pos) - 1]]
                pos += w
            else:
                move_pos.append(pos)
                s[pos] = self.first_element + moves[len(move_pos) - 1]
                pos += 1
        targets = s[1:].copy()  # the next token wherever nothing is scored
        targets[query_pos] = values[which]
        targets[move_pos] = self.first_element + products
        mask = np.zeros((self.seq_len,), np.float32)
        mask[query_pos + move_pos] = 1.0
        return _row(s[:-1], targets, mask)


Task = MQAR | StateTracking | RecallState


# --------------------------------------------------------------------------------------------
# grain sources


class TaskSource:
    """A random-access grain data source: element ``i`` = ``task.example(rng(seed, stream, i), train=stream ==
    TRAIN_STREAM)`` (a training curriculum such as MQAR's ``min_pairs`` applies to the training stream only)."""

    def __init__(self, task: Task, seed: int, stream: int = TRAIN_STREAM, length: int = _MAX_LEN):
        if length < 1:
            raise ValueError(f"TaskSource length must be >= 1, got {length}")
        self.task, self.seed, self.stream, self.length = task, int(seed), int(stream), int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(f"example {index} out of range [0, {self.length})")
        return self.task.example(_rng(self.seed, self.stream, index), train=self.stream == TRAIN_STREAM)

    def __repr__(self) -> str:
        return f"TaskSource({self.task!r}, seed={self.seed}, stream={self.stream}, length={self.length})"


def train_iterator(
    task: Task,
    *,
    local_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 1,
    prefetch: int = 4,
) -> grain.DatasetIterator:
    """Endless batches ``[local_batch, seq_len]`` of fresh training examples for this host.

    Global step ``s`` covers examples ``[s*G, (s+1)*G)`` (``G = local_batch * process_count``), host
    ``process_index`` taking every ``process_count``-th; ``get_state``/``set_state`` resume exactly.
    """
    if local_batch < 1:
        raise ValueError(f"local_batch must be >= 1, got {local_batch}")
    ds = grain.MapDataset.source(TaskSource(task, seed, TRAIN_STREAM))
    ds = ds[process_index::process_count].batch(local_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def heldout_batches(
    task: Task,
    *,
    num_examples: int,
    local_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The held-out set: examples ``0 .. num_examples-1`` of the eval stream of ``seed`` (disjoint from
    every training stream), cut into this host's batches; ``num_examples`` must fill whole global batches."""
    global_batch = local_batch * process_count
    if num_examples < 1 or num_examples % global_batch:
        raise ValueError(
            f"eval examples: {num_examples} must be a positive multiple of the global batch {global_batch}"
        )
    src = TaskSource(task, seed, EVAL_STREAM, length=num_examples)
    ds = grain.MapDataset.source(src)[process_index::process_count].batch(local_batch, drop_remainder=True)
    return list(ds)


def make_task(kind: str, seq_len: int, **params) -> Task:
    """``make_task("mqar", 128, num_pairs=8)`` / ``make_task("state_tracking", 64, group="S5")``."""
    classes = {MQAR.kind: MQAR, StateTracking.kind: StateTracking, RecallState.kind: RecallState}
    if kind not in classes:
        raise ValueError(f"task kind {kind!r} is not one of {', '.join(classes)}")
    cls = classes[kind]
    names = {f.name for f in dataclasses.fields(cls)} - {"seq_len"}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"task {kind!r}: unknown parameter(s) {unknown}; known: {sorted(names)}")
    return cls(seq_len=seq_len, **params)


__all__ = [
    "EVAL_STREAM",
    "FILLER",
    "GROUPS",
    "MQAR",
    "ROW_KEYS",
    "TRAIN_STREAM",
    "PermutationGroup",
    "RecallState",
    "StateTracking",
    "TaskSource",
    "compose",
    "heldout_batches",
    "make_task",
    "train_iterator",
]
