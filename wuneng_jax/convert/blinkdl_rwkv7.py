"""Load and export BlinkDL RWKV-7 (x070) state dicts.

``load_rwkv7(state_dict_or_path) -> (RWKV7Config, RWKV7)`` builds the model from a mapping of arrays with
BlinkDL's key names (``rwkv7-and-kernels.md`` §7.2) or from a ``.safetensors``, ``.npz`` or ``.pth`` file
(``.pth`` needs ``torch``). Shapes define the config: ``C`` from ``emb.weight``, ``H, N`` from
``att.r_k``, the LoRA ranks, ffn width and vocabulary from their matrices. ``export_rwkv7(model)`` gives
the state dict back (numpy, BlinkDL names and shapes); ``export(load(sd))`` reproduces every used
tensor bitwise.

Layer 0's ``att.v0/v1/v2`` exist in BlinkDL checkpoints but are never used (layer 0 produces
``v_first``); the loader ignores them and the exporter writes zeros of the right shapes so BlinkDL's
``rwkv`` package, which reads them, still loads the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wuneng_jax.convert.safetensors_io import read_safetensors, write_safetensors
from wuneng_jax.layers.stack import per_layer_params, set_per_layer_params
from wuneng_jax.models.rwkv7 import RWKV7, RWKV7Config

_LAYER0_UNUSED = ("v0", "v1", "v2")


def _layer_entries(cfg: RWKV7Config, i: int) -> list[tuple[str, tuple[Any, ...], str, tuple[int, ...]]]:
    c, h, n, f = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dim_ffn
    pre = f"blocks.{i}."
    path = ("blocks", i)
    out: list[tuple[str, tuple[Any, ...], str, tuple[int, ...]]] = []
    if i == 0:
        out += [
            (pre + "ln0.weight", path + ("ln0", "scale"), "same", (c,)),
            (pre + "ln0.bias", path + ("ln0", "bias"), "same", (c,)),
        ]
    for ln in ("ln1", "ln2"):
        out += [
            (pre + f"{ln}.weight", path + (ln, "scale"), "same", (c,)),
            (pre + f"{ln}.bias", path + (ln, "bias"), "same", (c,)),
        ]
    att = path + ("att",)
    vecs = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"]
    loras = [("w", cfg.d_decay), ("a", cfg.d_aaa), ("g", cfg.d_gate)]
    if i > 0:
        vecs.append("v0")
        loras.append(("v", cfg.d_mv))
    out += [(pre + f"att.{name}", att + (name,), "vec", (1, 1, c)) for name in vecs]
    for p, rank in loras:
        out += [
            (pre + f"att.{p}1", att + (f"{p}1",), "same", (c, rank)),
            (pre + f"att.{p}2", att + (f"{p}2",), "same", (rank, c)),
        ]
    out.append((pre + "att.r_k", att + ("r_k",), "same", (h, n)))
    for name in ("receptance", "key", "value", "output"):
        out.append((pre + f"att.{name}.weight", att + (name,), "linear", (c, c)))
    out += [
        (pre + "att.ln_x.weight", att + ("ln_x", "scale"), "same", (c,)),
        (pre + "att.ln_x.bias", att + ("ln_x", "bias"), "same", (c,)),
        (pre + "ffn.x_k", path + ("ffn", "x_k"), "vec", (1, 1, c)),
        (pre + "ffn.key.weight", path + ("ffn", "key"), "linear", (f, c)),
        (pre + "ffn.value.weight", path + ("ffn", "value"), "linear", (c, f)),
    ]
    return out


def key_table(cfg: RWKV7Config) -> list[tuple[str, tuple[Any, ...], str, tuple[int, ...]]]:
    """Every BlinkDL key the model uses: ``(key, model attribute path, kind, BlinkDL shape)``."""
    c, v = cfg.n_embd, cfg.vocab_size
    table = [("emb.weight", ("emb",), "same", (v, c))]
    for i in range(cfg.n_layer):
        table += _layer_entries(cfg, i)
    table += [
        ("ln_out.weight", ("ln_out", "scale"), "same", (c,)),
        ("ln_out.bias", ("ln_out", "bias"), "same", (c,)),
        ("head.weight", ("head",), "linear", (v, c)),
    ]
    return table


def _to_model(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "vec":
        return x.reshape(-1)
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    return x


def _to_blinkdl(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "vec":
        return x.reshape(1, 1, -1)
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    return x


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return np.asarray(jnp.asarray(t.float().numpy()).astype(jnp.bfloat16))
        return t.numpy()
    return np.asarray(x)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a BlinkDL state dict from ``.safetensors``, ``.npz`` or ``.pth`` (needs ``torch``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"read_state_dict: no such file {str(p)!r}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(p)
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"reading {str(p)!r} needs PyTorch, which is not installed: `pip install torch` (CPU build is "
                "enough), or convert the checkpoint to .safetensors elsewhere"
            ) from e
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping):
            raise ValueError(
                f"{str(p)!r} does not hold a state dict (a mapping of tensors), got {type(sd).__name__}"
            )
        return {k: _to_numpy(v) for k, v in sd.items()}
    raise ValueError(
        f"read_state_dict: unsupported file type {suffix!r} for {str(p)!r}; use .safetensors, .npz or .pth"
    )


# ----------------------------------------------------------------------------------------------------
# Config from shapes, load, export
# ----------------------------------------------------------------------------------------------------


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"BlinkDL RWKV-7 state dict: missing key {key!r} (is this an x070 checkpoint?)")
    return tuple(int(d) for d in np.shape(sd[key]))


def config_from_state_dict(sd: Mapping[str, Any], **overrides: Any) -> RWKV7Config:
    """An :class:`RWKV7Config` whose shapes match the BlinkDL state dict ``sd`` (``overrides`` set
    non-shape fields such as ``dtype``, ``param_dtype``, ``wkv_impl``)."""
    vocab, c = _shape(sd, "emb.weight")
    h, n = _shape(sd, "blocks.0.att.r_k")
    layer_ids = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    n_layer = max(layer_ids) + 1
    missing_layers = sorted(set(range(n_layer)) - layer_ids)
    if missing_layers:
        raise ValueError(
            f"BlinkDL RWKV-7 state dict: layers {missing_layers} have no keys (found up to {n_layer - 1})"
        )
    if h * n != c:
        raise ValueError(
            f"BlinkDL RWKV-7 state dict: att.r_k is [H,N]=[{h},{n}] but emb.weight has C={c} != H*N"
        )
    v_src = "blocks.1.att.v1" if n_layer > 1 else "blocks.0.att.v1"
    fields = dict(
        vocab_size=vocab,
        n_embd=c,
        n_layer=n_layer,
        head_size=n,
        dim_ffn=_shape(sd, "blocks.0.ffn.key.weight")[0],
        d_decay=_shape(sd, "blocks.0.att.w1")[1],
        d_aaa=_shape(sd, "blocks.0.att.a1")[1],
        d_gate=_shape(sd, "blocks.0.att.g1")[1],
        d_mv=_shape(sd, v_src)[1] if v_src in sd else None,
    )
    fields.update(overrides)
    return RWKV7Config(**fields)


def load_rwkv7(
    source: Mapping[str, Any] | str | os.PathLike,
    *,
    config_overrides: Mapping[str, Any] | None = None,
) -> tuple[RWKV7Config, RWKV7]:
    """Build an :class:`RWKV7` from a BlinkDL x070 state dict (mapping or file path).

    Args:
      source: a mapping of arrays (numpy, jax or torch tensors) with BlinkDL key names, or a path to a
        ``.safetensors`` / ``.npz`` / ``.pth`` file.
      config_overrides: non-shape config fields, e.g. ``{"dtype": "bfloat16", "wkv_impl": "chunked"}``.
    Returns:
      ``(cfg, model)``; parameters are cast to ``cfg.param_dtype`` (sharded if a mesh and rules are active).
    Raises:
      ValueError on missing or unexpected keys and shape mismatches (all listed at once).
    """
    sd = read_state_dict(source) if isinstance(source, str | os.PathLike) else source
    if not isinstance(sd, Mapping):
        raise ValueError(f"load_rwkv7: expected a mapping of arrays or a file path, got {type(sd).__name__}")
    cfg = config_from_state_dict(sd, **dict(config_overrides or {}))
    table = key_table(cfg)
    known = {key for key, *_ in table}
    ignored = {f"blocks.0.att.{name}" for name in _LAYER0_UNUSED}
    missing = [key for key in known if key not in sd]
    unexpected = sorted(k for k in sd if k not in known and k not in ignored)
    bad_shapes = [
        f"{key}: got {tuple(np.shape(sd[key]))}, expected {shape}"
        for key, _, _, shape in table
        if key in sd and tuple(np.shape(sd[key])) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    if bad_shapes:
        problems.append(f"shape mismatches ({len(bad_shapes)}): {bad_shapes[:20]}")
    if problems:
        raise ValueError(
            "load_rwkv7: the state dict does not match an RWKV-7 x070 model: " + "; ".join(problems)
        )

    model = nnx.eval_shape(lambda: RWKV7(cfg, rngs=nnx.Rngs(0)))
    values = {tuple(path): _to_model(_to_numpy(sd[key]), kind) for key, path, kind, _ in table}
    set_per_layer_params(model, values, cfg.param_dtype, where="load_rwkv7")
    return cfg, model


def export_rwkv7(model: RWKV7, *, include_unused: bool = True) -> dict[str, np.ndarray]:
    """The model's parameters as a BlinkDL x070 state dict of numpy arrays (exact names and shapes).

    Args:
      model: an :class:`RWKV7`.
      include_unused: also write layer 0's unused ``att.v0/v1/v2`` (zeros), which BlinkDL's ``rwkv``
        package expects to find.
    """
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    current = per_layer_params(model)
    for key, path, kind, shape in key_table(cfg):
        value = _to_blinkdl(np.asarray(jax.device_get(current[tuple(path)])), kind)
        assert value.shape == shape, (key, value.shape, shape)
        out[key] = value
    if include_unused:
        dt = np.asarray(model.emb[...][:0]).dtype
        c, dv = cfg.n_embd, cfg.d_mv
        out["blocks.0.att.v0"] = np.zeros((1, 1, c), dt)
        out["blocks.0.att.v1"] = np.zeros((c, dv), dt)
        out["blocks.0.att.v2"] = np.zeros((dv, c), dt)
    return out


def save_state_dict(sd: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a state dict to ``.safetensors`` or ``.npz`` (``.pth`` needs torch)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        write_safetensors(p, {k: np.asarray(v) for k, v in sd.items()})
    elif suffix == ".npz":
        np.savez(p, **{k: np.asarray(v) for k, v in sd.items()})
    elif suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"writing {str(p)!r} needs PyTorch: `pip install torch`, or save as .safetensors"
            ) from e
        torch.save({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}, str(p))
    else:
        raise ValueError(f"save_state_dict: unsupported file type {suffix!r}; use .safetensors, .npz or .pth")


__all__ = [
    "config_from_state_dict",
    "export_rwkv7",
    "key_table",
    "load_rwkv7",
    "read_state_dict",
    "save_state_dict",
]
