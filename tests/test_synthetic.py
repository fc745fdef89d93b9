"""The synthetic capability tasks (train.data.synthetic) and the exact accuracy metric
(train.experiments.accuracy), checked against brute-force re-derivations written independently here."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.data import synthetic as syn
from train.experiments.accuracy import accuracy_sums, finalize, total

# --------------------------------------------------------------------------------------------
# Groups


@pytest.mark.parametrize(
    ("name", "order"), [("S2", 2), ("S3", 6), ("S4", 24), ("S5", 120), ("A4", 12), ("A5", 60)]
)
def test_group_elements(name, order):
    g = syn.PermutationGroup(name)
    n = int(name[1:])
    assert g.order == order
    assert g.elements[0] == tuple(range(n))  # identity is token 0
    assert len(set(g.elements)) == order
    all_perms = set(itertools.permutations(range(n)))
    assert set(g.elements) <= all_perms
    if name.startswith("A"):  # even permutations: an even number of transpositions sorts them
        for p in g.elements:
            p, swaps = list(p), 0
            for i in range(n):
                while p[i] != i:
                    j = p[i]
                    p[i], p[j] = p[j], p[i]
                    swaps += 1
            assert swaps % 2 == 0


def _brute_force_products(elements, xs):
    """Running products by explicitly composing permutations (a list mapping i -> image):
    p_t[i] = x_t[p_{t-1}[i]] ("apply p_{t-1}, then x_t")."""
    state = list(range(len(elements[0])))
    out = []
    for x in xs:
        perm = elements[x]
        state = [perm[s] for s in state]
        out.append(elements.index(tuple(state)))
    return out


def test_composition_convention():
    # a = swap(0,1), b = swap(1,2): "a then b" sends 0 -> 1 -> 2, 1 -> 0 -> 0, 2 -> 2 -> 1
    assert syn.compose((1, 0, 2), (0, 2, 1)) == (2, 0, 1)
    g = syn.PermutationGroup("S3")
    a, b = g.elements.index((1, 0, 2)), g.elements.index((0, 2, 1))
    assert g.elements[g.table[a, b]] == (2, 0, 1)
    assert g.table[a, b] != g.table[b, a]  # S3 is not abelian: the order matters


@pytest.mark.parametrize("group", ["S3", "S5", "A5"])
def test_state_tracking_labels_brute_force(group):
    task = syn.StateTracking(seq_len=40, group=group)
    g = syn.PermutationGroup(group)
    src = syn.TaskSource(task, seed=3)
    for i in range(6):
        row = src[i]
        xs = row["tokens"].tolist()
        assert all(0 <= x < g.order for x in xs)
        assert row["targets"].tolist() == _brute_force_products(g.elements, xs)
        assert row["loss_mask"].tolist() == [1.0] * 40  # every position scored
        assert row["segment_ids"].tolist() == [1] * 40
        assert row["positions"].tolist() == list(range(40))
    assert task.vocab_size == g.order


def test_state_tracking_tokens_cover_group():
    xs = np.concatenate([syn.TaskSource(syn.StateTracking(64, "S3"), 0)[i]["tokens"] for i in range(20)])
    counts = np.bincount(xs, minlength=6)
    assert counts.min() > 0.1 * len(xs) / 6  # roughly uniform over all 6 elements


# --------------------------------------------------------------------------------------------
# MQAR


def _check_mqar_row(task: syn.MQAR, row, d: int | None = None):
    """Re-derive what an MQAR row with ``d`` pairs (default ``task.num_pairs``) must be from its tokens alone."""
    T = task.seq_len
    tok, tgt, mask = row["tokens"], row["targets"], row["loss_mask"]
    assert tgt[:-1].tolist() == tok[1:].tolist()  # next-token targets
    d = task.num_pairs if d is None else d
    keys = [int(k) for k in tok[0 : 2 * d : 2]]
    values = [int(v) for v in tok[1 : 2 * d : 2]]
    assert len(set(keys)) == d
    key_range = range(1, 1 + task.num_keys)
    value_range = range(1 + task.num_keys, 1 + task.num_keys + task.num_values)
    assert all(k in key_range for k in keys) and all(v in value_range for v in values)
    kv = dict(zip(keys, values, strict=True))
    scored = [t for t in range(T) if mask[t] == 1.0]
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    assert len(scored) == min(task.num_queries, d)
    assert all(t >= 2 * d for t in scored)
    queried = [int(tok[t]) for t in scored]
    assert len(set(queried)) == len(queried)  # distinct keys
    for t in scored:
        assert int(tok[t]) in kv and int(tgt[t]) == kv[int(tok[t])]
    # outside the pairs, every token is filler, a scored query key, or the value right after one
    allowed = set(scored) | {t + 1 for t in scored}
    for t in range(2 * d, T):
        if t not in allowed:
            assert tok[t] == syn.FILLER


@pytest.mark.parametrize(
    ("seq_len", "pairs", "queries"), [(64, 4, None), (128, 8, 3), (17, 4, 4), (256, 16, None)]
)
def test_mqar_brute_force(seq_len, pairs, queries):
    task = syn.MQAR(seq_len=seq_len, num_pairs=pairs, num_keys=24, num_values=24, num_queries=queries)
    src = syn.TaskSource(task, seed=7)
    for i in range(10):
        _check_mqar_row(task, src[i])
    assert task.vocab_size == 49


def _pairs_of(row) -> int:
    """The number of key-value pairs at the start of an MQAR row (keys and values alternate, then filler or
    the first query key: a key where a value would be)."""
    tok, d = row["tokens"], 0
    while 2 * d + 1 < len(tok) and tok[2 * d] != syn.FILLER and tok[2 * d + 1] != syn.FILLER:
        if d and tok[2 * d] in set(tok[0 : 2 * d : 2].tolist()):  # a repeated key: the query region began
            break
        d += 1
    return d


def test_mqar_min_pairs_trains_on_fewer_pairs_and_scores_on_all():
    task = syn.MQAR(seq_len=64, num_pairs=12, num_keys=24, num_values=24, num_queries=8, min_pairs=2)
    train, seen = syn.TaskSource(task, seed=3), set()
    for i in range(60):
        row = train[i]
        mask = row["loss_mask"]
        first_query = int(np.flatnonzero(mask)[0])
        d = _pairs_of({"tokens": row["tokens"][:first_query]})
        assert 2 <= d <= 12
        _check_mqar_row(task, row, d)
        seen.add(d)
    assert len(seen) >= 8  # roughly uniform over 2..12
    held = syn.TaskSource(task, seed=3, stream=syn.EVAL_STREAM, length=10)
    for i in range(10):
        _check_mqar_row(task, held[i])  # held-out rows: always num_pairs pairs
    # without min_pairs the training stream is the task itself (unchanged by the option's existence)
    plain = syn.MQAR(seq_len=64, num_pairs=12, num_keys=24, num_values=24, num_queries=8)
    np.testing.assert_array_equal(
        syn.TaskSource(plain, 3)[0]["tokens"], plain.example(syn._rng(3, 0, 0))["tokens"]
    )


def _decode_pair(task, token: int) -> tuple[int, int]:
    """A joint pair token -> (key token, value token), by searching every (key, value) combination."""
    for k in range(task.num_keys):
        for v in range(task.num_values):
            if token == task.vocab_size - task.num_keys * task.num_values + k * task.num_values + v:
                return 1 + k, 1 + task.num_keys + v
    raise AssertionError(f"{token} is not a pair token")


@pytest.mark.parametrize(("seq_len", "pairs", "queries"), [(64, 32, None), (40, 8, 3), (9, 4, 5), (24, 1, 1)])
def test_mqar_joint_brute_force(seq_len, pairs, queries):
    """joint: pair tokens first (each decodes to a distinct key and a value), then one-token slots: the
    queried keys (scored, target = that key's value) and filler; unscored targets are the next token."""
    queries = pairs if queries is None else min(queries, pairs)
    task = syn.MQAR(seq_len, pairs, num_keys=40, num_values=6, num_queries=queries, joint=True)
    assert task.vocab_size == 1 + 40 + 6 + 40 * 6
    src = syn.TaskSource(task, seed=5, stream=syn.EVAL_STREAM, length=12)
    starts = set()
    for i in range(12):
        tok, tgt, mask = (src[i][k].tolist() for k in ("tokens", "targets", "loss_mask"))
        kv = dict(_decode_pair(task, t) for t in tok[:pairs])
        assert len(kv) == pairs  # distinct keys
        scored = [t for t in range(seq_len) if mask[t] == 1.0]
        assert len(scored) == queries and min(scored) >= pairs
        assert len({tok[t] for t in scored}) == queries  # each key queried at most once
        for t in range(pairs, seq_len):
            if t in scored:
                assert tgt[t] == kv[tok[t]]
            else:
                assert tok[t] == syn.FILLER
        for t in range(seq_len):
            if t not in scored:
                assert tgt[t] == (tok[t + 1] if t + 1 < seq_len else syn.FILLER)
        assert not any(mask[:pairs])
        starts.add(min(scored))
    if seq_len - pairs > queries:
        assert len(starts) > 1  # the query slots move
    with pytest.raises(ValueError, match="needs seq_len >= 8"):
        syn.MQAR(7, 4, joint=True)


def test_mqar_joint_curriculum():
    task = syn.MQAR(48, 16, num_keys=20, num_values=5, min_pairs=2, joint=True)
    seen = set()
    for i in range(40):
        row = syn.TaskSource(task, seed=1)[i]
        d = sum(int(t) >= task.first_pair for t in row["tokens"])
        assert 2 <= d <= 16 and row["loss_mask"].sum() == d  # every pair queried
        seen.add(d)
    assert len(seen) >= 6


def test_mqar_validation():
    with pytest.raises(ValueError, match="min_pairs"):
        syn.MQAR(seq_len=64, num_pairs=4, min_pairs=5)
    with pytest.raises(ValueError, match="too short"):
        syn.MQAR(seq_len=16, num_pairs=5)
    with pytest.raises(ValueError, match="num_keys"):
        syn.MQAR(seq_len=128, num_pairs=10, num_keys=8)
    with pytest.raises(ValueError, match="not supported"):
        syn.StateTracking(seq_len=8, group="S7")
    with pytest.raises(ValueError, match="unknown parameter"):
        syn.make_task("mqar", 64, num_pairs=4, pairs=4)


# --------------------------------------------------------------------------------------------
# Sources, iterators, held-out sets


def test_sources_deterministic_resumable_and_heldout_disjoint():
    task = syn.MQAR(seq_len=32, num_pairs=4, num_keys=16, num_values=16)
    a, b = syn.TaskSource(task, 5), syn.TaskSource(task, 5)
    for i in (0, 1, 1000, 2**30):
        for k in syn.ROW_KEYS:
            np.testing.assert_array_equal(a[i][k], b[i][k])
    it = syn.train_iterator(task, local_batch=4, seed=5)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    later = next(it)
    it2 = syn.train_iterator(task, local_batch=4, seed=5)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["tokens"], later["tokens"])
    np.testing.assert_array_equal(first[1]["tokens"][2], a[6]["tokens"])  # step s = examples [4s, 4s+4)
    # two hosts split each global batch: host h takes examples h, h+2, ...
    h1 = syn.train_iterator(task, local_batch=2, seed=5, process_index=1, process_count=2)
    np.testing.assert_array_equal(next(h1)["tokens"], np.stack([a[1]["tokens"], a[3]["tokens"]]))
    held = syn.heldout_batches(task, num_examples=16, local_batch=8, seed=5)
    assert len(held) == 2 and held[0]["tokens"].shape == (8, 32)
    train_rows = {a[i]["tokens"].tobytes() for i in range(200)}
    assert not any(r.tobytes() in train_rows for batch in held for r in batch["tokens"])
    with pytest.raises(ValueError, match="multiple of the global batch"):
        syn.heldout_batches(task, num_examples=10, local_batch=8, seed=5)


# --------------------------------------------------------------------------------------------
# The exact accuracy metric


def _brute_force_counts(logits, targets, mask):
    out = {"correct": 0, "scored": 0, "rows_correct": 0, "rows": 0, "last_correct": 0, "ce_sum": 0.0}
    for b in range(logits.shape[0]):
        scored = [t for t in range(logits.shape[1]) if mask[b, t] > 0]
        hits = []
        for t in scored:
            best = max(range(logits.shape[2]), key=lambda v: (logits[b, t, v], -v))  # first max wins
            hits.append(best == targets[b, t])
            z = logits[b, t].astype(np.float64)
            out["ce_sum"] += float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[targets[b, t]])
        out["correct"] += sum(hits)
        out["scored"] += len(scored)
        if scored:
            out["rows"] += 1
            out["rows_correct"] += all(hits)
            out["last_correct"] += hits[-1]
    return out


def test_accuracy_sums_exact():
    rng = np.random.default_rng(0)
    B, T, V = 6, 9, 5
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    logits[0, 3] = 1.0  # a tie: argmax takes the first (token 0)
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 3] = 0
    # plant correct answers: row 1 fully correct, row 2 has no scored positions
    targets[1] = logits[1].argmax(-1)
    mask = (rng.random((B, T)) < 0.5).astype(np.float32)
    mask[0, 3] = 1.0
    mask[1, :] = 1.0
    mask[2, :] = 0.0
    sums = jax.jit(accuracy_sums)
    got = total([sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))])
    want = _brute_force_counts(logits, targets, mask)
    for k in ("correct", "scored", "rows_correct", "rows", "last_correct"):
        assert got[k] == want[k], k
    assert got["ce_sum"] == pytest.approx(want["ce_sum"], rel=1e-5)
    assert got["rows"] == B - 1 and got["rows_correct"] >= 1
    m = finalize(got)
    assert m["accuracy"] == want["correct"] / want["scored"]
    assert m["last_accuracy"] == want["last_correct"] / want["rows"]
    assert m["seq_accuracy"] == want["rows_correct"] / want["rows"]
    # summing over batches = one big batch
    halves = total(
        [
            sums(jnp.asarray(logits[s]), jnp.asarray(targets[s]), jnp.asarray(mask[s]))
            for s in (slice(0, 3), slice(3, 6))
        ]
    )
    assert {k: halves[k] for k in halves if k != "ce_sum"} == {k: got[k] for k in got if k != "ce_sum"}
    assert np.isnan(finalize({k: 0 for k in got})["accuracy"])


# --------------------------------------------------------------------------------------------
# The combined task: recall interleaved with state updates


def _check_recall_state_row(task: syn.RecallState, row):
    """Re-derive every label of a recall_state row from its tokens alone (independent parse)."""
    g = syn.PermutationGroup(task.group)
    tok, tgt, mask = row["tokens"].tolist(), row["targets"].tolist(), row["loss_mask"].tolist()
    T, d = task.seq_len, task.num_pairs
    first_value, first_el = 1 + task.num_keys, 1 + task.num_keys + task.num_values
    keys, values = tok[0 : 2 * d : 2], tok[1 : 2 * d : 2]
    assert all(1 <= k < first_value for k in keys) and len(set(keys)) == d
    assert all(first_value <= v < first_el for v in values)
    kv = dict(zip(keys, values, strict=True))
    perm = list(range(g.degree))  # running product as an explicit permutation
    n_moves = n_queries = 0
    t = 2 * d
    while t < T:
        x = tok[t]
        if x >= first_el:  # a state update: apply the element, the target is the product so far
            elem = g.elements[x - first_el]
            perm = [elem[p] for p in perm]
            assert mask[t] == 1.0 and tgt[t] == first_el + g.elements.index(tuple(perm))
            n_moves, t = n_moves + 1, t + 1
        else:  # a query slot: key (scored, target its value) then the value (not scored)
            assert x in kv and mask[t] == 1.0 and tgt[t] == kv[x]
            assert t + 1 < T and tok[t + 1] == kv[x] and mask[t + 1] == 0.0
            n_queries, t = n_queries + 1, t + 2
    assert n_moves == task.num_moves and n_queries == task.num_queries
    queried = [tok[t] for t in range(2 * d, T) if mask[t] == 1.0 and tok[t] < first_el]
    assert len(set(queried)) == len(queried)  # distinct keys
    assert all(m == 0.0 for m in mask[: 2 * d])  # the pairs are not scored
    # unscored positions predict the next token
    for t in range(T - 1):
        if mask[t] == 0.0:
            assert tgt[t] == tok[t + 1]
    assert max(tok) < task.vocab_size and max(tgt) < task.vocab_size


@pytest.mark.parametrize(
    ("seq_len", "pairs", "queries", "group"),
    [(64, 8, None, "S3"), (40, 4, 2, "A5"), (17, 2, 2, "S4"), (9, 1, 1, "S3")],
)
def test_recall_state_brute_force(seq_len, pairs, queries, group):
    task = syn.RecallState(
        seq_len=seq_len, num_pairs=pairs, num_queries=queries, group=group, num_keys=16, num_values=12
    )
    src = syn.TaskSource(task, seed=11)
    positions = set()
    for i in range(25):
        row = src[i]
        _check_recall_state_row(task, row)
        positions.add(tuple(np.flatnonzero(row["tokens"] < task.first_element)))
    assert len(positions) > 1  # query slots land at different places
    assert task.state_from == task.first_element == 29
    assert task.vocab_size == 29 + syn.PermutationGroup(group).order


@pytest.mark.parametrize(("seq_len", "pairs", "queries"), [(64, 10, None), (20, 3, 2), (9, 4, 4)])
def test_recall_state_joint_brute_force(seq_len, pairs, queries):
    """joint: pair tokens, then group elements (target: the running product, by explicit composition) and
    one-token queries (target: the value of that key) interleaved; nothing else is scored."""
    g = syn.PermutationGroup("S3")
    task = syn.RecallState(seq_len, pairs, num_queries=queries, num_keys=10, num_values=4, joint=True)
    queries = pairs if queries is None else queries
    first_el = 1 + 10 + 4
    assert task.first_pair == first_el + 6 and task.vocab_size == first_el + 6 + 40
    assert task.num_moves == seq_len - pairs - queries
    src = syn.TaskSource(task, seed=2)
    for i in range(15):
        tok, tgt, mask = (src[i][k].tolist() for k in ("tokens", "targets", "loss_mask"))
        kv = dict(_decode_pair(task, t) for t in tok[:pairs])
        assert len(kv) == pairs
        perm, n_moves, queried = list(range(3)), 0, []
        for t in range(pairs, seq_len):
            x = tok[t]
            assert mask[t] == 1.0  # after the pairs every position is a move or a query
            if first_el <= x < task.first_pair:
                elem = g.elements[x - first_el]
                perm = [elem[p] for p in perm]
                assert tgt[t] == first_el + g.elements.index(tuple(perm))
                n_moves += 1
            else:
                assert x in kv and tgt[t] == kv[x]
                queried.append(x)
        assert n_moves == task.num_moves and len(queried) == len(set(queried)) == queries
        assert not any(mask[:pairs])
    with pytest.raises(ValueError, match="no room"):
        syn.RecallState(8, 4, joint=True)


def test_recall_state_validation_and_make_task():
    with pytest.raises(ValueError, match="no room"):
        syn.RecallState(seq_len=16, num_pairs=4)  # 8 + 8 tokens leave no group element
    with pytest.raises(ValueError, match="num_keys"):
        syn.RecallState(seq_len=64, num_pairs=10, num_keys=8)
    t = syn.make_task("recall_state", 32, num_pairs=4, group="S3")
    assert isinstance(t, syn.RecallState) and t.num_queries == 4 and t.num_moves == 16


def test_accuracy_state_split_brute_force():
    """state_from splits the counts by target id: state_* over targets >= state_from, recall the rest."""
    rng = np.random.default_rng(1)
    B, T, V, cut = 5, 11, 9, 6
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    targets[0] = logits[0].argmax(-1)  # plant hits
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    got = total([accuracy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), cut)])
    pred = logits.argmax(-1)
    scored = mask > 0
    state = scored & (targets >= cut)
    assert got["state_scored"] == state.sum() and got["state_correct"] == (state & (pred == targets)).sum()
    assert got["correct"] == (scored & (pred == targets)).sum()
    m = finalize(got)
    recall = scored & (targets < cut)
    assert m["state_accuracy"] == (pred == targets)[state].mean()
    assert m["recall_accuracy"] == (pred == targets)[recall].mean()
    assert m["balanced_accuracy"] == pytest.approx((m["state_accuracy"] + m["recall_accuracy"]) / 2)
    # without a split, no state metrics
    plain = finalize(total([accuracy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))]))
    assert "state_accuracy" not in plain and plain["accuracy"] == m["accuracy"]
