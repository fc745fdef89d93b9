"""SFT chat data: ChatML rendering, assistant-only masks (byte and Hugging Face tokenizers), packing with
segment ids that keeps the masks aligned, truncation, bad input, and the embedded sample set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train.config import ChatDataConfig, ChatTemplateConfig, ConfigError, from_dict
from train.data.chat import (
    ChatDataError,
    build_rows,
    pack_conversations,
    read_jsonl,
    render,
    sample_conversations,
    split_eval,
    tokenize,
    write_jsonl,
)
from train.data.tokenizer import ByteTokenizer, HFTokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]


def test_chatml_rendering_and_assistant_only_mask():
    pieces = render(CONV, ChatTemplateConfig())
    text = "".join(t for t, _ in pieces)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\nYou're welcome.<|im_end|>\n"
    )
    tok = ByteTokenizer()
    ids, trained = tokenize(pieces, tok)
    assert tok.decode(ids) == text
    # the trained tokens are exactly the assistant answers, each with its end-of-turn marker
    assert tok.decode(ids[trained]) == "4.<|im_end|>You're welcome.<|im_end|>"
    # a default system prompt is added only when the conversation has none
    t2 = ChatTemplateConfig(default_system="You are Qwen.")
    assert "".join(t for t, _ in render(CONV, t2)) == text
    no_sys = "".join(t for t, _ in render(CONV[1:], t2))
    assert no_sys.startswith("<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n")


def _hf_tokenizer(tmp_path) -> HFTokenizer:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    for w in ["system", "user", "assistant", "\n", "hi", "hello", "there", "Be", "brief", "!", "."]:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(" +"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="isolated"),
        ]
    )
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))
    return HFTokenizer(path)


def test_hf_tokenizer_special_tokens_are_atomic_and_mask_aligned(tmp_path):
    tok = _hf_tokenizer(tmp_path)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there !"}]
    ids, trained = tokenize(render(conv, ChatTemplateConfig()), tok)
    v = tok._tok.token_to_id
    want = [v("<|im_start|>"), v("user"), v("\n"), v("hi"), v("<|im_end|>"), v("\n")]
    want += [
        v("<|im_start|>"),
        v("assistant"),
        v("\n"),
        v("hello"),
        v("there"),
        v("!"),
        v("<|im_end|>"),
        v("\n"),
    ]
    assert ids.tolist() == want
    assert trained.tolist() == [False] * 9 + [True] * 4 + [False]


def _random_docs(rng, n, max_len):
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, max_len))
        docs.append((rng.integers(0, 250, length).astype(np.int32), rng.random(length) < 0.5))
    return docs


def test_packing_keeps_every_conversation_and_its_mask():
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 60, 40)
    T, pad = 32, 257
    rows, stats = pack_conversations(docs, T, pad)
    assert stats["conversations"] == 60 and stats["truncated"] == sum(len(d[0]) > T for d in docs)
    # walk the rows and rebuild the conversations independently of the packer
    got = []
    for r in range(stats["rows"]):
        seg = rows["segment_ids"][r]
        assert (
            seg[0] == 1
            and np.all(np.diff(seg[seg > 0]) >= 0)
            and np.all(seg[np.argmax(seg == 0) :] == 0 if (seg == 0).any() else True)
        )
        for s in range(1, seg.max() + 1):
            (idx,) = np.nonzero(seg == s)
            assert np.all(np.diff(idx) == 1)  # contiguous
            got.append(
                (
                    rows["tokens"][r, idx],
                    rows["targets"][r, idx],
                    rows["positions"][r, idx],
                    rows["loss_mask"][r, idx],
                )
            )
        padding = seg == 0
        assert np.all(rows["tokens"][r, padding] == pad) and np.all(rows["loss_mask"][r, padding] == 0)
    assert len(got) == len(docs)
    for (ids, trained), (tokens, targets, positions, mask) in zip(docs, got, strict=True):
        n = min(len(ids), T)
        assert np.array_equal(tokens, ids[:n]) and np.array_equal(positions, np.arange(n))
        assert (
            np.array_equal(targets[:-1], ids[1:n]) and targets[-1] == pad
        )  # no target past the conversation
        assert np.array_equal(mask[:-1], trained[1:n].astype(np.float32)) and mask[-1] == 0
    # greedy: no row could have taken the next conversation
    dropped_rows, _ = pack_conversations(docs, T, pad, overlong="drop")
    assert dropped_rows["tokens"].shape[1] == T


def test_overlong_drop_and_counts():
    docs = [
        (np.arange(5, dtype=np.int32), np.ones(5, bool)),
        (np.arange(50, dtype=np.int32), np.ones(50, bool)),
    ]
    rows, stats = pack_conversations(docs, 16, 0, overlong="drop")
    assert stats["dropped"] == 1 and stats["conversations"] == 1 and stats["rows"] == 1
    assert stats["trained_tokens"] == 4 == rows["loss_mask"].sum()


def test_jsonl_reading_errors_name_the_line(tmp_path):
    good = tmp_path / "a.jsonl"
    write_jsonl(good, [CONV, CONV[:3]])
    assert read_jsonl([str(good)]) == [CONV, CONV[:3]]
    bad = tmp_path / "b.jsonl"
    bad.write_text(
        json.dumps({"messages": CONV}) + "\n\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n"
    )
    with pytest.raises(ChatDataError, match=r"b.jsonl:3: message 0 must be an object"):
        read_jsonl([str(bad)])
    bad.write_text("{not json\n")
    with pytest.raises(ChatDataError, match=r"b.jsonl:1: not valid JSON"):
        read_jsonl([str(bad)])


def test_sample_set_rows_and_eval_split():
    convs = sample_conversations(50)
    assert convs == sample_conversations(50) and convs != sample_conversations(50, seed=1)
    assert all(any(m["role"] == "assistant" for m in c) for c in convs)
    held = split_eval(50, 0.1)
    assert held.sum() == 5 and np.array_equal(held, split_eval(50, 0.1))
    cfg = ChatDataConfig(sample=50, eval_fraction=0.1)
    train, ev, stats = build_rows(convs, cfg, ByteTokenizer(), 256)
    assert stats["train"]["conversations"] == 45 and stats["eval"]["conversations"] == 5
    assert train["loss_mask"].sum() == stats["train"]["trained_tokens"] > 0


def test_chat_config_validation():
    base = {"run_dir": "r", "model": "qwen2_tiny", "steps": 1, "global_batch_size": 1, "seq_len": 8}
    cfg = from_dict({**base, "data": {"chat": {"sample": 10}}, "stage": {"kind": "sft"}})
    assert cfg.data.chat.enabled and cfg.data.chat.template.turn_end == "<|im_end|>"
    with pytest.raises(ConfigError, match="data.chat.files"):
        from_dict({**base, "data": {"store": "s"}, "stage": {"kind": "sft"}})
    with pytest.raises(ConfigError, match="turn_start"):
        from_dict({**base, "data": {"chat": {"sample": 1, "template": {"turn_start": "<s>"}}}})
    with pytest.raises(ConfigError, match="data.chat.overlong"):
        from_dict({**base, "data": {"chat": {"sample": 1, "overlong": "split"}}})
