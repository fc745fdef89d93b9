"""Orbax checkpoints of a training run: state, data position and config, saved atomically.

One ``orbax.checkpoint.CheckpointManager`` (v0 API) in ``run_dir/checkpoints`` saves, per step, an
``ocp.args.Composite`` of three items:

``state``
    the ``TrainState`` (params, optimizer state, model variables, step, RNG) through
    ``StandardSave``: sharded arrays written by every host in parallel (tensorstore/OCDBT), restored
    straight into the target shardings (any mesh).
``data``
    the data iterator's state (``get_state()``, JSON), one file per process
    (``process_{i}-of-{n}.json``, grain's layout). It is captured when ``save`` is called, so an
    async save never records a later position.
``meta``
    the resolved training config, the model config and every parameter's shape, used to refuse a
    checkpoint that does not match the model (naming the differing field) before any array is read.

Saves are asynchronous (``checkpoint.async_save``): arrays are copied off the devices, then written in
a background thread while training continues. Orbax writes each step into a temporary directory and
renames it when complete, so a crash mid-save leaves the previous checkpoint as the newest valid one.
Retention: the ``keep_last`` newest, plus every multiple of ``keep_every``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from train import checkpoint_layout
from train.config import CheckpointConfig
from train.state import StateLayout, TrainState

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored (corrupt, incomplete, or for a different model)."""


class MissingIteratorState(CheckpointError):
    """A checkpoint holds no data-iterator state for any process (an incomplete checkpoint)."""


# --------------------------------------------------------------------------------------------
# Data-iterator state item (per process, captured at save time)


class IteratorStateHandler(ocp.CheckpointHandler):
    """Writes/reads ``process_{i}-of-{n}.json`` holding one iterator state (dict or bytes)."""

    def save(self, directory: epath.Path, args: IteratorStateSave) -> None:
        state = args.state
        payload = (
            {"kind": "bytes", "state": state.decode()}
            if isinstance(state, bytes | bytearray)
            else {"kind": "json", "state": state}
        )
        directory = epath.Path(directory)
        (directory / _iter_file()).write_text(json.dumps(payload, indent=1))

    def restore(self, directory: epath.Path, args: IteratorStateRestore | None = None) -> Any:
        path = epath.Path(directory) / _iter_file()
        if not path.exists():
            written = sorted(p.name for p in epath.Path(directory).glob("process_*-of-*.json"))
            if written:
                raise CheckpointError(
                    f"{path} is missing: the checkpoint was written by a different number of processes "
                    f"({written[0]} ...; {jax.process_count()} now); resume with the same number of processes"
                )
            raise MissingIteratorState(f"its data-iterator state ({path}) is missing")
        payload = json.loads(path.read_text())
        return payload["state"].encode() if payload["kind"] == "bytes" else payload["state"]

    def structure(self, directory: epath.Path) -> Any:
        return None

    def metadata(self, directory: epath.Path) -> Any:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


def _iter_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    state: TrainState
    data_state: Any
    meta: dict[str, Any]
    step: int


class Checkpointer:
    """The run's checkpoint manager (all processes must call ``save``/``restore`` together)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last,
            keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    # ---- queries
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # ---- save
    def save(self, step: int, state: TrainState, data_state: Any, meta: Mapping[str, Any]) -> bool:
        """Start saving ``state`` as ``step`` (async); the data state must be captured by the caller
        at the same point of the stream (the state after ``step`` batches)."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state.as_dict()),
            data=IteratorStateSave(data_state),
            meta=ocp.args.JsonSave(dict(meta)),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ---- restore
    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = out["meta"]
        except Exception as e:  # noqa: BLE001 - re-raised with the path and the fix
            raise self._corrupt(step, e) from e
        if not isinstance(meta, dict):
            raise self._corrupt(step, ValueError("meta item is not a JSON object"))
        return meta

    def restore(self, step: int, layout: StateLayout, expected_meta: Mapping[str, Any]) -> Restored:
        """Check ``meta`` against the current model, then restore the state into ``layout``'s
        shardings and return the saved data-iterator state."""
        meta = self.read_meta(step)
        if checkpoint_layout.is_per_layer(
            meta.get("param_shapes", {}), expected_meta.get("param_shapes", {})
        ):
            return self._restore_per_layer(step, layout, expected_meta, meta)
        check_compatible(meta, expected_meta, self._step_dir(step))
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(layout.abstract.as_dict()),
                    data=IteratorStateRestore(),
                ),
            )
        except MissingIteratorState as e:
            raise self._corrupt(step, e) from e
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e
        state = TrainState.from_dict(out["state"])
        return Restored(state=state, data_state=out["data"], meta=meta, step=step)

    def _restore_per_layer(
        self, step: int, layout: StateLayout, expected_meta: Mapping[str, Any], meta: dict[str, Any]
    ) -> Restored:
        """A checkpoint written before layers were stacked (``train.checkpoint_layout``): checked against
        the model's per-layer shapes, read in its own structure and restacked into ``layout``."""
        model = checkpoint_layout.abstract_model(layout)
        expected = {**expected_meta, "param_shapes": checkpoint_layout.per_layer_shapes(model)}
        check_compatible(meta, expected, self._step_dir(step))
        log.warning(
            "checkpoint %s holds one array per layer (written before layers were stacked): restacking it; "
            "the next checkpoint is saved in the stacked layout",
            self._step_dir(step),
        )

        def read_saved() -> Any:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            return out["state"]

        try:
            state = checkpoint_layout.restore_per_layer(read_saved, layout, model, str(self._step_dir(step)))
            data = self.manager.restore(step, args=ocp.args.Composite(data=IteratorStateRestore()))["data"]
        except MissingIteratorState as e:
            raise self._corrupt(step, e) from e
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e
        return Restored(state=TrainState.from_dict(state), data_state=data, meta=meta, step=step)

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _corrupt(self, step: int, err: BaseException) -> CheckpointError:
        older = [s for s in self.all_steps() if s < step]
        fix = (
            f"delete {self._step_dir(step)} to resume from step {max(older)}"
            if older
            else f"delete {self._step_dir(step)} (or the run directory) to start from scratch"
        )
        return CheckpointError(
            f"checkpoint at step {step} in {self.directory} is corrupt or incomplete and cannot be "
            f"restored ({type(err).__name__}: {str(err)[:300]}); {fix}, or set checkpoint.resume=false "
            f"with a new run_dir"
        )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def check_compatible(saved: Mapping[str, Any], expected: Mapping[str, Any], where: Path | str) -> None:
    """Refuse a checkpoint whose model config or parameter shapes differ from the current model.

    Names the first differing model-config field (``model.<field>: saved X, now Y``) or parameter.
    """
    s_model = _flatten(saved.get("model_config", {}))
    e_model = _flatten(expected.get("model_config", {}))
    diffs = [
        f"model.{k}: checkpoint has {s_model.get(k, '<absent>')!r}, config has {e_model.get(k, '<absent>')!r}"
        for k in sorted(set(s_model) | set(e_model))
        if s_model.get(k, "<absent>") != e_model.get(k, "<absent>") and k not in _IGNORED_MODEL_FIELDS
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} was written for a different model: "
            + "; ".join(diffs[:5])
            + ("; ..." if len(diffs) > 5 else "")
            + ". Use the checkpoint's model config, or a new run_dir to train this model from scratch"
        )
    s_shapes = saved.get("param_shapes", {})
    e_shapes = expected.get("param_shapes", {})
    for name in sorted(set(s_shapes) | set(e_shapes)):
        a, b = s_shapes.get(name), e_shapes.get(name)
        if a != b:
            raise CheckpointError(
                f"checkpoint {where} does not match the model: parameter {name} has shape "
                f"{a if a is not None else '<absent>'} in the checkpoint but "
                f"{b if b is not None else '<absent>'} in the model"
            )


# Fields that may change between runs without changing the parameters (compute dtype, remat, kernels, the
# initialisation recipe, which a restored checkpoint overrides).
_IGNORED_MODEL_FIELDS = frozenset(
    {"dtype", "remat", "remat_policy", "attention_impl", "kernel_impl", "impl", "wkv_impl", "init"}
)
