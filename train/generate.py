"""``wuneng generate``: load a model and a tokenizer, then stream generated text.

    wuneng generate runs/demo --prompt "def " --max-new-tokens 200 --temperature 0.7 --top-p 0.95
    wuneng generate path/to/Qwen2.5-0.5B --prompt "The capital of France is" --dtype bfloat16
    wuneng generate rwkv7.pth --tokenizer rwkv_tokenizer.json --prompt "Hello"

Model sources (:func:`load_model`):

* a training run directory (``run_dir`` holding ``checkpoints/``) or its ``checkpoints/`` directory: the
  parameters of the newest (or ``--step``) orbax checkpoint; the model config comes from the checkpoint;
* a Hugging Face Qwen2 checkpoint directory (``config.json`` + safetensors);
* a BlinkDL RWKV-7 x070 state dict (``.pth`` / ``.safetensors`` / ``.npz``);
* a model config (``preset:NAME`` or a model YAML), randomly initialised (smoke tests, benchmarks).

Tokenizer (``--tokenizer``): ``byte`` or a ``tokenizers`` ``tokenizer.json``; by default the run's token
store tokenizer (run directories) or the ``tokenizer.json`` next to a Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BLINKDL_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference: its config, the NNX model, what it was loaded from and, when the
    source names one, its tokenizer spec (``"byte"`` or a path) or token store path."""

    cfg: Any
    model: Any
    kind: str  # "orbax" | "hf_qwen2" | "hf_wuneng" | "blinkdl_rwkv7" | "random"
    tokenizer_spec: str | None = None
    store: str | None = None
    step: int | None = None
    seq_len: int | None = None  # the training sequence length (run directories)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _checkpoint_dir(path: Path) -> Path | None:
    """The orbax checkpoint directory of a run dir (``run/checkpoints``) or of itself, else None."""
    for d in (path / "checkpoints", path):
        if d.is_dir() and any(
            c.is_dir() and c.name.isdigit() and (c / "state").is_dir() for c in d.iterdir()
        ):
            return d
    return None


def _with_dtype(cfg: Any, dtype: str | None) -> Any:
    if dtype is None:
        return cfg
    if not hasattr(cfg, "dtype"):
        raise ValueError(f"--dtype: model family of {type(cfg).__name__} has no compute dtype option")
    return dataclasses.replace(cfg, dtype=dtype)


def load_orbax(ckpt_dir: str | Path, *, step: int | None = None, dtype: str | None = None) -> LoadedModel:
    """Parameters of a training checkpoint (only ``params`` are read, not the optimizer state)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from train.checkpoint import CheckpointError
    from wuneng_jax.config import config_from_dict
    from wuneng_jax.models import build_model

    ckpt_dir = Path(ckpt_dir).absolute()
    mngr = ocp.CheckpointManager(
        ckpt_dir, item_names=("state", "data", "meta"), options=ocp.CheckpointManagerOptions(create=False)
    )
    steps = sorted(mngr.all_steps())
    if not steps:
        raise CheckpointError(f"{ckpt_dir} holds no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{ckpt_dir} has no checkpoint for step {step}; it has steps {steps}")
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"cannot read the metadata of {ckpt_dir / str(step)}: {e}") from e
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"{ckpt_dir / str(step)}: the checkpoint metadata has no model_config")
    cfg = _with_dtype(config_from_dict(meta["model_config"]), dtype)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), params)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=dev), target)
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
            ),
        )
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"cannot restore the parameters of {ckpt_dir / str(step)} into a {cfg.family} model "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from e
    model = nnx.merge(graphdef, out["state"]["params"], rest)
    train_cfg = meta.get("config") or {}
    data = train_cfg.get("data") or {}
    seq_len = train_cfg.get("seq_len")
    return LoadedModel(
        cfg, model, "orbax", data.get("tokenizer"), data.get("store"), step, int(seq_len) if seq_len else None
    )


def load_model(
    source: str | Path, *, dtype: str | None = None, step: int | None = None, seed: int = 0
) -> LoadedModel:
    """Load a model for inference from any supported source (module docstring)."""
    from flax import nnx

    src = str(source)
    if src.startswith("preset:") or src.endswith((".yaml", ".yml")):
        from wuneng_jax.config import load_model_config
        from wuneng_jax.models import build_model

        cfg = _with_dtype(load_model_config(src.removeprefix("preset:")), dtype)
        log.warning("%s: randomly initialised model (seed %d), not trained weights", src, seed)
        return LoadedModel(cfg, build_model(cfg, rngs=nnx.Rngs(seed)), "random")
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(
            f"model source {src!r} does not exist; give a run directory, a Hugging Face Qwen2 or WuNeng directory, a "
            "BlinkDL RWKV-7 .pth/.safetensors file, or preset:NAME"
        )
    if path.is_dir():
        ckpt = _checkpoint_dir(path)
        if ckpt is not None:
            return load_orbax(ckpt, step=step, dtype=dtype)
        if (path / "config.json").is_file():
            from wuneng_jax.convert.hf_qwen2 import load_qwen2
            from wuneng_jax.convert.hf_wuneng import MODEL_TYPE, load_wuneng
            from wuneng_jax.files import read_json

            hf_config = read_json(path / "config.json")
            if not isinstance(hf_config, dict):
                raise ValueError(f"{path / 'config.json'}: expected a JSON object of model settings")
            is_wuneng = hf_config.get("model_type") == MODEL_TYPE
            load, kind = (load_wuneng, "hf_wuneng") if is_wuneng else (load_qwen2, "hf_qwen2")
            from train.data.tokenizer import tokenizer_of_dir

            cfg, model = load(path, **({"dtype": dtype} if dtype else {}))
            return LoadedModel(cfg, model, kind, tokenizer_of_dir(path))
        raise ValueError(
            f"{path} is neither a training run (no checkpoints/<step>/state) nor a Hugging Face checkpoint "
            "(no config.json)"
        )
    if path.suffix.lower() in BLINKDL_SUFFIXES:
        from wuneng_jax.convert.blinkdl_rwkv7 import load_rwkv7

        cfg, model = load_rwkv7(path, config_overrides={"dtype": dtype} if dtype else None)
        return LoadedModel(cfg, model, "blinkdl_rwkv7")
    raise ValueError(f"{path}: unknown model file type {path.suffix!r}; expected one of {BLINKDL_SUFFIXES}")


def load_tokenizer_for(loaded: LoadedModel, spec: str | None = None):
    """``spec`` if given, else the tokenizer the source names (a run's token store or its config's
    tokenizer, a tokenizer.json beside a HF checkpoint); ValueError when there is none."""
    from train.data.tokenizer import load_tokenizer

    if spec is not None:
        return load_tokenizer(spec)
    if loaded.store is not None:
        try:
            from train.data.store import TokenStore

            return TokenStore(loaded.store, "train").tokenizer()
        except (OSError, ValueError) as e:
            log.info("token store %s unavailable (%s); using the config's tokenizer", loaded.store, e)
    if loaded.tokenizer_spec is not None:
        return load_tokenizer(loaded.tokenizer_spec)
    raise ValueError(
        f"no tokenizer known for this {loaded.kind} model: pass --tokenizer byte or --tokenizer path/to/tokenizer.json"
    )


# ----------------------------------------------------------------------------------------------------
# Streaming text
# ----------------------------------------------------------------------------------------------------


class TextStream:
    """Incremental detokenisation of one row: ``push(ids)`` returns the new complete text (a multi-byte
    character or a merged token is held back until it decodes without U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed :], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def generate_text(
    loaded: LoadedModel,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    sampling,
    seed: int = 0,
    stop_strings: tuple[str, ...] = (),
    stop_on_eos: bool = True,
    stream=None,
    decoder=None,
) -> tuple[list[str], list[list[int]]]:
    """Generated continuations of ``prompts``: (texts cut at the first stop string, new token ids).
    ``stream(text)`` receives row 0's text as it is generated."""
    from wuneng_jax.decode import Decoder

    dec = decoder or Decoder(loaded.model)
    ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    streams = [TextStream(tokenizer) for _ in prompts]

    def on_token(tokens: np.ndarray, emitted: np.ndarray):
        stop = np.zeros(len(tokens), bool)
        for r in np.flatnonzero(emitted):
            new = streams[r].push([int(tokens[r])])
            if r == 0 and stream is not None and new:
                stream(new)
            if stop_strings and any(s in streams[r].text() for s in stop_strings):
                stop[r] = True
        return stop

    out = dec.generate(
        ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_tokens=[tokenizer.eos_id] if stop_on_eos else [],
        seed=seed,
        on_token=on_token,
        vocab_limit=min(int(tokenizer.vocab_size), int(loaded.cfg.vocab_size)),
        pad_id=0,
    )
    texts = []
    for row in out.tokens:
        text = tokenizer.decode(row)
        for s in stop_strings:
            if s in text:
                text = text[: text.index(s)]
        texts.append(text)
    return texts, out.tokens


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def prompt_warnings(
    prompts: list[str], tokenizer, max_new_tokens: int, max_positions: int | None
) -> list[str]:
    """Warnings for requests that run but are probably not what was meant: an empty prompt, or a
    prompt + ``max_new_tokens`` longer than the positions the model was made for."""
    out = []
    for i, p in enumerate(prompts):
        if not p:
            which = "the prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty"
            out.append(
                f"warning: {which}: the model continues from the end-of-text token alone; pass --prompt TEXT"
            )
    if max_positions is not None:
        longest = max(len(tokenizer.encode(p)) or 1 for p in prompts)
        if longest + max_new_tokens > max_positions:
            out.append(
                f"warning: the prompt ({longest} tokens) + --max-new-tokens {max_new_tokens} goes beyond the "
                f"model's max_position_embeddings={max_positions}: later tokens are at positions it was never "
                f"made for; use --max-new-tokens {max(max_positions - longest, 0)} or less"
            )
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model/tokenizer arguments shared by ``generate`` and ``eval``."""
    p.add_argument(
        "source",
        help="run directory (orbax checkpoints), Hugging Face Qwen2 or WuNeng directory, BlinkDL RWKV-7 .pth/.safetensors, "
        "or preset:NAME / model.yaml (random init)",
    )
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the source's own)")
    p.add_argument(
        "--step", type=int, default=None, help="checkpoint step of a run directory (default: newest)"
    )
    p.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype (default: the model's)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and random-init seed)")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="wuneng generate", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=None, help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep generating after the EOS token")
    return p


def run(args: argparse.Namespace) -> int:
    from wuneng_jax.decode import SamplingConfig

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [
            line.rstrip("\n") for line in Path(args.prompt_file).read_text().splitlines() if line.strip()
        ]
    if not prompts:
        prompts = [""]
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    t0 = time.perf_counter()
    loaded = load_model(args.source, dtype=args.dtype, step=args.step, seed=args.seed)
    tokenizer = load_tokenizer_for(loaded, args.tokenizer)
    max_positions = getattr(loaded.cfg, "max_position_embeddings", None)
    for line in prompt_warnings(prompts, tokenizer, args.max_new_tokens, max_positions):
        print(line, file=sys.stderr)
    print(
        f"[{loaded.cfg.family} model from {args.source} ({loaded.kind}"
        + (f", step {loaded.step}" if loaded.step is not None else "")
        + f"), loaded in {time.perf_counter() - t0:.1f}s]",
        file=sys.stderr,
    )
    single = len(prompts) == 1
    if single:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    t0 = time.perf_counter()
    texts, token_ids = generate_text(
        loaded,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        stop_strings=tuple(args.stop),
        stop_on_eos=not args.no_eos_stop,
        stream=stream if single else None,
    )
    dt = time.perf_counter() - t0
    if single:
        sys.stdout.write("\n")
    else:
        for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
            print(f"=== {i} ===\n{p}{t}")
    n = sum(len(t) for t in token_ids)
    print(f"[{n} tokens in {dt:.2f}s including compilation]", file=sys.stderr)
    return 0
