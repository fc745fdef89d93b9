"""grain pipelines over a token store: shuffled, per-host sharded, batched packed rows; global jax batches.

Train::

    ds = train_dataset("data/stdlib", seq_len=256, local_batch=8, seed=0)    # grain.MapDataset of batches
    it = train_iterator("data/stdlib", seq_len=256, local_batch=8, seed=0)   # grain.DatasetIterator
    batch = next(it)                # dict of numpy [local_batch, seq_len]  (keys: packing.ROW_KEYS)
    state = it.get_state()          # small dict; it.set_state(state) on a fresh iterator resumes exactly
    gbatch = make_global_batch(batch, mesh, P(("data", "fsdp")))           # dict of jax.Array [global_batch, T]

Batch keys (all ``[local_batch, seq_len]``): ``tokens`` int32, ``targets`` int32, ``segment_ids`` int32
(1, 2, ... per document in the row, 0 = padding), ``positions`` int32 (position within the segment),
``loss_mask`` float32 (1 = train on ``targets`` here). Conventions: ``train.data.packing``.

Order: rows (``packing.PackedRows``) -> global shuffle by ``seed`` (a new permutation each epoch) ->
repeat -> host ``process_index`` takes global rows ``process_index::process_count`` -> batches of
``local_batch``. Global step ``s`` therefore covers shuffled rows ``[s*G, (s+1)*G)`` with
``G = local_batch * process_count`` whatever the host count, each host holding its strided part.
Everything is a pure function of the row index, so resume is exact (``get_state``/``set_state``,
or simply ``train_dataset(...)[step]``).

Eval: the ``eval`` split, unshuffled, not repeated, padded with empty rows (loss mask 0) to whole
global batches, so every host runs the same number of batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.data.packing import PackedRows
from train.data.store import TokenStore


def open_store(store_or_path: TokenStore | str | os.PathLike, split: str) -> TokenStore:
    """A ``TokenStore`` (returned as is) or a store path opened at ``split``."""
    if isinstance(store_or_path, TokenStore):
        return store_or_path
    return TokenStore(store_or_path, split)


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if pc < 1 or not 0 <= pi < pc:
        raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
    return pi, pc


def row_dataset(
    store: TokenStore | str | os.PathLike, seq_len: int, *, split: str = "train"
) -> grain.MapDataset:
    """Unshuffled packed rows of one split (finite ``MapDataset`` of dicts of ``[seq_len]`` arrays)."""
    return grain.MapDataset.source(PackedRows(open_store(store, split), seq_len))


def train_dataset(
    store: TokenStore | str | os.PathLike,
    *,
    seq_len: int,
    local_batch: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str = "train",
) -> grain.MapDataset:
    """Batches ``[local_batch, seq_len]`` for this host: a random-access ``MapDataset`` (element i = step i).

    ``num_epochs=None`` repeats forever; with a finite count the rows are cut to a whole number of
    global batches so all hosts run the same number of steps. ``process_index``/``process_count``
    default to ``jax.process_index()``/``jax.process_count()``.
    """
    if local_batch < 1:
        raise ValueError(f"local_batch must be >= 1, got {local_batch}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    pi, pc = _host(process_index, process_count)
    ts_ = open_store(store, split)
    if ts_.num_tokens == 0:
        raise ValueError(f"split {split!r} of token store {ts_.path!r} has no tokens; prepare more data")
    ds = grain.MapDataset.source(PackedRows(ts_, seq_len))
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(num_epochs)
    global_batch = local_batch * pc
    if num_epochs is not None:
        n = len(ds) // global_batch * global_batch
        if n == 0:
            raise ValueError(
                f"{len(ds)} rows of split {split!r} do not fill one global batch of {global_batch}: "
                "use num_epochs=None (repeat) or a smaller batch / seq_len"
            )
        ds = ds[:n]
    return ds[pi::pc].batch(local_batch, drop_remainder=True)


def read_options(num_threads: int = 4, prefetch: int = 8) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def train_iterator(
    store: TokenStore | str | os.PathLike,
    *,
    seq_len: int,
    local_batch: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str = "train",
    num_threads: int = 4,
    prefetch: int = 8,
) -> grain.DatasetIterator:
    """``iter`` over ``train_dataset(...)`` with threaded prefetch; checkpoint it with
    ``get_state()``/``set_state()`` or ``grain.checkpoint.CheckpointSave/CheckpointRestore``."""
    ds = train_dataset(
        store,
        seq_len=seq_len,
        local_batch=local_batch,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        split=split,
    )
    return iter(ds.to_iter_dataset(read_options(num_threads, prefetch)))


def eval_dataset(
    store: TokenStore | str | os.PathLike,
    *,
    seq_len: int,
    local_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str = "eval",
    max_batches: int | None = None,
) -> grain.MapDataset:
    """Fixed eval batches ``[local_batch, seq_len]`` for this host: unshuffled, no repeat, padded with
    empty rows (loss mask 0) to whole global batches; at most ``max_batches`` per host. May be empty."""
    if local_batch < 1:
        raise ValueError(f"local_batch must be >= 1, got {local_batch}")
    pi, pc = _host(process_index, process_count)
    src = PackedRows(open_store(store, split), seq_len, pad_to_multiple=local_batch * pc)
    ds = grain.MapDataset.source(src)[pi::pc].batch(local_batch, drop_remainder=True)
    if max_batches is not None:
        ds = ds[: max(0, int(max_batches))]
    return ds


def eval_batches(
    store: TokenStore | str | os.PathLike,
    *,
    seq_len: int,
    local_batch: int,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str = "eval",
    max_batches: int | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Re-iterable eval batches (each ``iter()`` starts again from the first batch)."""
    ds = eval_dataset(
        store,
        seq_len=seq_len,
        local_batch=local_batch,
        process_index=process_index,
        process_count=process_count,
        split=split,
        max_batches=max_batches,
    )
    return ds.to_iter_dataset(read_options(num_threads, prefetch))


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, spec: PartitionSpec | tuple | None = None
) -> dict[str, jax.Array]:
    """Host-local ``[local_batch, ...]`` arrays -> global ``jax.Array`` ``[local_batch * process_count, ...]``.

    ``spec`` (default ``PartitionSpec(("data", "fsdp"))`` restricted to the mesh's axes) shards every
    array; its first entry must split across processes the way the hosts split the batch (every
    host's rows are one contiguous block of the global batch).
    """
    if spec is None:
        spec = PartitionSpec(tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or None)
    elif not isinstance(spec, PartitionSpec):
        spec = PartitionSpec(*spec)
    sharding = NamedSharding(mesh, spec)
    n_proc = jax.process_count()
    out = {}
    for key, x in local_batch.items():
        x = np.asarray(x)
        for dim, axes in enumerate(tuple(spec)[: x.ndim]):
            if axes is None:
                continue
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            shards = math.prod(mesh.shape[a] for a in names)
            size = x.shape[dim] * (n_proc if dim == 0 else 1)
            if size % shards:
                raise ValueError(
                    f"batch[{key!r}] dim {dim} has global size {size}, not divisible by the {shards} shards of "
                    f"mesh axes {names}: make the global batch a multiple of {shards}"
                )
        out[key] = jax.make_array_from_process_local_data(sharding, x)
    return out
