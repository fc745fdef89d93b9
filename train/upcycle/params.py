"""Named parameter groups and the trainable/frozen split of a stage.

Parameter paths are the ``nnx`` attribute paths joined by dots. Decoder layers are stacked in scanned
groups (:mod:`wuneng_jax.layers.stack`), so a layer parameter is one array for every layer of its group
(``layers.blocks.<group>.<position>.self_attn.q_proj.kernel``): groups and regexes select it for all of
those layers together. WuNeng keeps Qwen2's attribute names and adds its own beside them.

Groups (``stage.trainable`` / ``stage.freeze`` entries; anything else is a regular expression searched
in the path):

========== =========================================================================================
all        every parameter
embeddings ``embed_tokens`` and ``lm_head``
attention  ``q_proj k_proj v_proj o_proj`` of every layer (weights and biases)
mlp        the SwiGLU MLPs
norms      ``input_layernorm``, ``post_attention_layernorm`` and the final ``norm``
state      the RWKV-7 state stream of the hybrid layers: token-shift lerps ``mu_*``, ``r_proj``,
           ``kappa_proj``, decay / ICLR / gate LoRAs and biases, ``k_a``, ``r_k``, ``ln_x_*``,
           ``state_v_proj`` -- everything the state branch ``W_O[R]`` depends on besides the frozen
           attention projections
fusion     what mixes the state into the attention: ``beta``, ``o_state``, ``gamma``, ``gate_w``,
           ``gate_b``, ``o_middle*``, ``state_q_proj``, ``state_q_scale``
hybrid     ``state`` + ``fusion`` (every parameter upcycling adds)
base       everything but ``hybrid`` (the Qwen2 parameters)
========== =========================================================================================
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

from flax import nnx

from train.config import ConfigError

Path = tuple[Any, ...]

ATTENTION_PROJ = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
FUSION_NAMES = frozenset(
    {"beta", "o_state", "gamma", "gate_w", "gate_b", "o_middle", "o_middle_a", "o_middle_b"}
    | {"state_q_proj", "state_q_scale"}
)
STATE_NAMES = frozenset(
    {"mu_r", "mu_kappa", "mu_w", "mu_a", "mu_g", "r_proj", "kappa_proj", "w0", "w1", "w2", "a0", "a1", "a2"}
    | {"k_a", "g1", "g2", "r_k", "ln_x_scale", "ln_x_bias", "state_v_proj"}
)
GROUPS = ("all", "embeddings", "attention", "mlp", "norms", "state", "fusion", "hybrid", "base")


def path_name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _attn_attr(path: Path) -> str | None:
    """The attribute right under ``self_attn`` (``q_proj``, ``r_proj``, ...), or None."""
    parts = [str(p) for p in path]
    if "self_attn" in parts:
        i = parts.index("self_attn")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def in_group(group: str, path: Path) -> bool:
    """Whether the parameter at ``path`` belongs to the named ``group`` (module docstring)."""
    parts = [str(p) for p in path]
    attr = _attn_attr(path)
    if group == "all":
        return True
    if group == "embeddings":
        return parts[0] in ("embed_tokens", "lm_head")
    if group == "attention":
        return attr in ATTENTION_PROJ
    if group == "mlp":
        return "mlp" in parts
    if group == "norms":
        return parts[0] == "norm" or any(p in ("input_layernorm", "post_attention_layernorm") for p in parts)
    if group == "state":
        return attr in STATE_NAMES
    if group == "fusion":
        return attr in FUSION_NAMES
    if group == "hybrid":
        return attr in STATE_NAMES or attr in FUSION_NAMES
    if group == "base":
        return not in_group("hybrid", path)
    raise ValueError(f"unknown parameter group {group!r}; groups: {', '.join(GROUPS)}")


def select(entries: Sequence[str], paths: Iterable[Path], field: str) -> set[Path]:
    """Paths matched by any entry (a group name or a regex searched in the dotted path). An entry that
    matches nothing is an error (a typo would otherwise silently train or freeze nothing)."""
    paths = list(paths)
    out: set[Path] = set()
    for i, entry in enumerate(entries):
        if entry in GROUPS:
            hit = {p for p in paths if in_group(entry, p)}
        else:
            rx = re.compile(entry)
            hit = {p for p in paths if rx.search(path_name(p))}
        if not hit:
            kind = "group" if entry in GROUPS else "regex"
            raise ConfigError(
                f"config field `{field}[{i}]`: {kind} {entry!r} matches no parameter of this model "
                f"(groups: {', '.join(GROUPS)}; regexes search paths like {path_name(paths[-1])!r}: layers are "
                "stacked, so one path covers every layer of its group and single layers cannot be selected)"
            )
        out |= hit
    return out


@dataclasses.dataclass(frozen=True)
class TrainableSplit:
    """The trained paths of a parameter ``State``: ``split``/``merge`` as :class:`train.state.ParamSplit`."""

    trained: frozenset[Path]

    def _is_trained(self, path: Path, _value: Any = None) -> bool:
        return tuple(path) in self.trained

    def split(self, params: Any) -> tuple[Any, Any]:
        return nnx.split_state(params, self._is_trained, ...)

    def merge(self, trainable: Any, frozen: Any) -> Any:
        return nnx.merge_state(trainable, frozen)


def trainable_split(
    params: Any, trainable: Sequence[str], freeze: Sequence[str], *, prefix: str = "stage"
) -> TrainableSplit | None:
    """The split of ``params`` (an ``nnx.State``, abstract is fine) for a stage's ``trainable`` minus
    ``freeze`` entries; None when every parameter is trained."""
    paths = [tuple(p) for p, _ in nnx.to_flat_state(params)]
    trained = select(trainable or ("all",), paths, f"{prefix}.trainable")
    if freeze:
        trained -= select(freeze, paths, f"{prefix}.freeze")
    if not trained:
        raise ConfigError(
            f"config field `{prefix}.freeze`: it freezes every parameter the stage would train "
            f"(trainable: {list(trainable) or ['all']}); nothing is left to train"
        )
    if len(trained) == len(paths):
        return None
    return TrainableSplit(frozenset(trained))


def describe_split(params: Any, split: TrainableSplit | None) -> str:
    """``"trainable 1,234 of 5,678 parameters (21.7 %) in 40 of 83 tensors"``."""
    import numpy as np

    flat = [(tuple(p), int(np.prod(v.shape))) for p, v in nnx.to_flat_state(params)]
    total = sum(n for _, n in flat)
    if split is None:
        return f"trainable: all {total:,} parameters"
    tr = [(p, n) for p, n in flat if p in split.trained]
    n = sum(k for _, k in tr)
    return (
        f"trainable {n:,} of {total:,} parameters ({100 * n / max(total, 1):.1f} %) in {len(tr)} of "
        f"{len(flat)} tensors; the rest is frozen"
    )
