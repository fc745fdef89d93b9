"""Generation: sampling filters and their distributions, seeded reproducibility, stop tokens and the
streaming callback, batched ragged prompts == each prompt alone, and ``wuneng generate`` loading an
orbax run directory and a Hugging Face directory (greedy output known by construction)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_support import make_model, successor_model, write_run
from flax import nnx

from wuneng_jax.decode import Decoder, SamplingConfig, filter_logits, sample

N_DRAWS = 4000


def _draws(logits: np.ndarray, cfg: SamplingConfig, seed: int = 0) -> np.ndarray:
    """N_DRAWS independent samples of one logits row (each batch row draws with its own key)."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N_DRAWS, len(logits)))
    return np.asarray(sample(batch, cfg, jax.random.PRNGKey(seed), 0))  # eager: faster than 6 compiles


def _assert_distribution(draws: np.ndarray, probs: np.ndarray) -> None:
    freq = np.bincount(draws, minlength=len(probs)) / len(draws)
    # 5 sigma of a binomial frequency
    tol = 5 * np.sqrt(probs * (1 - probs) / len(draws)) + 1e-9
    assert np.all(np.abs(freq - probs) <= tol), (freq, probs)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


LOGITS = np.log(np.array([0.05, 0.5, 0.1, 0.3, 0.05]))  # sorted: 1 (0.5), 3 (0.3), 2 (0.1), 0, 4


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32)
    out = sample(jnp.asarray(logits), SamplingConfig(), jax.random.PRNGKey(0), 0)
    np.testing.assert_array_equal(np.asarray(out), logits.argmax(-1))
    # vocab_limit: ids at or above it are never drawn
    out = sample(jnp.asarray(logits), SamplingConfig(), jax.random.PRNGKey(0), 0, vocab_limit=10)
    np.testing.assert_array_equal(np.asarray(out), logits[:, :10].argmax(-1))


def test_temperature_top_k_top_p_distributions():
    _assert_distribution(_draws(LOGITS, SamplingConfig(temperature=1.0)), _softmax(LOGITS))
    _assert_distribution(_draws(LOGITS, SamplingConfig(temperature=2.0)), _softmax(LOGITS / 2))
    # top-k = 2 keeps tokens 1 and 3, renormalised
    _assert_distribution(
        _draws(LOGITS, SamplingConfig(temperature=1.0, top_k=2)), np.array([0, 0.625, 0, 0.375, 0])
    )
    # top-p = 0.85: 0.5 + 0.3 < 0.85 so token 2 (mass before it 0.8) is kept too
    p = np.array([0, 0.5, 0.1, 0.3, 0]) / 0.9
    _assert_distribution(_draws(LOGITS, SamplingConfig(temperature=1.0, top_p=0.85)), p)
    # top-p = 0.5: only the best token (the mass before the second one is already 0.5)
    assert set(_draws(LOGITS, SamplingConfig(temperature=1.0, top_p=0.5)).tolist()) == {1}
    filtered = np.asarray(
        filter_logits(jnp.asarray(LOGITS), SamplingConfig(temperature=1.0, top_k=3, top_p=0.7))
    )
    assert np.isfinite(filtered[[1, 3]]).all() and np.isneginf(filtered[[0, 2, 4]]).all()


def test_sampling_seeded_reproducible():
    cfg = SamplingConfig(temperature=1.0)
    a, b, c = _draws(LOGITS, cfg, seed=3), _draws(LOGITS, cfg, seed=3), _draws(LOGITS, cfg, seed=4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3


def test_sampling_config_errors():
    for kw, match in (
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
    ):
        with pytest.raises(ValueError, match=match):
            SamplingConfig(**kw)


def test_generate_seeded_reproducible():
    dec = Decoder(make_model("qwen2", seed=4))
    prompts = [[3, 14, 15, 9, 2, 6], [5, 35]]
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
    a, b, c = (
        dec.generate(prompts, max_new_tokens=8, sampling=cfg, seed=s, prompt_bucket=8) for s in (5, 5, 6)
    )
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert all(len(t) == 8 for t in a.tokens) and a.finish_reasons == ["length", "length"]


def test_generate_batched_equals_alone():
    """Greedy rows of a ragged batch equal each prompt generated alone (left padding reaches neither
    attention nor the RWKV-7 state): the hybrid family, which has both."""
    dec = Decoder(make_model("wuneng", seed=4, num_layers=1, hybrid_layers="all"))
    prompts = [[3, 14, 15, 9, 2, 6], [5, 35]]
    both = dec.generate(prompts, max_new_tokens=6, prompt_bucket=8)
    for i, p in enumerate(prompts):
        alone = dec.generate([p], max_new_tokens=6, prompt_bucket=8)
        assert both.tokens[i] == alone.tokens[0]


def test_stop_tokens_and_streaming_callback():
    """Successor model: greedy from token t gives t+1, t+2, ... (known by construction)."""
    dec = Decoder(successor_model(32, alpha=3.0))
    out = dec.generate([[3], [10, 11]], max_new_tokens=5, prompt_bucket=4)
    assert out.tokens == [[4, 5, 6, 7, 8], [12, 13, 14, 15, 16]] and out.finish_reasons == ["length"] * 2
    seen: list[tuple[list[int], list[bool]]] = []

    def on_token(tokens, emitted):
        seen.append((tokens.tolist(), emitted.tolist()))
        return tokens == 13  # stop row 1 once it produced 13

    out = dec.generate([[3], [10, 11]], max_new_tokens=5, stop_tokens=[6], on_token=on_token, prompt_bucket=4)
    assert out.tokens == [[4, 5], [12, 13]]
    assert out.finish_reasons == ["stop", "callback"]
    assert seen == [([4, 12], [True, True]), ([5, 13], [True, True]), ([6, 14], [False, False])]


def _cli(args: list[str]) -> int:
    from train.cli import main

    return main(["generate", *args])


def test_cli_generate_from_hf_dir_and_orbax_run(tmp_path, capsys):
    """`wuneng generate` streams the greedy continuation of a byte-level successor model ("abc" ->
    "defg...") loaded from a Hugging Face directory and from a training run's orbax checkpoint."""
    from wuneng_jax.convert.hf_qwen2 import save_qwen2

    model = successor_model(258, alpha=4.0)
    hf_dir = save_qwen2(model, model.cfg, tmp_path / "hf")
    hf_config = json.loads((hf_dir / "config.json").read_text())  # 3 + 5 tokens exceed 6 positions: a warning
    (hf_dir / "config.json").write_text(json.dumps({**hf_config, "max_position_embeddings": 6}))
    assert (
        _cli(
            [
                str(hf_dir),
                "--tokenizer",
                "byte",
                "--prompt",
                "abc",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert out.out == "abcdefgh\n"
    assert (
        "warning: the prompt (3 tokens) + --max-new-tokens 5 goes beyond the model's max_position_embeddings=6"
        in out.err
    )

    write_run(model, tmp_path / "run", step=7)  # an orbax training run directory
    rc = _cli(
        [
            str(tmp_path / "run"),
            "--prompt",
            "klm",
            "--prompt",
            "x",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
        ]
    )
    assert rc == 0
    out = capsys.readouterr()
    assert "=== 0 ===\nklmnop\n=== 1 ===\nxyz{\n" in out.out and "step 7" in out.err


def test_load_model_sources(tmp_path):
    """`load_model` reads a BlinkDL RWKV-7 state dict and a WuNeng HF-style dir (exact parameters); bad
    sources are clear errors."""
    from train.generate import load_model
    from wuneng_jax.convert.blinkdl_rwkv7 import export_rwkv7, save_state_dict
    from wuneng_jax.convert.hf_wuneng import save_wuneng

    model = make_model("rwkv7", seed=6)
    save_state_dict(export_rwkv7(model), tmp_path / "rwkv.safetensors")
    loaded = load_model(tmp_path / "rwkv.safetensors", dtype="bfloat16")
    assert loaded.kind == "blinkdl_rwkv7" and loaded.cfg.dtype == "bfloat16"
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    wuneng = make_model("wuneng", seed=7)
    save_wuneng(wuneng, wuneng.cfg, tmp_path / "wuneng_hf")
    loaded = load_model(tmp_path / "wuneng_hf")
    assert loaded.kind == "hf_wuneng" and loaded.cfg.fusion == wuneng.cfg.fusion
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(wuneng, nnx.Param)),
        nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a training run"):
        load_model(tmp_path / "empty")


def test_prompt_warnings():
    from train.data.tokenizer import ByteTokenizer
    from train.generate import prompt_warnings

    tok = ByteTokenizer()
    assert prompt_warnings(["abc"], tok, 10, 16) == []
    assert prompt_warnings(["abc"], tok, 10, None) == []  # a model without positions (rwkv7)
    (empty,) = prompt_warnings([""], tok, 4, 16)
    assert empty.startswith("warning: the prompt is empty") and "--prompt TEXT" in empty
    lines = prompt_warnings(["abcd", ""], tok, 13, 16)
    assert lines[0].startswith("warning: prompt 1 is empty")
    assert "(4 tokens) + --max-new-tokens 13" in lines[1] and "use --max-new-tokens 12 or less" in lines[1]
