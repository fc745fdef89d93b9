"""End to end through EleutherAI lm-eval (optional dependency): three local tasks whose data files this
test writes (multiple choice, generate_until, loglikelihood_rolling) run with ``simple_evaluate`` on the
successor model, whose answers are known by construction."""

from __future__ import annotations

import json
import math
import os

import lm_eval  # noqa: E402,F401  (in the dev extra: this test must run, not skip)
import pytest
from decode_support import ALPHA, MC_TEXT, successor_logprobs, successor_model

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
{body}"""

MC = """doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN = """doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: ""
generation_kwargs:
  until: ["t", "g"]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
"""

ROLL = """doc_to_text: ""
doc_to_target: "{{context}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


def test_lm_eval_local_tasks_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    from train.data.tokenizer import ByteTokenizer
    from train.generate import LoadedModel
    from train.lm_eval_adapter import MODEL_NAME, WuNengLM, run_lm_eval

    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(q) for q in MC_TEXT))
    gen_docs = [{"context": "abc", "target": "def"}, {"context": "pq", "target": "rs"}]
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(d) for d in gen_docs))
    for name, data, kind, body in (
        ("succ_mc", "mc.jsonl", "multiple_choice", MC),
        ("succ_gen", "gen.jsonl", "generate_until", GEN),
        ("succ_roll", "gen.jsonl", "loglikelihood_rolling", ROLL),
    ):
        text = TASK.format(name=name, data=tmp_path / data, output_type=kind, body=body)
        (tmp_path / f"{name}.yaml").write_text(text)

    from lm_eval.api.registry import get_model

    assert get_model(MODEL_NAME) is WuNengLM  # `--model wuneng` resolves once the adapter is imported
    model = successor_model(258, ALPHA)
    out = run_lm_eval(
        LoadedModel(model.cfg, model, "test"),
        ByteTokenizer(),
        tasks=["succ_mc", "succ_gen", "succ_roll"],
        include_path=str(tmp_path),
        batch_size=4,
        progress=False,
    )
    assert out["succ_mc"]["acc,none"] == pytest.approx(2 / 3)
    assert out["succ_mc"]["acc_norm,none"] == pytest.approx(2 / 3)
    assert out["succ_gen"]["exact_match,none"] == 1.0  # "abc" -> "def" (stops at g), "pq" -> "rs"
    hi, lo = successor_logprobs(258, ALPHA)
    total = -((lo + 2 * hi) + (lo + hi))  # "abc" and "pq" after the EOS prefix, in nats
    assert out["succ_roll"]["word_perplexity,none"] == pytest.approx(math.exp(total / 2), rel=1e-4)
    assert out["succ_roll"]["bits_per_byte,none"] == pytest.approx(total / 5 / math.log(2), rel=1e-4)


def test_adapter_command_pins_the_cpu_on_a_host_without_accelerators(monkeypatch):
    """`python -m train.lm_eval_adapter` on a CPU host with libtpu installed: no TPU probe (JAX_PLATFORMS=cpu
    is set before lm-eval starts the model)."""
    import lm_eval.__main__

    from train import lm_eval_adapter, platform

    seen = []
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(platform, "gpu_visible", lambda: False)
    monkeypatch.setattr("train.aot.topology.tpu_attached", lambda: False)
    monkeypatch.setattr(
        lm_eval.__main__, "cli_evaluate", lambda: seen.append(os.environ.get("JAX_PLATFORMS"))
    )
    lm_eval_adapter.main(["--help"])
    assert seen == ["cpu"]
