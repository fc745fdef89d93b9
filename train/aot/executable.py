"""Saved compiled train steps: ``wuneng compile --save FILE`` writes one, ``wuneng train`` runs it
(config field ``compiled_step: FILE``).

A saved step is the serialised executable (``jax.experimental.serialize_executable``, MaxText's
``compiled_trainstep_file``) with metadata: the target (platform, device kind, device count, topology),
the mesh (axis sizes and the device ids in mesh order), the jax / jaxlib / libtpu versions and the
*step signature* (:func:`step_signature`: every config value the compiled program depends on). Before
``wuneng train`` runs a saved step, :func:`check_saved_step` compares all of it with the run and names
every difference; an executable compiled for something else would otherwise fail inside the runtime with
a shape or sharding error, or, worse, run with another batch shape, schedule or loss.

The compiled step is the plain cross-entropy step over all parameters (``train.train_step``): the
``pretrain`` and ``sft`` stages without ``stage.trainable`` / ``stage.freeze``. ``align`` and ``distill``
(a frozen teacher's parameters as a third input, another objective) and trainable-parameter selections
are refused (:func:`check_stage`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import jax

FORMAT = "wuneng-aot-1"

# Top-level config fields the compiled train step depends on (besides the model and the stage).
STEP_FIELDS: tuple[str, ...] = (
    "global_batch_size",
    "seq_len",
    "grad_accum_steps",
    "dtype",
    "remat",
    "z_loss",
    "loss_vocab_tile",
    "steps",  # the learning-rate schedule's length is compiled in
    "optimizer",
    "rules",
)


class SavedStepError(ValueError):
    """A saved compiled step cannot serve this run (wrong file, target, versions or config)."""


# --------------------------------------------------------------------------------------------
# Metadata


def versions(platform: str) -> dict[str, str | None]:
    """jax and jaxlib versions, and libtpu's when the target is a TPU (its compiler made the program)."""
    out = {"jax": jax.__version__, "jaxlib": _jaxlib()}
    if platform == "tpu":
        from train.aot.topology import libtpu_version

        out["libtpu"] = libtpu_version()
    return out


def _jaxlib() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def target_of(mesh: Any, topology: str | None = None) -> dict[str, Any]:
    """Platform, device kind and count of ``mesh``'s devices, and the TPU topology name when known."""
    devices = list(mesh.devices.flat)
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "topology": topology,
    }


def mesh_of(mesh: Any) -> dict[str, Any]:
    """Axis sizes and the device ids in mesh order (the executable's device assignment)."""
    return {"shape": {k: int(v) for k, v in mesh.shape.items()}, "device_ids": mesh.device_ids.tolist()}


def step_signature(cfg: Any, model_cfg: Any) -> dict[str, Any]:
    """Every config value the compiled train step depends on: the resolved model config (kernel choices
    included), :data:`STEP_FIELDS` and the stage (kind, trainable, freeze), as plain JSON values."""
    from wuneng_jax.config import config_to_dict

    d = cfg.to_dict()
    sig = {"model": config_to_dict(model_cfg), **{k: d[k] for k in STEP_FIELDS}}
    sig["stage"] = {k: d["stage"][k] for k in ("kind", "trainable", "freeze")}
    return json.loads(json.dumps(sig, default=str))


def step_meta(cfg: Any, model_cfg: Any, mesh: Any, topology: str | None = None) -> dict[str, Any]:
    """The metadata saved with (and checked against) a compiled train step."""
    target = target_of(mesh, topology)
    return {
        "target": target,
        "mesh": mesh_of(mesh),
        "versions": versions(target["platform"]),
        "signature": step_signature(cfg, model_cfg),
        "config": cfg.to_dict(),
    }


# --------------------------------------------------------------------------------------------
# Files


def save_executable(compiled: Any, path: str | Path, meta: dict[str, Any]) -> None:
    """Serialise a compiled step with ``meta`` to ``path``; :func:`load_executable` gives it back."""
    from jax.experimental.serialize_executable import serialize

    payload, in_tree, out_tree = serialize(compiled)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"format": FORMAT, "meta": meta, "executable": (payload, in_tree, out_tree)}, f)


def read_saved(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)
    except FileNotFoundError as e:
        raise SavedStepError(f"{path}: no such file (make it with `wuneng compile ... --save {path}`)") from e
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError):
        blob = None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SavedStepError(f"{path} is not a compiled step saved by `wuneng compile --save`")
    return blob


def read_executable_meta(path: str | Path) -> dict[str, Any]:
    """The metadata saved with a compiled step (target, mesh, versions, step signature, config)."""
    return read_saved(path)["meta"]


def load_executable(path: str | Path, expect: dict[str, Any] | None = None) -> Any:
    """The compiled step saved at ``path``, loaded on this host's devices; ``expect`` (top-level metadata
    values, e.g. ``{"topology": "v5p:4x4x4"}``) must match. :func:`load_train_step` checks a whole run."""
    from jax.experimental.serialize_executable import deserialize_and_load

    blob = read_saved(path)
    meta = blob["meta"]
    for key, value in (expect or {}).items():
        saved = meta.get(key, meta.get("target", {}).get(key))
        if saved != value:
            raise SavedStepError(
                f"{path} was compiled for {key}={saved!r}, not {value!r}; recompile it with "
                "`wuneng compile ... --save`"
            )
    payload, in_tree, out_tree = blob["executable"]
    return deserialize_and_load(payload, in_tree, out_tree)


# --------------------------------------------------------------------------------------------
# Checking a saved step against a run


def check_stage(plan: Any) -> None:
    """Refuse stages the saved (plain cross-entropy, all-parameter) step cannot serve."""
    if plan.teacher is not None or plan.make_objective is not None:
        raise SavedStepError(
            f"config field `compiled_step`: stage {plan.kind!r} trains with its own objective"
            + (
                " and a frozen teacher's parameters as an extra step input"
                if plan.teacher is not None
                else ""
            )
            + "; a saved step (`wuneng compile --save`) is the plain cross-entropy step, so it serves only "
            "stage.kind pretrain or sft. Remove compiled_step for this stage (the step is compiled at start-up)"
        )
    if plan.trainable is not None:
        raise SavedStepError(
            "config field `compiled_step`: stage.trainable / stage.freeze select the trained parameters, but a "
            "saved step (`wuneng compile --save`) trains all of them; remove compiled_step or the selection"
        )


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k in sorted(set(value)):
            out.update(_flatten(value[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _diff(saved: Any, run: Any, prefix: str) -> list[str]:
    a, b = _flatten(saved, prefix), _flatten(run, prefix)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            show = lambda v: "(absent)" if v is missing else json.dumps(v, default=str)
            out.append(f"{key}: compiled {show(x)}, this run {show(y)}")
    return out


def compare_meta(saved: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """Every difference between a saved step's metadata and this run's (:func:`step_meta`), one line each;
    the topology name is only compared when both sides know it (a TPU host does not name its slice)."""
    lines = []
    target_s, target_r = dict(saved.get("target") or {}), dict(run["target"])
    if target_s.get("topology") is None or target_r.get("topology") is None:
        target_s.pop("topology", None)
        target_r.pop("topology", None)
    lines += _diff(target_s, target_r, "target")
    mesh_s, mesh_r = saved.get("mesh") or {}, run["mesh"]
    if mesh_s.get("shape") != mesh_r["shape"]:
        lines += _diff(mesh_s.get("shape"), mesh_r["shape"], "mesh")
    elif mesh_s.get("device_ids") != mesh_r["device_ids"]:
        lines.append(
            f"mesh device order: compiled {mesh_s.get('device_ids')}, this run {mesh_r['device_ids']}"
        )
    lines += _diff(saved.get("versions") or {}, run["versions"], "versions")
    lines += _diff(saved.get("signature") or {}, run["signature"], "config")
    return lines


def check_saved_step(path: str | Path, run_meta: dict[str, Any]) -> dict[str, Any]:
    """The saved step's blob when its metadata matches ``run_meta``; else :class:`SavedStepError` listing
    every difference."""
    blob = read_saved(path)
    diffs = compare_meta(blob["meta"], run_meta)
    if diffs:
        where = (blob["meta"].get("target") or {}).get("topology")
        how = (
            f"`wuneng compile CONFIG.yaml topology={where} --save {path}`"
            if where
            else f"train.aot.compile.compile_host(cfg, save={str(path)!r}) for this host's own devices"
        )
        raise SavedStepError(
            f"config field `compiled_step`: {path} was compiled for another run; it differs in "
            f"{len(diffs)} value(s):\n  "
            + "\n  ".join(diffs)
            + f"\nRecompile it with this run's config ({how}) or remove compiled_step"
        )
    return blob


def load_train_step(path: str | Path, run_meta: dict[str, Any]) -> Any:
    """The saved train step, checked against ``run_meta`` (:func:`step_meta` of the run) and loaded on this
    host's devices: a callable ``step(state, batch) -> (state, metrics)``."""
    from jax.experimental.serialize_executable import deserialize_and_load

    blob = check_saved_step(path, run_meta)
    payload, in_tree, out_tree = blob["executable"]
    return deserialize_and_load(payload, in_tree, out_tree)


__all__ = [
    "STEP_FIELDS",
    "SavedStepError",
    "check_saved_step",
    "check_stage",
    "compare_meta",
    "load_executable",
    "load_train_step",
    "read_executable_meta",
    "save_executable",
    "step_meta",
    "step_signature",
]
