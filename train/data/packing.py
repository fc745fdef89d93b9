"""Packing a token store's stream into fixed-length rows (concatenate-and-split), by random access.

The split's documents (each ending with EOS) form one token stream ``s``. Row ``r`` holds

    tokens[t]  = s[r*T + t]          targets[t] = s[r*T + t + 1]          (t = 0 .. T-1)

so every token of the stream is an input exactly once (in order, row after row) and documents
longer than ``T`` simply continue in the next row. The last row is padded. Per row (all ``[T]``):

- ``segment_ids``: 1, 2, 3, ... for the successive documents (or document pieces) in the row; 0 on
  padding. Attention never crosses a segment boundary and the RWKV state resets where it changes.
- ``positions``: position within the segment (0 at the first token of each document piece in the
  row: a document continued from the previous row restarts at 0, as the model sees no earlier context).
  Equals what the model derives from ``segment_ids`` itself.
- ``loss_mask``: 1.0 where ``targets[t]`` is the next token of the *same document* as ``tokens[t]``,
  0.0 otherwise. So the target of a document's last text token is its EOS (trained), the target of
  the EOS (the next document's first token) is masked, and padding is masked. A target in the next
  row (``t = T-1``) of the same document is trained: every token except each document's first is a
  trained target exactly once.
- ``targets`` is PAD where there is no next token; ``tokens`` is PAD on padding.

Rows are pure functions of ``(store contents, T, r)``, so any shuffle/shard/resume over row indices
is exact.
"""

from __future__ import annotations

import numpy as np

from train.data.store import TokenStore

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def pack_window(
    window: np.ndarray, start: int, offsets: np.ndarray, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """One row from ``window = s[start : start + L]`` (``1 <= L <= seq_len + 1``) of a stream with document ``offsets``.

    Returns int32 ``tokens``, ``targets``, ``segment_ids``, ``positions`` and float32 ``loss_mask``, all ``[seq_len]``.
    """
    T = seq_len
    L = len(window)
    if not 1 <= L <= T + 1:
        raise ValueError(f"pack_window: window length {L} must be in [1, {T + 1}]")
    n_in = min(T, L)
    gpos = np.arange(start, start + L, dtype=np.int64)
    doc = np.searchsorted(offsets, gpos, side="right") - 1  # document index of each window token
    win = np.asarray(window, np.int32)

    tokens = np.full((T,), pad_id, np.int32)
    tokens[:n_in] = win[:n_in]
    targets = np.full((T,), pad_id, np.int32)
    targets[: L - 1] = win[1:]
    segment_ids = np.zeros((T,), np.int32)
    d = doc[:n_in]
    segment_ids[:n_in] = 1 + np.concatenate([[0], np.cumsum(d[1:] != d[:-1])])
    positions = np.zeros((T,), np.int32)
    positions[:n_in] = gpos[:n_in] - np.maximum(offsets[d], start)
    loss_mask = np.zeros((T,), np.float32)
    loss_mask[: L - 1] = doc[1:] == doc[:-1]
    return {
        "tokens": tokens,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": loss_mask,
    }


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding row (segment 0, loss mask 0): fills eval batches up to a fixed shape."""
    return {
        "tokens": np.full((seq_len,), pad_id, np.int32),
        "targets": np.full((seq_len,), pad_id, np.int32),
        "segment_ids": np.zeros((seq_len,), np.int32),
        "positions": np.zeros((seq_len,), np.int32),
        "loss_mask": np.zeros((seq_len,), np.float32),
    }


class PackedRows:
    """Random-access source of packed rows over one split of a token store (grain ``RandomAccessDataSource``).

    ``len`` = ``ceil(num_tokens / seq_len)``. With ``pad_to_multiple`` the length is rounded up with
    empty rows (used for eval, so every host gets the same number of full batches).
    """

    def __init__(self, token_store: TokenStore, seq_len: int, *, pad_to_multiple: int = 1):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        self.store = token_store
        self.seq_len = int(seq_len)
        self.num_rows = -(-token_store.num_tokens // self.seq_len)
        self._len = -(-self.num_rows // pad_to_multiple) * pad_to_multiple

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        r = int(r)
        if not 0 <= r < self._len:
            raise IndexError(f"row {r} is out of range for {self._len} rows")
        if r >= self.num_rows:
            return empty_row(self.seq_len, self.store.pad_id)
        T, n = self.seq_len, self.store.num_tokens
        start = r * T
        stop = min(start + T + 1, n)
        return pack_window(self.store.read(start, stop), start, self.store.offsets, T, self.store.pad_id)

    def __repr__(self) -> str:
        return f"PackedRows({self.store!r}, seq_len={self.seq_len}, rows={self.num_rows}, len={self._len})"
