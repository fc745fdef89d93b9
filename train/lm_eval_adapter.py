"""EleutherAI ``lm-eval`` adapter: the ``wuneng`` model type (optional dependency ``pip install lm-eval``).

From Python::

    import lm_eval
    from train.lm_eval_adapter import WuNengLM
    lm = WuNengLM("runs/demo", tokenizer="byte", batch_size=16)        # or pretrained=HF dir / .pth ...
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], limit=100)

From the shell (lm-eval's own CLI, with this module registering ``wuneng`` first)::

    python -m train.lm_eval_adapter run --model wuneng --model_args pretrained=runs/demo,tokenizer=byte \\
        --tasks hellaswag --limit 100
    wuneng eval runs/demo --tasks hellaswag --limit 100                  # the same through `wuneng eval`

``model_args``: ``pretrained`` (any source ``wuneng generate`` accepts), ``tokenizer``, ``dtype``,
``step``, ``max_length``, ``max_gen_toks``, ``batch_size``, ``seed``.

The three request types map onto this project's jitted cores: ``loglikelihood`` ->
:class:`~wuneng_jax.eval.LoglikelihoodScorer`, ``loglikelihood_rolling`` -> its disjoint-window
``rolling``, ``generate_until`` -> :class:`~wuneng_jax.decode.Decoder` (prefill + cached decode, stop
strings checked as text after every token). Without lm-eval installed the class still works on any
object with an ``args`` tuple (lm-eval's ``Instance``), which the tests use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

try:  # optional dependency
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised when lm-eval is absent
    _LMBase = object
    _register_model = None
    HAVE_LM_EVAL = False

MODEL_NAME = "wuneng"


def _progress(items: Sequence[Any], enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch")


class WuNengLM(_LMBase):  # type: ignore[misc, valid-type]
    """lm-eval ``LM`` over a wuneng_jax model (qwen2, rwkv7 or wuneng).

    Args:
      pretrained: model source (run directory, HF Qwen2 directory, BlinkDL file, ``preset:NAME``), or
        ``loaded``: an already loaded :class:`train.generate.LoadedModel`.
      tokenizer: ``"byte"``, a tokenizer.json path, or a tokenizer object (default: the source's own).
      batch_size: rows per compiled batch (lm-eval may pass it as a string).
      max_length: longest model input (default: the config's ``max_position_embeddings``).
      max_gen_toks: default generation budget of ``generate_until``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        loaded: Any = None,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        dtype: str | None = None,
        step: int | str | None = None,
        seed: int | str = 0,
        progress: bool = True,
        **unused: Any,
    ):
        if HAVE_LM_EVAL:
            super().__init__()
        from train.generate import load_model, load_tokenizer_for
        from wuneng_jax.decode import Decoder
        from wuneng_jax.eval import LoglikelihoodScorer

        if loaded is None:
            if pretrained is None:
                raise ValueError("WuNengLM: give pretrained=<model source> (or loaded=LoadedModel)")
            loaded = load_model(
                pretrained, dtype=dtype, step=None if step is None else int(step), seed=int(seed)
            )
        self.loaded = loaded
        if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
            tokenizer = load_tokenizer_for(loaded, None if tokenizer is None else os.fspath(tokenizer))
        self.tok = tokenizer
        if str(batch_size).startswith("auto"):
            batch_size = 8
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.progress = progress
        self.scorer = LoglikelihoodScorer(
            loaded.model,
            batch_size=self.batch_size,
            max_length=None if max_length is None else int(max_length),
        )
        self.max_length = self.scorer.max_length
        self.decoder = Decoder(loaded.model)

    # -- lm-eval interface -----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.describe().get("name", type(self.tok).__name__))

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per ``Instance`` with ``args = (context, continuation)``."""
        from train.data.tokenizer import encode_pair

        pairs = [encode_pair(self.tok, *req.args[:2]) for req in requests]
        scores = self.scorer.score(pairs, progress=self.progress and not disable_tqdm, desc="loglikelihood")
        out = [(s.logprob, s.is_greedy) for s in scores]
        for req, res in zip(requests, out, strict=True):
            self._cache("loglikelihood", req, res)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Total ``log p(text)`` per ``Instance`` with ``args = (text,)``, conditioned on EOS, in disjoint
        windows of up to ``max_length`` tokens (each with as much preceding context as fits)."""
        from wuneng_jax.eval import rolling_requests

        windows, owner = [], []
        for i, req in enumerate(requests):
            ws = rolling_requests(self.tok.encode(req.args[0]), self.eot_token_id, self.max_length)
            windows += ws
            owner += [i] * len(ws)
        scores = self.scorer.score(windows, progress=self.progress and not disable_tqdm, desc="rolling")
        out = [0.0] * len(requests)
        for i, s in zip(owner, scores, strict=True):
            out[i] += s.logprob
        for req, res in zip(requests, out, strict=True):
            self._cache("loglikelihood_rolling", req, res)
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generated text per ``Instance`` with ``args = (context, gen_kwargs)``, cut at the first ``until``
        string; greedy unless ``do_sample`` / ``temperature > 0``."""
        from wuneng_jax.decode import SamplingConfig

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(_gen_kwargs(req).items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for idx in groups.values():
            kw = _gen_kwargs(requests[idx[0]])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", True) else 0.0
            sampling = SamplingConfig(
                temperature=temperature,
                top_k=int(kw.get("top_k", 0) or 0),
                top_p=float(kw.get("top_p", 1.0) or 1.0),
            )
            keep = max(1, self.max_length - max_new)
            batches = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
            for batch in _progress(batches, self.progress and not disable_tqdm, "generate_until"):
                prompts = [
                    (self.tok.encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in batch
                ]
                prompts += [[self.eot_token_id]] * (self.batch_size - len(prompts))  # static batch shape
                texts = self._generate(prompts, max_new, sampling, until)
                for i, text in zip(batch, texts, strict=False):
                    out[i] = text
                    self._cache("generate_until", requests[i], text)
        return out  # type: ignore[return-value]

    # -- helpers ---------------------------------------------------------------------------------

    def _generate(self, prompts: list[list[int]], max_new: int, sampling: Any, until: list[str]) -> list[str]:
        import numpy as np

        from train.generate import TextStream

        streams = [TextStream(self.tok) for _ in prompts]

        def on_token(tokens, emitted):
            stop = np.zeros(len(tokens), bool)
            for r in np.flatnonzero(emitted):
                streams[r].push([int(tokens[r])])
                stop[r] = any(u in streams[r].text() for u in until)
            return stop

        res = self.decoder.generate(
            prompts,
            max_new_tokens=max_new,
            sampling=sampling,
            stop_tokens=[self.eot_token_id],
            seed=self.seed,
            on_token=on_token if until else None,
            vocab_limit=min(int(self.tok.vocab_size), int(self.loaded.cfg.vocab_size)),
        )
        texts = []
        for row in res.tokens:
            text = self.tok.decode(row)
            for u in until:
                if u and u in text:
                    text = text[: text.index(u)]
            texts.append(text)
        return texts

    def _cache(self, kind: str, req: Any, result: Any) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, req.args, result)


def _gen_kwargs(req: Any) -> dict[str, Any]:
    kw = req.args[1] if len(req.args) > 1 else {}
    return dict(kw or {})


if HAVE_LM_EVAL:
    from lm_eval.api.registry import model_registry as _registry

    if MODEL_NAME not in _registry:
        _register_model(MODEL_NAME)(WuNengLM)


def run_lm_eval(
    loaded: Any,
    tokenizer: Any,
    *,
    tasks: list[str],
    batch_size: int = 8,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on an already loaded model -> ``{task: {metric: value}}``."""
    if not HAVE_LM_EVAL:
        raise ValueError("lm-eval is not installed: `pip install lm-eval` (or `pip install -e .[eval]`)")
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = WuNengLM(
        loaded=loaded, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, progress=progress
    )
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm, log_samples=False
    )
    if res is None:
        raise RuntimeError("lm-eval returned no results")
    return {task: dict(metrics) for task, metrics in res["results"].items()}


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``wuneng`` model registered (``python -m train.lm_eval_adapter``)."""
    if not HAVE_LM_EVAL:
        sys.exit("lm-eval is not installed: `pip install lm-eval`")
    from lm_eval.__main__ import cli_evaluate

    from train.platform import pin_cpu_without_accelerator

    pin_cpu_without_accelerator()  # before any JAX backend starts: no libtpu probe on a CPU host

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
