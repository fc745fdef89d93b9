"""Packing invariants (brute force), shuffling, per-host sharding, exact iterator resume, eval, global batches."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from train.data import store as store_mod
from train.data.packing import ROW_KEYS, PackedRows
from train.data.pipeline import eval_batches, make_global_batch, row_dataset, train_dataset, train_iterator
from train.data.prepare import prepare
from train.data.store import StoreWriter, TokenStore, new_manifest

EOS, PAD = 256, 257


@pytest.fixture(scope="module")
def docs() -> list[np.ndarray]:
    """Random documents (each ending with EOS) of lengths from 1 to several rows long."""
    rng = np.random.default_rng(1234)
    lengths = [1, 2, 5, 16, 17, 40, 3, 1, 33, 7, 64, 2, 9, 15, 1, 28]
    return [np.append(rng.integers(0, 256, size=n - 1), EOS) for n in lengths]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, docs) -> str:
    path = str(tmp_path_factory.mktemp("packstore"))
    m = new_manifest(
        tokenizer={"kind": "byte"}, vocab_size=258, eos_id=EOS, pad_id=PAD, chunk_tokens=32, inputs=[]
    )
    store_mod.write_manifest(path, m)
    w = StoreWriter(path, m)
    for i, d in enumerate(docs):
        w.append("eval" if i % 4 == 3 else "train", d, [len(d)])
    w.finalize()
    return path


def _split_docs(docs, split):
    return [d for i, d in enumerate(docs) if (i % 4 == 3) == (split == "eval")]


@pytest.mark.parametrize("seq_len", [1, 8, 16, 23])
def test_packing_invariants_brute_force(store_path, docs, seq_len):
    train_docs = _split_docs(docs, "train")
    stream = np.concatenate(train_docs)
    doc_of = [
        i for i, d in enumerate(train_docs) for _ in range(len(d))
    ]  # brute-force document of each token
    doc_start = [sum(len(d) for d in train_docs[:i]) for i in range(len(train_docs))]
    n, T = len(stream), seq_len
    rows = list(row_dataset(store_path, seq_len))
    assert len(rows) == -(-n // T)

    seen_inputs, trained_targets = [], []
    for r, row in enumerate(rows):
        assert set(row) == set(ROW_KEYS)
        assert all(row[k].shape == (T,) for k in ROW_KEYS)
        assert row["loss_mask"].dtype == np.float32 and row["tokens"].dtype == np.int32
        for t in range(T):
            p = r * T + t
            if p >= n:  # padding
                assert (row["tokens"][t], row["segment_ids"][t], row["loss_mask"][t]) == (PAD, 0, 0.0)
                assert (row["positions"][t], row["targets"][t]) == (0, PAD)
                continue
            seen_inputs.append(row["tokens"][t])
            assert row["tokens"][t] == stream[p]
            # segment ids: start at 1, +1 exactly when the document changes within the row
            if t == 0:
                assert row["segment_ids"][t] == 1
            else:
                step = row["segment_ids"][t] - row["segment_ids"][t - 1]
                assert step == (1 if doc_of[p] != doc_of[p - 1] else 0)
            assert row["positions"][t] == p - max(doc_start[doc_of[p]], r * T)
            same_doc_next = p + 1 < n and doc_of[p + 1] == doc_of[p]
            assert row["loss_mask"][t] == float(same_doc_next)
            assert row["targets"][t] == (stream[p + 1] if p + 1 < n else PAD)
            if same_doc_next:
                trained_targets.append((doc_of[p + 1], p + 1 - doc_start[doc_of[p]]))
            else:  # the only untrained real targets: a document's EOS (next doc's first token) or end of stream
                assert stream[p] == EOS
    # every token of every document appears exactly once, in order, as an input
    np.testing.assert_array_equal(seen_inputs, stream)
    # every token except each document's first is a trained target exactly once
    want = [(i, j) for i, d in enumerate(train_docs) for j in range(1, len(d))]
    assert trained_targets == want


def test_packing_matches_model_position_convention(store_path):
    """positions == position derived from segment_ids alone (restart at each segment start)."""
    for row in row_dataset(store_path, 16):
        seg = row["segment_ids"]
        derived = np.zeros_like(seg)
        for t in range(1, len(seg)):
            derived[t] = derived[t - 1] + 1 if seg[t] == seg[t - 1] and seg[t] > 0 else 0
        np.testing.assert_array_equal(np.where(seg > 0, row["positions"], 0), np.where(seg > 0, derived, 0))


def _rows_as_keys(batch) -> list[bytes]:
    return [
        batch["tokens"][i].tobytes() + batch["segment_ids"][i].tobytes() for i in range(len(batch["tokens"]))
    ]


def test_deterministic_shuffle(store_path):
    kw = dict(seq_len=8, local_batch=2, process_index=0, process_count=1)
    a = [train_dataset(store_path, seed=7, **kw)[i] for i in range(6)]
    b = [train_dataset(store_path, seed=7, **kw)[i] for i in range(6)]
    c = [train_dataset(store_path, seed=8, **kw)[i] for i in range(6)]
    for x, y in zip(a, b, strict=True):
        for k in ROW_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c, strict=True))
    # one epoch, batch 1: a permutation of the unshuffled rows, not the identity; epoch 2 differs from epoch 1
    rows = [r["tokens"].tobytes() for r in row_dataset(store_path, 8)]
    n = len(rows)
    ep = train_dataset(
        store_path, seq_len=8, local_batch=1, seed=7, num_epochs=2, process_index=0, process_count=1
    )
    assert len(ep) == 2 * n
    order = [ep[i]["tokens"][0].tobytes() for i in range(2 * n)]
    assert sorted(order[:n]) == sorted(rows) and sorted(order[n:]) == sorted(rows)
    assert order[:n] != rows and order[:n] != order[n:]
    unshuffled = train_dataset(
        store_path, seq_len=8, local_batch=1, shuffle=False, num_epochs=1, process_index=0, process_count=1
    )
    assert [unshuffled[i]["tokens"][0].tobytes() for i in range(n)] == rows


def test_per_host_sharding_partitions_rows(store_path):
    kw = dict(seq_len=8, seed=3)
    single = train_dataset(store_path, local_batch=4, process_index=0, process_count=1, **kw)
    hosts = [
        train_dataset(store_path, local_batch=2, process_index=i, process_count=2, **kw) for i in range(2)
    ]
    n_rows = len(PackedRows(TokenStore(store_path), 8))
    for step in range(2 * n_rows):  # several epochs
        h0, h1 = _rows_as_keys(hosts[0][step]), _rows_as_keys(hosts[1][step])
        assert sorted(h0 + h1) == sorted(_rows_as_keys(single[step]))
    # within one epoch of a finite run, the hosts' rows are disjoint and cover every row once
    fin = [
        train_dataset(store_path, local_batch=1, num_epochs=1, process_index=i, process_count=2, **kw)
        for i in range(2)
    ]
    assert len(fin[0]) == len(fin[1]) == n_rows // 2
    got = [fin[h][s]["tokens"][0].tobytes() for h in range(2) for s in range(len(fin[h]))]
    assert len(set(got)) == len(got)
    all_rows = {r["tokens"].tobytes() for r in row_dataset(store_path, 8)}
    assert set(got) <= all_rows and len(got) == n_rows // 2 * 2


def test_iterator_resume_is_exact(store_path):
    kw = dict(seq_len=8, local_batch=3, seed=11, process_index=0, process_count=1, num_threads=2, prefetch=3)
    it = train_iterator(store_path, **kw)
    for _ in range(5):
        next(it)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    want = [next(it) for _ in range(7)]
    fresh = train_iterator(store_path, **kw)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(7)]
    for w, g in zip(want, got, strict=True):
        for k in ROW_KEYS:
            np.testing.assert_array_equal(w[k], g[k])
    # and the uninterrupted sequence equals random access by step
    ds = train_dataset(store_path, **{k: v for k, v in kw.items() if k not in ("num_threads", "prefetch")})
    for i, w in enumerate(want):
        np.testing.assert_array_equal(ds[5 + i]["tokens"], w["tokens"])


def test_eval_batches_cover_eval_split_once(store_path, docs):
    stream = np.concatenate(_split_docs(docs, "eval"))
    T, lb = 8, 2
    per_host = [
        list(eval_batches(store_path, seq_len=T, local_batch=lb, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert len(per_host[0]) == len(per_host[1]) > 0
    tokens = []
    for batches in per_host:
        for b in batches:
            assert b["tokens"].shape == (lb, T) and b["loss_mask"].shape == (lb, T)
            real = b["segment_ids"] > 0
            assert np.all(b["loss_mask"][~real] == 0)
            tokens.append(b["tokens"][real])
    assert sorted(np.concatenate(tokens).tolist()) == sorted(stream.tolist())
    again = list(eval_batches(store_path, seq_len=T, local_batch=lb, process_index=0, process_count=2))
    np.testing.assert_array_equal(again[0]["tokens"], per_host[0][0]["tokens"])  # re-iterable, fixed
    one = list(
        eval_batches(store_path, seq_len=T, local_batch=lb, process_index=0, process_count=1, max_batches=1)
    )
    assert len(one) == 1


def test_make_global_batch(store_path):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    local = train_dataset(store_path, seq_len=8, local_batch=8, process_index=0, process_count=1)[0]
    g = make_global_batch(local, mesh, PartitionSpec(("data", "fsdp")))
    for k in ROW_KEYS:
        assert g[k].shape == (8, 8) and g[k].dtype == local[k].dtype
        np.testing.assert_array_equal(np.asarray(g[k]), local[k])
        assert len(g[k].addressable_shards) == 8 and g[k].addressable_shards[0].data.shape == (1, 8)
    assert make_global_batch(local, mesh)["tokens"].sharding.spec == PartitionSpec(("data", "fsdp"))
    small = train_dataset(store_path, seq_len=8, local_batch=6, process_index=0, process_count=1)[0]
    with pytest.raises(ValueError, match="not divisible"):
        make_global_batch(small, mesh, PartitionSpec(("data", "fsdp")))


def test_pipeline_errors(store_path, tmp_path):
    with pytest.raises(ValueError, match="process_index"):
        train_dataset(store_path, seq_len=8, local_batch=1, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seq_len"):
        PackedRows(TokenStore(store_path), 0)
    with pytest.raises(ValueError, match="global batch"):
        train_dataset(store_path, seq_len=64, local_batch=64, num_epochs=1, process_index=0, process_count=1)
    empty = tmp_path / "empty"
    (empty / "a.txt").parent.mkdir()
    (empty / "a.txt").write_text("")
    prepare([str(empty / "a.txt")], tmp_path / "st", "byte", eval_fraction=0.0, workers=1, progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        train_dataset(tmp_path / "st", seq_len=8, local_batch=1, process_index=0, process_count=1)


def test_stdlib_end_to_end(tmp_path):
    """The demo path: embedded corpus -> byte store -> packed batches that decode back to source text."""
    out = tmp_path / "stdlib"
    prepare(["stdlib"], out, "byte", eval_fraction=0.0, stdlib_max_files=3, workers=1, progress=False)
    st = TokenStore(out)
    rows = row_dataset(st, 64)
    row = rows[0]
    seg1 = row["segment_ids"] == 1
    text = st.tokenizer().decode(row["tokens"][seg1])
    assert st.tokenizer().decode(st.document(0)).startswith(text)
