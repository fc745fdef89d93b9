"""Evaluation: perplexity over a token store equals exp(mean token loss) computed independently; the
log-likelihood scorer, rolling windows and multiple choice on a model whose probabilities are known in
closed form (the successor model); the lm-eval adapter's three methods on fake requests; `wuneng eval`."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from decode_support import ALPHA, MC_TEXT, make_model, successor_logprobs, successor_model, write_run

from train.data.tokenizer import ByteTokenizer
from wuneng_jax.eval import LoglikelihoodScorer, MCQuestion, rolling_requests, score_multiple_choice

V = 32
HI, LO = successor_logprobs(V, ALPHA)  # log p(successor), log p(any other token)
BYTE_HI, BYTE_LO = successor_logprobs(258, ALPHA)


@pytest.fixture(scope="module")
def succ_scorer() -> LoglikelihoodScorer:
    return LoglikelihoodScorer(successor_model(V, ALPHA), batch_size=4, max_length=8, length_bucket=8)


# ----------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------


def test_perplexity_equals_exp_mean_token_loss(tmp_path):
    """`perplexity` (packed rows, sharded over 8 devices, jitted) == exp of the mean next-token loss
    computed here from the raw token stream: each row window is split into its documents, each piece is
    run through the model on its own and the loss is taken in float64 numpy."""
    from train.data.prepare import prepare
    from train.data.store import TokenStore
    from train.evaluate import perplexity

    docs = [
        f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 3) for i in range(12)
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare([tmp_path / "docs.jsonl"], tmp_path / "store", "byte", eval_fraction=0.5, progress=False)
    store = TokenStore(tmp_path / "store", "eval")
    model = make_model("qwen2", seed=5, vocab_size=264)
    seq_len, batch = 32, 8
    res = perplexity(model, store, seq_len=seq_len, batch_size=batch, progress=False)

    stream = np.asarray(store.read(0, store.num_tokens), np.int64)
    doc = np.searchsorted(store.offsets, np.arange(len(stream)), side="right") - 1
    pieces = []  # (start, stop) of each document piece of each row window
    for r in range(math.ceil(len(stream) / seq_len)):
        lo, hi = r * seq_len, min((r + 1) * seq_len, len(stream))
        cuts = [lo] + [i for i in range(lo + 1, hi) if doc[i] != doc[i - 1]] + [hi]
        pieces += list(zip(cuts[:-1], cuts[1:], strict=True))
    tokens = np.zeros((len(pieces), seq_len), np.int32)
    seg = np.zeros((len(pieces), seq_len), np.int32)
    for i, (a, b) in enumerate(pieces):
        tokens[i, : b - a], seg[i, : b - a] = stream[a:b], 1
    logits = np.asarray(jax.jit(lambda m, x, s: m(x, segment_ids=s))(model, tokens, seg), np.float64)
    nll, count = 0.0, 0
    for i, (a, b) in enumerate(pieces):
        for j, pos in enumerate(range(a, b)):
            if pos + 1 < len(stream) and doc[pos + 1] == doc[pos]:  # the next token is in the same document
                row = logits[i, j]
                lse = row.max() + math.log(np.exp(row - row.max()).sum())
                nll += lse - row[stream[pos + 1]]
                count += 1
    assert res.tokens == count
    np.testing.assert_allclose(res.nll, nll / count, rtol=1e-5)
    np.testing.assert_allclose(res.perplexity, math.exp(nll / count), rtol=1e-5)

    # `wuneng eval RUN_DIR`: the run's own store, split and sequence length by default
    from train.cli import main

    run_dir = write_run(model, tmp_path / "run", store=str(tmp_path / "store"), seq_len=seq_len)
    argv = [str(run_dir), "--batch-size", str(batch), "--no-progress", "--output", str(tmp_path / "r.json")]
    assert main(["eval", *argv]) == 0
    out = json.loads((tmp_path / "r.json").read_text())["perplexity"]
    assert out["tokens"] == count and out["seq_len"] == seq_len
    np.testing.assert_allclose(out["perplexity"], math.exp(nll / count), rtol=1e-5)

    # a model with non-finite parameters: a named error, never a `nan` perplexity
    from flax import nnx

    nnx.update(model, jax.tree.map(lambda p: p * np.nan, nnx.state(model, nnx.Param)))
    with pytest.raises(ValueError, match=r"the loss is nan \(not finite\).*parameters are not finite"):
        perplexity(model, store, seq_len=seq_len, batch_size=batch, max_batches=1, progress=False)


def test_multiple_choice_with_non_finite_scores_is_an_error():
    from train.evaluate import check_mc_finite
    from wuneng_jax.eval.multiple_choice import MCResult

    def result(ll):
        return MCResult(1.0, 1.0, 1, [[ll, -2.0]], [0], [0])

    assert check_mc_finite(result(-1.0)).acc == 1.0
    with pytest.raises(ValueError, match=r"1 choice log-likelihoods are nan or infinite \(not finite\)"):
        check_mc_finite(result(float("nan")))


# ----------------------------------------------------------------------------------------------------
# Scorer, rolling windows, multiple choice (successor model: known answers)
# ----------------------------------------------------------------------------------------------------


def test_loglikelihood_known_values(succ_scorer):
    scores = succ_scorer.score(
        [
            ([1, 2], [3, 4, 5]),  # all successors: greedy
            ([1, 2], [3, 9]),  # 9 is not the successor of 3
            ([7], [3]),
            (list(range(20)), [20, 21]),  # context longer than max_length: the end is kept
        ]
    )
    want = [3 * HI, HI + LO, LO, 2 * HI]
    np.testing.assert_allclose([s.logprob for s in scores], want, rtol=1e-5)
    assert [s.is_greedy for s in scores] == [True, False, False, True]
    with pytest.raises(ValueError, match="context is empty"):
        succ_scorer.score([([], [1])])
    with pytest.raises(ValueError, match="continuation is empty"):
        succ_scorer.score([([1], [])])


def test_rolling_windows_cover_every_token_once(succ_scorer):
    toks = list(range(5, 24))  # 19 tokens, max_length 8 -> windows of 8, 8, 3
    reqs = rolling_requests(toks, prefix_token=0, max_length=8)
    assert [c for _, c in reqs] == [toks[:8], toks[8:16], toks[16:]]
    assert [ctx[-1] for ctx, _ in reqs] == [0, toks[7], toks[15]]
    # first token follows the prefix 0 (successor 1 != 5): LO; every later one is a successor
    np.testing.assert_allclose(succ_scorer.rolling(toks, prefix_token=0), LO + 18 * HI, rtol=1e-5)


def test_multiple_choice_known_answers():
    tok = ByteTokenizer()
    questions = [
        MCQuestion(tok.encode(q["context"]), [tok.encode(c) for c in q["choices"]], q["gold"])
        for q in MC_TEXT
    ]
    scorer = LoglikelihoodScorer(successor_model(258, ALPHA), batch_size=4)
    res = score_multiple_choice(scorer, questions)
    assert res.predictions == [0, 1, 1] and res.predictions_norm == [0, 0, 0]
    assert res.acc == pytest.approx(2 / 3) and res.acc_norm == pytest.approx(2 / 3) and res.n == 3
    want = [[BYTE_HI, BYTE_LO, BYTE_LO], [BYTE_HI + BYTE_LO, BYTE_LO], [4 * BYTE_HI, BYTE_LO]]
    for got, exp in zip(res.loglikelihoods, want, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5)
    with pytest.raises(ValueError, match="gold"):
        MCQuestion([1], [[2], [3]], 2)


# ----------------------------------------------------------------------------------------------------
# lm-eval adapter (methods called directly with lm-eval-style requests) and `wuneng eval`
# ----------------------------------------------------------------------------------------------------


def _req(*args):
    return SimpleNamespace(args=args)


def test_lm_eval_adapter_methods():
    from train.generate import LoadedModel
    from train.lm_eval_adapter import WuNengLM

    model = successor_model(258, ALPHA)
    lm = WuNengLM(
        loaded=LoadedModel(model.cfg, model, "test"),
        tokenizer="byte",
        batch_size=2,
        max_length=4,
        progress=False,
    )
    ll = lm.loglikelihood([_req("abc", "de"), _req("abc ", "x"), _req("", "a")])
    np.testing.assert_allclose([x for x, _ in ll], [2 * BYTE_HI, 2 * BYTE_LO, BYTE_LO], rtol=1e-5)
    assert [g for _, g in ll] == [True, False, False]  # "abc " + "x": the space moves into the continuation
    rolling = lm.loglikelihood_rolling([_req("abcdefghij"), _req("zz")])  # windows of 4 tokens
    np.testing.assert_allclose(rolling, [BYTE_LO + 9 * BYTE_HI, 2 * BYTE_LO], rtol=1e-5)
    gen = lm.generate_until(
        [
            _req("abc", {"until": ["g"], "max_gen_toks": 6}),
            _req("pq", {"until": ["u", "t"], "max_gen_toks": 6}),
            _req("xy", {"until": [], "max_gen_toks": 3}),
        ]
    )
    assert gen == ["def", "rs", "z{|"]


def test_cli_eval_multiple_choice(tmp_path, capsys):
    from train.cli import main
    from wuneng_jax.convert.hf_qwen2 import save_qwen2

    model = successor_model(258, ALPHA)
    hf = save_qwen2(model, model.cfg, tmp_path / "hf")
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(q) for q in MC_TEXT))
    out = tmp_path / "res.json"
    argv = [
        str(hf),
        "--tokenizer",
        "byte",
        "--mc",
        str(tmp_path / "mc.jsonl"),
        "--output",
        str(out),
        "--no-progress",
    ]
    assert main(["eval", *argv]) == 0
    res = json.loads(out.read_text())["multiple_choice"]
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
    assert res["predictions"] == [0, 1, 1]
    assert "acc 0.6667" in capsys.readouterr().out
    assert main(["eval", str(hf)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
