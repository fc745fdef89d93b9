"""Where a stage's student and teacher weights come from, and the student's model config.

A *source* (``stage.init_from``, ``stage.teacher``, the pipeline's ``base``) is one of

* a Hugging Face Qwen2 directory (``config.json`` with ``model_type: qwen2`` + safetensors),
* a WuNeng directory written by :func:`wuneng_jax.convert.hf_wuneng.save_wuneng` (``model_type: wuneng``),
* a training run directory (``run_dir/checkpoints/<step>``): the parameters of its newest checkpoint,
* a model preset name or a model-config mapping (``{family: qwen2, preset: qwen2_tiny, ..., seed: 0}``):
  a random initialisation with ``seed`` (tests, demos; never a real teacher).

:func:`open_source` reads only the source's config (cheap: the Trainer needs shapes before it loads
anything); :func:`load_source` materialises the weights under the mesh, each parameter placed with its
logical sharding. :func:`student_config` derives the student's config from the source and the run's
``model`` section (upcycling a Qwen2 source into WuNeng adds the hybrid settings; the shape fields
always come from the source). :func:`load_student` loads, upcycles (:func:`upcycle_qwen2`, exact
at step 0) and unties the embeddings as configured.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from train.config import ConfigError, Rules
from train.mesh import mesh_context
from wuneng_jax import config as mc
from wuneng_jax.layers.stack import per_layer_params, set_per_layer_params
from wuneng_jax.models.qwen2 import Qwen2Config
from wuneng_jax.models.wuneng import WuNengConfig

#: Model-config fields that a run may set freely (they do not change the parameters).
RUNTIME_FIELDS = frozenset({"dtype", "param_dtype", "attention_impl", "wkv_impl", "wkv_chunk_size", "remat"})


@dataclasses.dataclass(frozen=True)
class Source:
    """A weight source: ``kind`` in ``hf_qwen2 | hf_wuneng | run | random``; ``cfg`` its model config."""

    kind: str
    where: str  # for messages
    cfg: Any
    path: Path | None = None
    seed: int = 0
    step: int | None = None  # run sources: the checkpoint step read

    @property
    def family(self) -> str:
        return mc.family_of(self.cfg)


# ----------------------------------------------------------------------------------------------------
# Opening (config only)


def checkpoint_dir(path: Path) -> Path | None:
    """``run/checkpoints`` (or ``path`` itself) when it holds orbax step directories, else None."""
    for d in (path / "checkpoints", path):
        if d.is_dir() and any(
            c.is_dir() and c.name.isdigit() and (c / "state").is_dir() for c in d.iterdir()
        ):
            return d
    return None


def _manager(ckpt_dir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        ckpt_dir.absolute(),
        item_names=("state", "data", "meta"),
        options=ocp.CheckpointManagerOptions(create=False),
    )


def latest_step(run_dir: str | Path) -> int | None:
    """The newest complete checkpoint step of a run directory (None without one)."""
    ckpt = checkpoint_dir(Path(run_dir))
    if ckpt is None:
        return None
    mngr = _manager(ckpt)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def _read_run_meta(ckpt_dir: Path) -> tuple[int, dict[str, Any]]:
    import orbax.checkpoint as ocp

    mngr = _manager(ckpt_dir)
    try:
        step = mngr.latest_step()
        if step is None:
            raise ConfigError(f"{ckpt_dir} holds no complete checkpoint")
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mngr.close()
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise ConfigError(f"{ckpt_dir / str(step)}: the checkpoint metadata has no model_config")
    return step, meta


def open_source(spec: Any, field: str) -> Source:
    """Identify ``spec`` (module docstring) and read its model config; ConfigError naming ``field``."""
    if isinstance(spec, Mapping):
        d = dict(spec)
        seed = d.pop("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"config field `{field}.seed`: expected an integer, got {seed!r}")
        if "family" not in d and "preset" in d:
            d["family"] = mc.family_of(mc.preset(d["preset"]))
        try:
            cfg = mc.load_model_config(d)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config field `{field}`: {e}") from e
        return Source("random", f"random {mc.family_of(cfg)} model (seed {seed})", cfg, seed=seed)
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"config field `{field}`: expected a directory, a preset name or a mapping, got {spec!r}"
        )
    path = Path(spec)
    if path.is_dir():
        ckpt = checkpoint_dir(path)
        if ckpt is not None:
            step, meta = _read_run_meta(ckpt)
            try:
                cfg = mc.config_from_dict(meta["model_config"])
            except ValueError as e:
                raise ConfigError(f"config field `{field}`: {ckpt}: {e}") from e
            return Source("run", f"run {path} (step {step})", cfg, path=ckpt, step=step)
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            hf = json.loads(cfg_file.read_text())
            model_type = hf.get("model_type", "qwen2")
            try:
                if model_type == "wuneng":
                    from wuneng_jax.convert.hf_wuneng import wuneng_config_from_hf

                    return Source("hf_wuneng", str(path), wuneng_config_from_hf(hf), path=path)
                from wuneng_jax.convert.hf_qwen2 import qwen2_config_from_hf

                return Source("hf_qwen2", str(path), qwen2_config_from_hf(hf), path=path)
            except ValueError as e:
                raise ConfigError(f"config field `{field}`: {e}") from e
        raise ConfigError(
            f"config field `{field}`: {path} is neither a training run (no checkpoints/<step>) nor a "
            "Hugging Face-style checkpoint (no config.json)"
        )
    name = spec.removeprefix("preset:")
    if name in mc.list_presets():
        return Source("random", f"random {name} (seed 0)", mc.preset(name))
    raise ConfigError(
        f"config field `{field}`: {spec!r} does not exist; give a Hugging Face Qwen2 directory, a WuNeng "
        "directory, a training run directory, or a model preset name"
    )


# ----------------------------------------------------------------------------------------------------
# Configs


def _with_runtime(cfg: Any, **values: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if k in names})


def student_config(src: Source, model_spec: Any, *, dtype: str, remat: str, untie: bool) -> Any:
    """The student's model config: ``src``'s shapes + ``model_spec`` (family and missing settings).

    ``model_spec``: a family name (``wuneng``) or a mapping ``{family, ...fields}``. A ``qwen2`` source
    with family ``wuneng`` is upcycled (the hybrid settings come from ``model_spec``); otherwise the
    families must match. Fields of the source may be repeated only with the same value (the
    ``config.yaml`` a run saves lists them all); runtime fields (``dtype``, ``remat``, kernels) follow
    the run.
    """
    if isinstance(model_spec, str):
        if model_spec not in mc.FAMILY_MODULES:
            raise ConfigError(
                f"config field `model`: with stage.init_from the model comes from that source; `model` holds "
                f"the family and the settings the source lacks, e.g. {{family: wuneng, fusion: full}} "
                f"(got {model_spec!r})"
            )
        spec: dict[str, Any] = {"family": model_spec}
    else:
        spec = dict(model_spec)
    if "preset" in spec:
        raise ConfigError(
            "config field `model.preset`: with stage.init_from the shapes come from that source; drop the preset"
        )
    family = spec.pop("family", src.family)
    if family not in ("qwen2", "wuneng"):
        raise ConfigError(
            f"config field `model.family`: {family!r}; upcycling stages train qwen2 or wuneng models"
        )
    base = src.cfg
    if untie and base.tie_word_embeddings:
        base = dataclasses.replace(base, tie_word_embeddings=False)
    if family == "qwen2" and isinstance(base, WuNengConfig):
        raise ConfigError(f"config field `model.family`: qwen2, but {src.where} holds a wuneng model")
    # Upcycling (a qwen2 base, family wuneng): the hybrid fields take their defaults unless set here.
    merged = {**mc.config_to_dict(base), **spec, "family": family}
    try:
        cfg = mc.config_from_dict(merged)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config field `model`: {e}") from e
    for f in dataclasses.fields(base):
        if f.name in RUNTIME_FIELDS or not f.init:
            continue
        if getattr(cfg, f.name) != getattr(base, f.name):
            raise ConfigError(
                f"config field `model.{f.name}`: {getattr(cfg, f.name)!r} differs from {src.where}'s "
                f"{getattr(base, f.name)!r}; the student's shapes come from stage.init_from (leave the field "
                "out)"
            )
    return _with_runtime(cfg, dtype=dtype, remat=remat, param_dtype="float32")


def teacher_config(src: Source, *, dtype: str) -> Qwen2Config:
    """The teacher's config: a ``qwen2`` model computing (and stored) in the run's compute dtype."""
    if type(src.cfg) is not Qwen2Config:
        raise ConfigError(
            f"config field `stage.teacher`: {src.where} holds a {src.family} model; the teacher must be a qwen2 model"
        )
    return _with_runtime(src.cfg, dtype=dtype, param_dtype=dtype, remat="none")


# ----------------------------------------------------------------------------------------------------
# Loading


def _restore_run_params(src: Source, cfg: Any, mesh, rules: Rules) -> nnx.Module:
    """The newest checkpoint's parameters into a model of ``cfg`` (sharded on ``mesh``; cast to
    ``cfg.param_dtype``). Only ``params`` is read (partial restore), not the optimizer state."""
    import orbax.checkpoint as ocp

    from train.state import specs_to_shardings
    from wuneng_jax.models import build_model

    with mesh_context(mesh, rules):
        model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        shardings = specs_to_shardings(nnx.get_partition_spec(params), mesh)
    target = {
        "params": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
        )
    }
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target
    )
    mngr = _manager(src.path)
    try:
        out = mngr.restore(
            src.step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
            ),
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the path and the model
        raise ConfigError(
            f"cannot restore the parameters of {src.path / str(src.step)} into a {mc.family_of(cfg)} model "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from e
    finally:
        mngr.close()
    return nnx.merge(graphdef, out["state"]["params"], rest)


def _random_model(cfg: Any, seed: int, mesh, rules: Rules) -> nnx.Module:
    """``build_model(cfg, rngs=Rngs(seed))``, initialised in one jitted call directly into its shards."""
    from train.state import specs_to_shardings
    from wuneng_jax.models import build_model

    def init() -> Any:
        return nnx.split(build_model(cfg, rngs=nnx.Rngs(seed)))[1]

    with mesh_context(mesh, rules):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(seed))))
        shardings = specs_to_shardings(nnx.get_partition_spec(abstract), mesh)
        return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())


def load_source(src: Source, *, mesh, rules: Rules, cfg: Any | None = None) -> nnx.Module:
    """The source's model with concrete weights, placed under ``mesh``/``rules``. ``cfg`` (default: the
    source's) may change runtime fields only (``dtype``, ``param_dtype`` ...: weights are cast)."""
    cfg = src.cfg if cfg is None else cfg
    runtime = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "attention_impl") if hasattr(cfg, k)}
    if src.kind == "run":
        return _restore_run_params(src, cfg, mesh, rules)
    if src.kind == "random":
        return _random_model(cfg, src.seed, mesh, rules)
    with mesh_context(mesh, rules):
        if src.kind == "hf_qwen2":
            from wuneng_jax.convert.hf_qwen2 import load_qwen2

            return load_qwen2(src.path, **runtime)[1]
        if src.kind == "hf_wuneng":
            from wuneng_jax.convert.hf_wuneng import load_wuneng

            return load_wuneng(src.path, **runtime)[1]
    raise ValueError(f"unknown source kind {src.kind!r}")


def untie_embeddings(model: nnx.Module, cfg: Any) -> nnx.Module:
    """A model of ``cfg`` (untied) holding ``model``'s weights, with ``lm_head = embeddingᵀ`` (same logits)."""
    from wuneng_jax.models import build_model

    new = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    src = per_layer_params(model)
    values = {}
    for path in per_layer_params(new):
        if path in src:
            values[path] = src[path]
        elif path == ("lm_head", "kernel"):
            values[path] = jnp.transpose(src[("embed_tokens", "embedding")])
        else:
            raise ValueError(f"untie_embeddings: no source for parameter {'.'.join(map(str, path))}")
    set_per_layer_params(new, values, cfg.param_dtype, where="untie_embeddings")
    return new


def load_student(src: Source, cfg: Any, *, mesh, rules: Rules, upcycle_seed: int) -> tuple[Any, Any]:
    """``(params, rest)`` ``nnx.State``s of the student ``cfg`` (from :func:`student_config`) from ``src``:
    loaded, upcycled when ``src`` is a Qwen2 model and ``cfg`` a WuNeng one, untied when ``cfg`` is
    untied and the source tied."""
    source_cfg = _with_runtime(src.cfg, dtype=cfg.dtype, param_dtype="float32")
    loaded = load_source(src, mesh=mesh, rules=rules, cfg=source_cfg)
    with mesh_context(mesh, rules):
        model, mcfg = loaded, loaded.cfg
        if isinstance(cfg, WuNengConfig) and not isinstance(mcfg, WuNengConfig):
            from wuneng_jax.convert.upcycle import upcycle_qwen2

            qwen_fields = {f.name for f in dataclasses.fields(Qwen2Config)}
            hybrid = {
                f.name: getattr(cfg, f.name)
                for f in dataclasses.fields(WuNengConfig)
                if f.name not in qwen_fields
            }
            mcfg, model = upcycle_qwen2(model, mcfg, seed=upcycle_seed, **hybrid)
        if mcfg.tie_word_embeddings and not cfg.tie_word_embeddings:
            model = untie_embeddings(model, cfg)
        _, params, rest = nnx.split(model, nnx.Param, ...)
    return params, rest


def load_teacher(src: Source, cfg: Qwen2Config, *, mesh, rules: Rules) -> Any:
    """The teacher's parameter ``State`` (in ``cfg.param_dtype``, sharded like a model of ``cfg``)."""
    return nnx.state(load_source(src, mesh=mesh, rules=rules, cfg=cfg), nnx.Param)
