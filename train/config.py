"""The typed training configuration: YAML file + dotted ``key=value`` overrides, validated.

``load_config("configs/demo.yaml", ["steps=100", "optimizer.lr=1e-3"])`` returns a frozen
:class:`TrainConfig`. Every section is a small frozen dataclass; unknown keys, wrong types and bad
values raise :class:`ConfigError` (a ``ValueError``) naming the dotted field and the fix.

``model`` is the one section this module does not type itself: a preset name or a mapping resolved by
``wuneng_jax.config.load_model_config`` (the model library owns its configs), checked by
:func:`resolve_model_config` when the trainer builds the model.

Schema (defaults in brackets)::

    run_dir: str                      # checkpoints, config.yaml, metrics.jsonl, tb/ live here
    model: str | {preset: str, ...field overrides} | {family: str, ...fields}  # wuneng_jax.config
    data: {store, prepare [[]], tokenizer [byte], eval_fraction [0.01], stdlib_max_files,
           stdlib_max_bytes, shuffle [true], seed [= seed], num_threads [2], prefetch [4],
           chat: {files [[]], sample [0], eval_fraction [0.05], overlong [truncate], messages_field,
                  template: {turn_start, turn_end, turn_separator, default_system, prefix, suffix,
                             train_roles}}}      # chat jsonl instead of the token store (SFT)
    stage: {kind [pretrain|align|distill|sft], init_from, teacher, align_branch [state|hybrid],
            kl_weight [1], kl_temperature [1], ce_weight [0], trainable [[]], freeze [[]],
            untie_embeddings [false]}                    # train.upcycle; docs/upcycling.md
    steps: int                        # optimizer steps to run (total, counting resumed ones)
    global_batch_size: int            # rows per step over all hosts
    seq_len: int                      # tokens per row
    grad_accum_steps: int [1]         # micro-batches per step (scan); global_batch_size must divide
    dtype: float32 | bfloat16 [bfloat16]  # compute dtype; params and optimizer state stay float32
    remat: none | full | dots_saveable | dots_with_no_batch_dims_saveable [none]  # per layer
    z_loss: float [0.0]               # coefficient of mean(logsumexp(logits)^2)
    loss_vocab_tile: int [8192]       # vocabulary ids per tile of the loss (no [tokens, V] float32 logits); 0 = full logits
    seed: int [0]
    compiled_step: str [null]         # a train step saved by `wuneng compile --save` (docs/tpu_aot.md), run instead of compiling
    max_skipped_steps: int [10]       # consecutive non-finite (skipped) steps before the run stops; 0 = never
    mesh: {data [-1], fsdp [1], tensor [1], sequence [1], dcn_granule [auto], dcn_axis [data]}
    rules: [[logical_name, mesh_axis | [mesh_axes] | null], ...]   # the whole table, or
           {logical_name: axes, ...}   # entries replacing/added to wuneng_jax.sharding.DEFAULT_RULES
    optimizer: {lr, b1, b2, eps, weight_decay, clip_norm, schedule [cosine|wsd|constant],
                warmup_steps, min_lr_ratio, decay_fraction, decay_embeddings, no_decay_patterns}
    checkpoint: {interval, keep_last, keep_every, async_save, resume}
    eval: {interval, batches, at_end, sample_tokens, sample_prompt, sample_temperature}
    log: {interval, tensorboard, jsonl, progress}
    profiler: {start_step [-1 = off], num_steps}
    distributed: {coordinator_address, num_processes, process_id, auto, cpu_collectives,
                  initialization_timeout}
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from wuneng_jax.coerce import CoercionError, coerce
from wuneng_jax.files import read_yaml
from wuneng_jax.layers.remat import REMAT_POLICIES as REMAT_POLICY_TABLE
from wuneng_jax.layers.vocab_tiling import DEFAULT_VOCAB_TILE
from wuneng_jax.sharding import DEFAULT_RULES

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")
REMAT_POLICIES: tuple[str, ...] = tuple(REMAT_POLICY_TABLE)
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
SCHEDULES: tuple[str, ...] = ("cosine", "wsd", "constant")

RuleAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, RuleAxes], ...]


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _fail(field: str, problem: str) -> typing.NoReturn:
    raise ConfigError(f"config field `{field}`: {problem}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (whole mesh, all hosts); ``-1`` = fill with the remaining devices.

    ``dcn_granule`` says how devices group over the slow (data-centre) network: ``slice`` (TPU
    multi-slice, by ``device.slice_index``), ``process`` (one granule per host, e.g. GPU nodes),
    ``none``, or ``auto`` (``slice`` when the devices span several slices, else ``none``). With more
    than one granule, the granule count is factored out of ``dcn_axis`` (which must be a multiple of
    it), so that only that axis's collectives cross the slow network.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    dcn_granule: str = "auto"
    dcn_axis: str = "data"

    def validate(self, prefix: str = "mesh") -> None:
        sizes = self.sizes()
        for name, size in zip(MESH_AXES, sizes, strict=True):
            if size == 0 or size < -1:
                _fail(f"{prefix}.{name}", f"size {size} must be a positive integer or -1 (fill)")
        if sum(s == -1 for s in sizes) > 1:
            _fail(
                prefix, f"at most one axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes, strict=True))}"
            )
        if self.dcn_granule not in ("auto", "slice", "process", "none"):
            _fail(f"{prefix}.dcn_granule", f"{self.dcn_granule!r} is not one of auto, slice, process, none")
        if self.dcn_axis not in MESH_AXES:
            _fail(f"{prefix}.dcn_axis", f"{self.dcn_axis!r} is not one of {', '.join(MESH_AXES)}")

    def sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.tensor, self.sequence)


def _host_port(address: str) -> tuple[str, int] | None:
    """``("host", port)`` of ``host:port`` / ``[v6addr]:port``, None when malformed."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return (host, int(port)) if host and port.isdigit() and 0 < int(port) < 65536 else None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host start-up (``jax.distributed.initialize``).

    Explicit ``coordinator_address`` + ``num_processes`` + ``process_id`` always win (CPU tests,
    hand-launched clusters). Otherwise, with ``auto``, JAX's own cluster detection runs when the
    environment shows one (TPU pod VMs, SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``).
    ``initialization_timeout`` (seconds) bounds the start-up: a process that cannot reach the
    coordinator says so while it waits and then stops with an error.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = True
    cpu_collectives: str = "gloo"
    initialization_timeout: int = 120

    def validate(self, prefix: str = "distributed") -> None:
        explicit = [self.coordinator_address, self.num_processes, self.process_id]
        if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
            _fail(
                prefix,
                "set all of coordinator_address, num_processes and process_id (explicit start-up) or none",
            )
        if self.num_processes is not None and self.num_processes < 1:
            _fail(f"{prefix}.num_processes", f"must be >= 1, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 1):
            _fail(f"{prefix}.process_id", f"{self.process_id} not in [0, num_processes)")
        if self.cpu_collectives not in ("gloo", "mpi", "none"):
            _fail(f"{prefix}.cpu_collectives", f"{self.cpu_collectives!r} is not one of gloo, mpi, none")
        if self.initialization_timeout < 1:
            _fail(
                f"{prefix}.initialization_timeout",
                f"must be >= 1 (seconds), got {self.initialization_timeout}",
            )
        if self.coordinator_address is not None and not _host_port(self.coordinator_address):
            _fail(
                f"{prefix}.coordinator_address", f"{self.coordinator_address!r} is not of the form host:port"
            )

    def host_port(self) -> tuple[str, int] | None:
        return None if self.coordinator_address is None else _host_port(self.coordinator_address)


@dataclasses.dataclass(frozen=True)
class ChatTemplateConfig:
    """How a conversation becomes one token sequence (default: ChatML, Qwen2.5's chat format).

    Per message: ``turn_start`` (``{role}`` replaced) + content + ``turn_end`` + ``turn_separator``; the
    whole conversation is wrapped in ``prefix`` ... ``suffix``. ``default_system`` (if set) is inserted as
    a first system message when a conversation has none (Qwen2.5's template uses "You are Qwen, created
    by Alibaba Cloud. You are a helpful assistant."). The loss covers the content and ``turn_end`` (the
    end-of-turn token) of the messages whose role is in ``train_roles``, nothing else.
    """

    turn_start: str = "<|im_start|>{role}\n"
    turn_end: str = "<|im_end|>"
    turn_separator: str = "\n"
    default_system: str | None = None
    prefix: str = ""
    suffix: str = ""
    train_roles: tuple[str, ...] = ("assistant",)

    def validate(self, prefix: str = "data.chat.template") -> None:
        if "{role}" not in self.turn_start:
            _fail(f"{prefix}.turn_start", f"{self.turn_start!r} must contain the placeholder {{role}}")
        try:
            self.turn_start.format(role="user")
        except (IndexError, KeyError, ValueError) as e:
            _fail(
                f"{prefix}.turn_start",
                f"{self.turn_start!r} is not a valid template ({e}); only {{role}} "
                "may appear in braces (write {{ and }} for literal braces)",
            )
        if not self.turn_end:
            _fail(
                f"{prefix}.turn_end",
                "must be non-empty: the end-of-turn marker is what the model learns to stop on",
            )
        if not self.train_roles:
            _fail(f"{prefix}.train_roles", "must list at least one role (usually [assistant])")


OVERLONG = ("truncate", "drop")


@dataclasses.dataclass(frozen=True)
class ChatDataConfig:
    """Chat (SFT) data: jsonl files of ``{"messages": [{"role": ..., "content": ...}, ...]}`` records.

    ``files``: jsonl paths or glob patterns; ``sample``: that many conversations of the embedded
    synthetic sample set instead (tests and the demo, no download). Conversations are rendered by
    ``template``, tokenised with ``data.tokenizer`` and packed into rows of ``seq_len`` tokens (one
    conversation per segment, never split); a conversation longer than ``seq_len`` is cut to
    ``seq_len`` tokens (``overlong: truncate``) or left out (``drop``). ``eval_fraction`` of the
    conversations (a fixed pseudo-random choice) are held out for evaluation.
    """

    files: tuple[str, ...] = ()
    sample: int = 0
    eval_fraction: float = 0.05
    overlong: str = "truncate"
    messages_field: str = "messages"
    template: ChatTemplateConfig = dataclasses.field(default_factory=ChatTemplateConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.files) or self.sample > 0

    def validate(self, prefix: str = "data.chat") -> None:
        if self.files and self.sample:
            _fail(
                prefix, "set either `files` (your jsonl data) or `sample` (the embedded demo set), not both"
            )
        if self.sample < 0:
            _fail(f"{prefix}.sample", f"must be >= 0, got {self.sample}")
        if not 0 <= self.eval_fraction < 1:
            _fail(f"{prefix}.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.overlong not in OVERLONG:
            _fail(f"{prefix}.overlong", f"{self.overlong!r} is not one of {', '.join(OVERLONG)}")
        if not self.messages_field:
            _fail(f"{prefix}.messages_field", "must be a non-empty key name")
        self.template.validate(f"{prefix}.template")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The token store read by ``train.data`` (``wuneng prepare-data`` makes one).

    ``store`` is a local directory or a tensorstore URL (``gs://...``). When the store does not
    exist and ``prepare`` lists inputs (``[stdlib]`` = the embedded Python-stdlib corpus), it is
    created first with ``tokenizer``/``eval_fraction`` (the demo needs no separate step). Training
    reads the ``train`` split (shuffled with ``seed``, default: the top-level seed), evaluation the
    ``eval`` split. With ``chat`` set (SFT), the data are chat jsonl conversations instead of the
    store (:class:`ChatDataConfig`), tokenised with ``tokenizer``.
    """

    store: str = ""
    prepare: tuple[str, ...] = ()
    tokenizer: str = "byte"
    eval_fraction: float = 0.01
    stdlib_max_files: int | None = None
    stdlib_max_bytes: int | None = None
    shuffle: bool = True
    seed: int | None = None
    num_threads: int = 2
    prefetch: int = 4
    chat: ChatDataConfig = dataclasses.field(default_factory=ChatDataConfig)

    def validate(self, prefix: str = "data") -> None:
        self.chat.validate(f"{prefix}.chat")
        if not self.store and not self.chat.enabled:
            _fail(
                f"{prefix}.store",
                "is required: the token store path (make one with `wuneng prepare-data`), or chat data "
                "in data.chat.files",
            )
        if not 0 <= self.eval_fraction < 1:
            _fail(f"{prefix}.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.num_threads < 0 or self.prefetch < 0:
            _fail(prefix, "num_threads and prefetch must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            _fail(f"{prefix}.seed", f"must be in [0, 2**32), got {self.seed}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warmup + cosine / WSD / constant schedule.

    ``lr`` is the peak learning rate. ``cosine``: linear warmup, then cosine to ``min_lr_ratio * lr``
    at the last step. ``wsd`` (warmup-stable-decay): warmup, constant, then a linear decay to
    ``min_lr_ratio * lr`` over the last ``decay_fraction`` of the steps. Weight decay applies to
    matrices only (see ``train.optimizer.decay_mask``).
    """

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_embeddings: bool = True
    no_decay_patterns: tuple[str, ...] = ()

    def validate(self, prefix: str = "optimizer") -> None:
        if not self.lr > 0:
            _fail(f"{prefix}.lr", f"must be > 0, got {self.lr}")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                _fail(f"{prefix}.{name}", f"must be in [0, 1), got {v}")
        if not self.eps > 0:
            _fail(f"{prefix}.eps", f"must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            _fail(f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.clip_norm < 0:
            _fail(f"{prefix}.clip_norm", f"must be >= 0 (0 disables clipping), got {self.clip_norm}")
        if self.schedule not in SCHEDULES:
            _fail(f"{prefix}.schedule", f"{self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            _fail(f"{prefix}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(f"{prefix}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            _fail(f"{prefix}.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``run_dir/checkpoints``.

    Saved every ``interval`` steps, at the end and on SIGTERM; the ``keep_last`` newest are kept,
    plus every step that is a multiple of ``keep_every`` (if set). ``resume``: continue from the
    newest checkpoint in ``run_dir`` when there is one.
    """

    interval: int = 1000
    keep_last: int = 3
    keep_every: int | None = None
    async_save: bool = True
    resume: bool = True

    def validate(self, prefix: str = "checkpoint") -> None:
        if self.interval < 1:
            _fail(f"{prefix}.interval", f"must be >= 1, got {self.interval}")
        if self.keep_last < 1:
            _fail(f"{prefix}.keep_last", f"must be >= 1, got {self.keep_last}")
        if self.keep_every is not None and self.keep_every < 1:
            _fail(f"{prefix}.keep_every", f"must be >= 1 or null, got {self.keep_every}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation every ``interval`` steps (0 = never during training) on ``batches``
    batches of the eval split, and at the end with ``at_end``; then, if ``sample_tokens > 0``, a
    sample continuing ``sample_prompt`` is printed."""

    interval: int = 0
    batches: int = 4
    at_end: bool = True
    sample_tokens: int = 0
    sample_prompt: str = ""
    sample_temperature: float = 0.8

    def validate(self, prefix: str = "eval") -> None:
        if self.interval < 0:
            _fail(f"{prefix}.interval", f"must be >= 0 (0 = off), got {self.interval}")
        if self.batches < 1:
            _fail(f"{prefix}.batches", f"must be >= 1, got {self.batches}")
        if self.sample_tokens < 0:
            _fail(f"{prefix}.sample_tokens", f"must be >= 0, got {self.sample_tokens}")
        if self.sample_temperature < 0:
            _fail(f"{prefix}.sample_temperature", f"must be >= 0 (0 = greedy), got {self.sample_temperature}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics every ``interval`` steps to ``run_dir/metrics.jsonl`` and TensorBoard (``run_dir/tb``)."""

    interval: int = 10
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True

    def validate(self, prefix: str = "log") -> None:
        if self.interval < 1:
            _fail(f"{prefix}.interval", f"must be >= 1, got {self.interval}")


@dataclasses.dataclass(frozen=True)
class ProfilerConfig:
    """A ``jax.profiler`` trace of steps ``[start_step, start_step + num_steps)`` into
    ``run_dir/profile`` (``start_step < 0`` = off)."""

    start_step: int = -1
    num_steps: int = 3

    def validate(self, prefix: str = "profiler") -> None:
        if self.start_step >= 0 and self.num_steps < 1:
            _fail(f"{prefix}.num_steps", f"must be >= 1, got {self.num_steps}")


STAGE_KINDS: tuple[str, ...] = ("pretrain", "align", "distill", "sft")
ALIGN_BRANCHES: tuple[str, ...] = ("state", "hybrid")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """What a run trains and against what (``train.upcycle``; ``docs/upcycling.md``).

    ``kind``: ``pretrain`` (next-token CE), ``align`` (per-layer L2 between the teacher's attention
    output and the student branch ``align_branch``, teacher-forced), ``distill`` (``kl_weight`` ·
    KL(teacher ‖ student) at ``kl_temperature`` + ``ce_weight`` · CE), ``sft`` (CE on ``loss_mask``,
    i.e. assistant tokens of chat data).

    ``init_from``: where the student's weights start (instead of a random init): a Hugging Face Qwen2
    directory (upcycled when ``model.family`` is ``wuneng``), a WuNeng directory (``wuneng_format.md``),
    a training run directory (its newest checkpoint, e.g. the previous stage), or a model preset /
    mapping (random init, ``seed`` key optional; tests). ``model`` then holds only ``family`` and the
    settings the source lacks (hybrid settings when upcycling).

    ``teacher``: ``self`` (align default: the student's own frozen Qwen2 weights, no extra memory) or
    a source as for ``init_from`` holding a ``qwen2`` model (distill: required).

    ``trainable`` / ``freeze``: named parameter groups (``all embeddings attention mlp norms state fusion
    hybrid base``) or regular expressions on parameter paths (``layers.3.mlp.up_proj.kernel``);
    trainable = union(trainable or the kind's default) minus union(freeze). Defaults: align trains
    ``state`` (``hybrid`` for the hybrid branch), the others ``all``.

    ``untie_embeddings``: give a tied-embedding source its own LM head (a copy of the embedding), as
    ARWKV does from stage 2 on.
    """

    kind: str = "pretrain"
    init_from: Any = None
    teacher: Any = None
    align_branch: str = "state"
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    ce_weight: float = 0.0
    trainable: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    untie_embeddings: bool = False

    def validate(self, prefix: str = "stage") -> None:
        if self.kind not in STAGE_KINDS:
            _fail(f"{prefix}.kind", f"{self.kind!r} is not one of {', '.join(STAGE_KINDS)}")
        for name in ("init_from", "teacher"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v) and not isinstance(v, Mapping):
                _fail(f"{prefix}.{name}", f"expected a path, a preset name or a model mapping, got {v!r}")
        if self.align_branch not in ALIGN_BRANCHES:
            _fail(
                f"{prefix}.align_branch", f"{self.align_branch!r} is not one of {', '.join(ALIGN_BRANCHES)}"
            )
        if self.kind in ("pretrain", "sft") and self.teacher is not None:
            _fail(
                f"{prefix}.teacher", f"a {self.kind} stage has no teacher (teachers serve align and distill)"
            )
        if self.kind == "distill":
            if self.teacher is None:
                _fail(
                    f"{prefix}.teacher",
                    "distill needs a teacher: a Hugging Face Qwen2 directory, a qwen2 run directory or a preset",
                )
            if self.teacher == "self":
                _fail(f"{prefix}.teacher", "distill cannot use `self`; name the teacher model's directory")
        for name in ("kl_weight", "ce_weight"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.kind == "distill" and self.kl_weight == 0 and self.ce_weight == 0:
            _fail(prefix, "kl_weight and ce_weight are both 0: nothing to train")
        if not self.kl_temperature > 0:
            _fail(f"{prefix}.kl_temperature", f"must be > 0, got {self.kl_temperature}")
        for name in ("trainable", "freeze"):
            for i, entry in enumerate(getattr(self, name)):
                if not entry:
                    _fail(f"{prefix}.{name}[{i}]", "empty entry")
                try:
                    re.compile(entry)
                except re.error as e:
                    _fail(
                        f"{prefix}.{name}[{i}]", f"{entry!r} is neither a group name nor a valid regex ({e})"
                    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str
    model: Any
    steps: int
    global_batch_size: int
    seq_len: int
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    grad_accum_steps: int = 1
    dtype: str = "bfloat16"
    remat: str = "none"
    z_loss: float = 0.0
    loss_vocab_tile: int = DEFAULT_VOCAB_TILE
    seed: int = 0
    compiled_step: str | None = None
    max_skipped_steps: int = 10
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    rules: Rules = DEFAULT_RULES
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    profiler: ProfilerConfig = dataclasses.field(default_factory=ProfilerConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    stage: StageConfig = dataclasses.field(default_factory=StageConfig)

    def validate(self) -> TrainConfig:
        if not self.run_dir:
            _fail("run_dir", "must be a non-empty path")
        if not isinstance(self.model, str | Mapping) or not self.model:
            _fail("model", "must be a preset name or a mapping of model-config fields")
        for name in ("steps", "global_batch_size", "seq_len", "grad_accum_steps"):
            if getattr(self, name) < 1:
                _fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.grad_accum_steps:
            _fail(
                "grad_accum_steps",
                f"{self.grad_accum_steps} does not divide global_batch_size={self.global_batch_size}",
            )
        if self.dtype not in DTYPES:
            _fail("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            _fail("remat", f"{self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if self.z_loss < 0:
            _fail("z_loss", f"must be >= 0, got {self.z_loss}")
        if self.loss_vocab_tile < 0:
            _fail("loss_vocab_tile", f"must be >= 0 (0 = full logits), got {self.loss_vocab_tile}")
        if self.max_skipped_steps < 0:
            _fail("max_skipped_steps", f"must be >= 0 (0 = never stop), got {self.max_skipped_steps}")
        _validate_rules(self.rules)
        if not 0 <= self.seed < 2**32:
            _fail("seed", f"must be in [0, 2**32), got {self.seed}")
        sections = (
            "data",
            "mesh",
            "optimizer",
            "checkpoint",
            "eval",
            "log",
            "profiler",
            "distributed",
            "stage",
        )
        for section in sections:
            getattr(self, section).validate(section)
        if self.stage.kind == "sft" and not self.data.chat.enabled:
            _fail(
                "data.chat.files",
                "an sft stage trains on chat data: list your jsonl files (or data.chat.sample=N)",
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-able); ``load_config`` reads it back to an equal config."""
        out = _to_plain(self)
        out["rules"] = [[name, list(ax) if isinstance(ax, tuple) else ax] for name, ax in self.rules]
        return out


# --------------------------------------------------------------------------------------------
# The model section


def resolve_model_config(spec: Any, *, dtype: str, remat: str) -> Any:
    """The model config for ``spec`` with the run's compute dtype and per-layer remat policy applied."""
    from wuneng_jax import config as mc

    try:
        if isinstance(spec, str):
            cfg = mc.load_model_config(spec)
        else:
            spec = dict(spec)
            if "family" not in spec and "preset" in spec:
                spec["family"] = mc.family_of(mc.preset(spec["preset"]))
            cfg = mc.load_model_config(spec)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise ConfigError(f"config field `model`: {e}") from e
    fields = {f.name for f in dataclasses.fields(cfg)}
    param_dtype = getattr(cfg, "param_dtype", "float32")
    if param_dtype != "float32":
        raise ConfigError(
            f"config field `model.param_dtype`: {param_dtype!r}; training keeps float32 master weights, "
            "set model.param_dtype=float32 (the compute dtype is the top-level `dtype`)"
        )
    updates: dict[str, Any] = {}
    if "dtype" in fields:
        updates["dtype"] = dtype
    elif dtype != "float32":
        raise ConfigError(
            f"config field `dtype`: model family {mc.family_of(cfg)!r} has no compute dtype option"
        )
    if "remat" in fields:
        updates["remat"] = remat
    elif remat != "none":
        raise ConfigError(
            f"config field `remat`: model family {mc.family_of(cfg)!r} has no per-layer remat option"
        )
    if updates:
        cfg = dataclasses.replace(cfg, **updates)
    return cfg


# --------------------------------------------------------------------------------------------
# Loading


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML file (or a mapping), apply ``a.b.c=value`` overrides, build and validate."""
    if isinstance(source, Mapping):
        raw: dict[str, Any] = _deep_copy(source)
    else:
        path = Path(source)
        if not path.is_file():
            problem = "is a directory; give a YAML file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {problem}")
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a YAML mapping at top level")
        raw = _deep_copy(loaded)
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key component")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    parts = key.split(".")
    if parts[0] == "rules" and len(parts) == 2:
        _override_rule(raw, parts[1], value)
        return
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif not isinstance(child, dict):
            if part == "model" and i == 0 and isinstance(child, str):
                # `model=qwen2_tiny` then `model.num_layers=2`: a preset with field overrides.
                child = {"preset": child}
                node[part] = child
            else:
                raise ConfigError(
                    f"override {item!r}: `{'.'.join(parts[: i + 1])}` is a value, not a section"
                )
        node = child
    node[parts[-1]] = value


def _override_rule(raw: dict[str, Any], name: str, axes: Any) -> None:
    table = raw.get("rules")
    if table is None:
        raw["rules"] = {name: axes}
    elif isinstance(table, Mapping):
        table[name] = axes
    elif isinstance(table, list):
        for entry in table:
            if isinstance(entry, list) and len(entry) == 2 and entry[0] == name:
                entry[1] = axes
                return
        table.append([name, axes])
    else:
        _fail("rules", f"expected a mapping or a list of pairs, got {type(table).__name__}")


def from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from a nested mapping (e.g. parsed YAML)."""
    raw = dict(raw)
    if "rules" in raw:
        raw["rules"] = _parse_rules(raw["rules"])
    cfg = _build(TrainConfig, raw, "")
    return cfg.validate()


def _parse_rules(value: Any) -> Rules:
    """The rules table: a list of ``[name, axes]`` pairs is the whole table (order kept; the first
    entry for a name whose mesh axes are free wins); a mapping ``{name: axes}`` updates
    ``DEFAULT_RULES`` (replacing a name's entry, appending new names)."""
    if isinstance(value, Mapping):
        merged = dict(DEFAULT_RULES)
        merged.update(value)
        pairs = list(merged.items())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pairs = []
        for i, entry in enumerate(value):
            if not (isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2):
                _fail(f"rules[{i}]", f"expected a [logical_name, mesh_axes] pair, got {entry!r}")
            pairs.append((entry[0], entry[1]))
    else:
        _fail("rules", f"expected a mapping or a list of pairs, got {type(value).__name__}")
    out = []
    for name, axes in pairs:
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def _validate_rules(rules: Rules) -> None:
    for name, axes in rules:
        if not isinstance(name, str) or not name:
            _fail("rules", f"logical axis name must be a non-empty string, got {name!r}")
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not isinstance(names, tuple):
            _fail(f"rules.{name}", f"expected a mesh axis, a list of mesh axes or null, got {axes!r}")
        for ax in names:
            if ax not in MESH_AXES:
                _fail(f"rules.{name}", f"{ax!r} is not a mesh axis ({', '.join(MESH_AXES)})")
        if len(set(names)) != len(names):
            _fail(f"rules.{name}", f"mesh axis repeated in {axes!r}")


_FREEFORM = {"model"}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        _fail(prefix or "<top>", f"expected a mapping for section {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean `{_join(prefix, near[0])}`?" if near else f"; known: {', '.join(fields)}"
        _fail(_join(prefix, str(key)), f"unknown field{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = _join(prefix, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(dotted, "is required")
            continue
        value = raw[name]
        if name in _FREEFORM and cls is TrainConfig:
            kwargs[name] = _deep_copy(value) if isinstance(value, Mapping) else value
            continue
        kwargs[name] = _coerce(hints[name], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    """One YAML value against its annotation (``wuneng_jax.config.coerce``, with nested sections built by
    :func:`_build` and integral floats allowed for integers); ConfigError naming the field."""
    if tp is Any:
        return _deep_copy(value) if isinstance(value, Mapping) else value

    def section(cls: type, raw: Any, field: str) -> Any:
        return _build(cls, raw if raw is not None else {}, field)

    try:
        return coerce(tp, value, dotted, integral_floats=True, nested=section)
    except CoercionError as e:
        _fail(e.field, e.problem)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deep_copy(v) for v in value]
    return value


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what ``wuneng train`` prints and saves)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
