"""Local safetensors reading and writing with numpy (bfloat16 included, via ``ml_dtypes``).

The format: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
(plus optional ``__metadata__``), then the raw little-endian tensor bytes. Reading memory-maps the file,
so tensors are read on access. A Hugging Face checkpoint directory holds either ``model.safetensors`` or
shards listed in ``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES: dict[np.dtype, str] = {v: k for k, v in _DTYPES.items()}


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.path.getsize(path)
        if n > size - 8:
            raise ValueError(
                f"{path}: not a safetensors file (header length {n} exceeds the file size {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    return header, 8 + n


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as read-only numpy arrays (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    header, start = _header(path)
    header.pop("__metadata__", None)
    if not header:
        return {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dt = info.get("dtype")
        if dt not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
        dtype = _DTYPES[dt]
        shape = tuple(int(s) for s in info["shape"])
        b, e = (int(x) for x in info["data_offsets"])
        if e - b != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start + e > mm.size:
            raise ValueError(f"{path}: tensor {name!r} has inconsistent data_offsets {info['data_offsets']}")
        out[name] = mm[start + b : start + e].view(dtype).reshape(shape)
    return out


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` string map of a ``.safetensors`` file (empty if none)."""
    return dict(_header(Path(path))[0].get("__metadata__", {}) or {})


def write_safetensors(
    path: str | Path, tensors: Mapping[str, np.ndarray], metadata: dict | None = None
) -> None:
    """Write ``tensors`` (numpy arrays; bfloat16 via ml_dtypes) to one ``.safetensors`` file."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dtype not in _NAMES:
            raise ValueError(f"write_safetensors: tensor {name!r} has unsupported dtype {a.dtype}")
        a = np.ascontiguousarray(a, dtype=dtype)
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes(order="C"))


def read_safetensors_dir(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a Hugging Face checkpoint directory (single file or sharded with an index)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = path / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' mapping tensor names to shard files")
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{index} lists shard {shard!r}, but {shard_path} does not exist")
            tensors = read_safetensors(shard_path)
            listed = {k for k, v in weight_map.items() if v == shard}
            missing = sorted(listed - set(tensors))
            if missing:
                raise ValueError(f"{shard_path}: tensors listed in {INDEX_FILE} are missing: {missing}")
            extra = sorted(set(tensors) - listed)
            if extra:
                raise ValueError(f"{shard_path}: holds tensors that {INDEX_FILE} does not list: {extra}")
            out.update(tensors)
        return out
    single = path / SINGLE_FILE
    if single.is_file():
        return read_safetensors(single)
    found = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"{path}: no weights: neither {SINGLE_FILE} nor {INDEX_FILE} found (the directory holds {found}); copy the "
        "model's .safetensors files into it"
    )


def write_safetensors_dir(
    path: str | Path,
    tensors: Mapping[str, np.ndarray],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict | None = None,
) -> list[str]:
    """Write ``tensors`` into directory ``path`` as ``model.safetensors``, or, when they exceed
    ``max_shard_bytes``, as ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``
    (Hugging Face layout). Returns the file names written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    sizes = {k: np.asarray(v).nbytes for k, v in tensors.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        write_safetensors(path / SINGLE_FILE, tensors, metadata)
        return [SINGLE_FILE]
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(tensors):  # greedy, in name order
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, keys in zip(names, shards, strict=True):
        write_safetensors(path / fname, {k: tensors[k] for k in keys}, metadata)
        weight_map.update(dict.fromkeys(keys, fname))
    with open(path / INDEX_FILE, "w") as f:
        json.dump(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2
        )
    return [*names, INDEX_FILE]
