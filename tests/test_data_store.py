"""Tokenizers, the tensorstore token store and prepare-data (resume, errors, embedded corpus)."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorstore as ts

from train.data import store as store_mod
from train.data.corpus import stdlib_files
from train.data.prepare import eval_mask, main, prepare
from train.data.store import StoreError, StoreWriter, TokenStore, new_manifest, token_dtype
from train.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = [
    "hello world\n",
    "naïve café — ünïcödé ✓ 你好 🙂",
    "x",
    "def f(a, b):\n    return a + b\n" * 7,
    "",  # empty: skipped by prepare
    "the quick brown fox jumps over the lazy dog. " * 20,
]
JSONL_TEXTS = ["first json doc", "", 'second: with "quotes" and \\ backslash', "третий документ"]


def _write_inputs(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Writes text files and one jsonl file; returns (input paths, expected non-empty documents in order)."""
    d = tmp_path / "inputs"
    d.mkdir()
    paths = []
    for i, t in enumerate(TEXTS):
        p = d / f"doc{i}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(str(p))
    j = d / "more.jsonl"
    with open(j, "w", encoding="utf-8") as f:
        for t in JSONL_TEXTS:
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")
        f.write("\n")  # blank lines are ignored
    paths.append(str(j))
    docs = [t for t in TEXTS + JSONL_TEXTS if t]
    return paths, docs


def _train_bpe(path: Path, eos: str | None = "<|endoftext|>") -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[eos] if eos else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    tok.save(str(path))
    return path


# ------------------------------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    for t in TEXTS + JSONL_TEXTS:
        ids = tok.encode(t)
        assert ids == list(t.encode("utf-8"))  # independent reference: Python's UTF-8 codec
        assert tok.decode(ids) == t
        assert tok.decode([tok.eos_id, *ids, tok.pad_id]) == t  # special ids are dropped
    assert tok.encode_batch(["ab", "ç"]) == [[97, 98], [0xC3, 0xA7]]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])


def test_hf_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer

    path = _train_bpe(tmp_path / "tokenizer.json")
    ref = Tokenizer.from_file(str(path))
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == ref.token_to_id("<|endoftext|>")
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    for t in TEXTS + JSONL_TEXTS:
        ids = tok.encode(t)
        assert ids == ref.encode(t, add_special_tokens=False).ids
        assert tok.decode(ids) == t
        assert tok.decode([*ids, tok.eos_id]) == t
    assert tok.encode_batch(["hello", "world"]) == [tok.encode("hello"), tok.encode("world")]
    assert load_tokenizer(str(tmp_path)).sha256 == tok.sha256  # a directory holding tokenizer.json


def test_hf_tokenizer_errors(tmp_path):
    path = _train_bpe(tmp_path / "noeos.json", eos=None)
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(path)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(path, eos_token="<nope>")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        HFTokenizer(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------ store


def test_prepare_byte_store_contents(tmp_path):
    paths, docs = _write_inputs(tmp_path)
    out = tmp_path / "store"
    m = prepare(paths, out, "byte", eval_fraction=0.0, workers=1, progress=False, chunk_tokens=64)
    assert m["complete"] and m["dtype"] == "uint16" and m["empty_docs_skipped"] == 2
    st = TokenStore(out)
    assert len(st) == len(docs)
    expected = [np.array([*d.encode("utf-8"), 256]) for d in docs]
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(st.document(i), e)
    np.testing.assert_array_equal(st.document(-1), expected[-1])
    stream = np.concatenate(expected)
    assert st.num_tokens == len(stream) and st.dtype == np.uint16
    for a, b in [(0, 10), (5, 200), (63, 65), (100, len(stream)), (7, 7)]:  # crosses 64-token chunks
        np.testing.assert_array_equal(st.read(a, b), stream[a:b])
    with pytest.raises(IndexError):
        st.read(0, len(stream) + 1)
    with pytest.raises(IndexError):
        st.document(len(docs))
    assert len(TokenStore(out, "eval")) == 0
    st.verify()
    assert st.tokenizer().decode(st.document(1)) == docs[1]


def test_prepare_hf_store_and_eval_split(tmp_path):
    paths, docs = _write_inputs(tmp_path)
    tok_path = _train_bpe(tmp_path / "tokenizer.json")
    ref = HFTokenizer(tok_path)
    out = tmp_path / "store"
    prepare(paths, out, str(tok_path), eval_fraction=0.25, workers=1, progress=False)
    # independent rule: document g (0-based) is held out when floor((g+1)/4) > floor(g/4), i.e. g = 3, 7, ...
    want_eval = [g for g in range(len(docs)) if (g + 1) // 4 > g // 4]
    assert want_eval == [3, 7] and eval_mask(0, len(docs), 0.25).nonzero()[0].tolist() == want_eval
    train, ev = TokenStore(out, "train"), TokenStore(out, "eval")
    enc = [np.array([*ref.encode(d), ref.eos_id]) for d in docs]
    assert [len(x) for x in (train, ev)] == [len(docs) - 2, 2]
    for i, g in enumerate(g for g in range(len(docs)) if g not in want_eval):
        np.testing.assert_array_equal(train.document(i), enc[g])
    for i, g in enumerate(want_eval):
        np.testing.assert_array_equal(ev.document(i), enc[g])
    # the store keeps its own copy of tokenizer.json
    os.remove(tok_path)
    st_tok = train.tokenizer()
    assert st_tok.sha256 == ref.sha256 and st_tok.decode(train.document(0)) == docs[0]


def test_writer_uint32_ids_round_trip(tmp_path):
    vocab = 70_000
    assert token_dtype(65_536) == "uint16" and token_dtype(vocab) == "uint32"
    m = new_manifest(
        tokenizer={"kind": "test"}, vocab_size=vocab, eos_id=vocab - 1, pad_id=0, chunk_tokens=16, inputs=[]
    )
    store_mod.write_manifest(tmp_path, m)
    w = StoreWriter(tmp_path, m, flush_tokens=10)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in (5, 40, 1, 17)]
    for d in docs:
        w.append("train", d, [len(d)])
    w.finalize()
    st = TokenStore(tmp_path)
    assert st.dtype == np.uint32
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(st.document(i), d)
    assert max(int(d.max()) for d in docs) > 65535  # the data really needs uint32


def test_store_on_memory_kvstore(tmp_path):
    """The same code writes and reads a non-file kvstore path (tensorstore URL)."""
    paths, docs = _write_inputs(tmp_path)
    url = "memory://wuneng_test_store/"
    prepare(paths, url, "byte", eval_fraction=0.0, workers=1, progress=False, overwrite=True)
    st = TokenStore(url)
    assert len(st) == len(docs)
    np.testing.assert_array_equal(st.document(3), [*docs[3].encode(), 256])
    assert not os.path.exists("memory:")


# ------------------------------------------------------------------------------------------ resume


def test_resume_after_stop_matches_uninterrupted(tmp_path):
    paths, docs = _write_inputs(tmp_path)
    full = prepare(paths, tmp_path / "full", "byte", eval_fraction=0.3, workers=1, progress=False)
    part = tmp_path / "part"
    m = prepare(paths, part, "byte", eval_fraction=0.3, workers=1, progress=False, max_inputs=3)
    assert not m["complete"] and m["inputs_done"] == 3
    with pytest.raises(StoreError, match="incomplete.*resume"):
        TokenStore(part)
    m = prepare(paths, part, "byte", eval_fraction=0.3, workers=1, progress=False)
    assert m["complete"] and m["content_hash"] == full["content_hash"]
    for split in ("train", "eval"):
        a, b = TokenStore(part, split), TokenStore(tmp_path / "full", split)
        np.testing.assert_array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
        np.testing.assert_array_equal(a.offsets, b.offsets)
    # a complete store with the same arguments is left alone
    assert prepare(paths, part, "byte", eval_fraction=0.3, workers=1, progress=False) == m


def test_crash_between_array_write_and_manifest(tmp_path, monkeypatch):
    """A crash after arrays were extended but before the manifest commit: never reads as complete; resume is exact."""
    paths, _ = _write_inputs(tmp_path)
    full = prepare(paths, tmp_path / "full", "byte", eval_fraction=0.2, workers=1, progress=False)
    real = store_mod.write_manifest
    calls = {"n": 0}

    def flaky(path, manifest):
        calls["n"] += 1
        if calls["n"] == 4:  # creation, unit 1, unit 2, then crash while committing unit 3
            raise RuntimeError("simulated crash")
        real(path, manifest)

    monkeypatch.setattr(store_mod, "write_manifest", flaky)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(paths, crashed, "byte", eval_fraction=0.2, workers=1, progress=False, commit_every_s=0)
    monkeypatch.setattr(store_mod, "write_manifest", real)
    m = store_mod.read_manifest(crashed)
    assert not m["complete"] and m["inputs_done"] == 2
    # the arrays hold more than the manifest admits (unit 3 was written)
    arr = ts.open(
        {"driver": "zarr3", "kvstore": "file://" + str(crashed / "train" / "tokens"), "open": True}
    ).result()
    assert arr.shape[0] > m["splits"]["train"]["n_tokens"]
    with pytest.raises(StoreError, match="incomplete"):
        TokenStore(crashed)
    m = prepare(paths, crashed, "byte", eval_fraction=0.2, workers=1, progress=False, commit_every_s=0)
    assert m["content_hash"] == full["content_hash"]
    TokenStore(crashed, "eval").verify()


def test_parallel_workers_same_store(tmp_path):
    paths, _ = _write_inputs(tmp_path)
    a = prepare(paths, tmp_path / "a", "byte", workers=1, eval_fraction=0.2, progress=False)
    b = prepare(paths, tmp_path / "b", "byte", workers=2, eval_fraction=0.2, progress=False)
    assert a["content_hash"] == b["content_hash"] and a["splits"] == b["splits"]


def test_prepare_argument_errors(tmp_path):
    paths, _ = _write_inputs(tmp_path)
    out = tmp_path / "s"
    prepare(paths, out, "byte", workers=1, progress=False, max_inputs=2)
    with pytest.raises(ValueError, match="different eval_fraction"):
        prepare(paths, out, "byte", workers=1, progress=False, eval_fraction=0.5)
    with pytest.raises(ValueError, match="different inputs"):
        prepare(paths[:-1], out, "byte", workers=1, progress=False)
    m = prepare(paths[:2], out, "byte", workers=1, progress=False, eval_fraction=0.0, overwrite=True)
    assert m["complete"] and len(TokenStore(out)) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        prepare(paths, other, "byte", workers=1, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "x", "byte", progress=False)
    with pytest.raises(ValueError, match="eval_fraction"):
        prepare(paths, tmp_path / "y", "byte", eval_fraction=1.0, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'text' field"):
        prepare([str(bad)], tmp_path / "z", "byte", workers=1, progress=False)


# ------------------------------------------------------------------------------------------ corrupt stores


def test_corrupt_store_errors(tmp_path):
    paths, _ = _write_inputs(tmp_path)
    with pytest.raises(StoreError, match="manifest.json is missing"):
        TokenStore(tmp_path / "nothing")
    out = tmp_path / "s"
    prepare(paths, out, "byte", eval_fraction=0.0, workers=1, progress=False)
    man = out / "manifest.json"
    good = json.loads(man.read_text())

    bad = json.loads(json.dumps(good))
    bad["splits"]["train"]["n_tokens"] += 5
    man.write_text(json.dumps(bad))
    with pytest.raises(StoreError, match="shape"):
        TokenStore(out)

    man.write_text("{truncated")
    with pytest.raises(StoreError, match="not valid JSON"):
        TokenStore(out)

    man.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="no split 'validation'"):
        TokenStore(out, "validation")

    # corrupt token values: opens, but verify() catches it
    arr = ts.open(
        {"driver": "zarr3", "kvstore": "file://" + str(out / "train" / "tokens"), "open": True}
    ).result()
    arr[0:4].write(np.array([1, 2, 3, 4], np.uint16)).result()
    with pytest.raises(StoreError, match="content hash"):
        TokenStore(out).verify()

    # inconsistent offsets
    off = ts.open(
        {"driver": "zarr3", "kvstore": "file://" + str(out / "train" / "offsets"), "open": True}
    ).result()
    off[1:2].write(np.array([10**9], np.int64)).result()
    with pytest.raises(StoreError, match="offsets are inconsistent"):
        TokenStore(out)

    # a missing array
    import shutil

    shutil.rmtree(out / "train" / "offsets")
    with pytest.raises(StoreError, match="missing or unreadable"):
        TokenStore(out)


# ------------------------------------------------------------------------------------------ corpus & CLI


def test_stdlib_corpus_prepare(tmp_path):
    files = stdlib_files(max_files=4)
    assert files == stdlib_files(max_files=4) and len(files) == 4
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") and "site-packages" not in r for r in rel)
    small = stdlib_files(max_files=None, max_bytes=20_000)
    assert sum(f.stat().st_size for f in small) <= 20_000
    out = tmp_path / "stdlib"
    m = prepare(["stdlib"], out, "byte", eval_fraction=0.0, stdlib_max_files=4, workers=1, progress=False)
    assert m["inputs"] == [{"kind": "text", "path": str(f), "size": f.stat().st_size} for f in files]
    st = TokenStore(out)
    for i, f in enumerate(files):
        want = f.read_text(encoding="utf-8", errors="replace").encode("utf-8")
        np.testing.assert_array_equal(st.document(i), [*want, 256])


def test_cli_main(tmp_path, capsys):
    paths, docs = _write_inputs(tmp_path)
    out = tmp_path / "cli"
    assert main([*paths, "--out", str(out), "--eval-fraction", "0", "--no-progress", "--workers", "1"]) == 0
    assert "complete" in capsys.readouterr().out
    assert len(TokenStore(out)) == len(docs)
    assert main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _store_with_ids(path: Path, ids: list[int], vocab_size: int) -> TokenStore:
    m = new_manifest(tokenizer={"kind": "byte"}, vocab_size=vocab_size, eos_id=1, pad_id=0, chunk_tokens=16)
    store_mod.write_manifest(path, m)
    w = StoreWriter(path, m)
    for split in ("train", "eval"):
        w.append(split, np.asarray(ids), [len(ids)])
    w.finalize()
    return TokenStore(path)


def test_token_ids_beyond_the_vocabulary_are_refused_when_opened(tmp_path):
    st = _store_with_ids(tmp_path / "s", [5, 299, 1], vocab_size=258)
    assert st.max_token_id == 299 and st.manifest["splits"]["eval"]["max_id"] == 299
    with pytest.raises(StoreError, match=r"holds token id 299 but its manifest says vocab_size 258"):
        st.check_ids(320)
    ok = _store_with_ids(tmp_path / "ok", [5, 250, 1], vocab_size=258)
    ok.check_ids(258)
    with pytest.raises(StoreError, match=r"holds token id 250 but model.vocab_size is 200"):
        ok.check_ids(200)
    # a store written before manifests recorded max_id: the ids are read once
    m = store_mod.read_manifest(tmp_path / "s")
    del m["splits"]["train"]["max_id"]
    store_mod.write_manifest(tmp_path / "s", m)
    assert TokenStore(tmp_path / "s").max_token_id == 299


def test_train_and_eval_refuse_a_store_with_ids_beyond_the_vocabulary(tmp_path, capsys):
    from train_support import tiny_config, write_yaml

    from train.cli import main
    from train.evaluate import perplexity

    _store_with_ids(tmp_path / "s", [5, 299, 1], vocab_size=258)
    cfg = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", str(tmp_path / "s")))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wuneng train: error: token store") and "holds token id 299" in err
    assert not (tmp_path / "run" / "config.yaml").exists()
    model = SimpleNamespace(cfg=SimpleNamespace(vocab_size=320))  # refused before the model is used
    with pytest.raises(StoreError, match="holds token id 299"):
        perplexity(model, str(tmp_path / "s"), seq_len=32, batch_size=8, progress=False)


def test_prepare_refuses_binary_and_mostly_invalid_utf8_unless_accepted(tmp_path, capsys):
    from train.cli import main as wuneng

    (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 4)  # NUL bytes: binary
    (tmp_path / "latin1.txt").write_bytes("café crème brûlée ".encode("latin-1") * 20)  # 4 bad bytes in 18
    (tmp_path / "mostly_ok.txt").write_bytes(b"plain text " * 100 + b"\xff")  # 1 bad byte in 1101
    for name, what in (("bin.dat", "holds NUL bytes"), ("latin1.txt", "80 byte sequences of its 360 bytes")):
        out = tmp_path / ("s-" + name)
        assert wuneng(["prepare-data", str(tmp_path / name), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(
            f"wuneng prepare-data: error: {tmp_path / name}: not UTF-8"
        )
        assert what in err and "--accept-invalid-utf8" in err
    out = tmp_path / "accepted"
    argv = ["prepare-data", str(tmp_path / "latin1.txt"), str(tmp_path / "mostly_ok.txt"), "--out", str(out)]
    assert wuneng([*argv, "--no-progress", "--accept-invalid-utf8"]) == 0
    assert "warning: 81 undecodable UTF-8 byte sequences were replaced by U+FFFD" in capsys.readouterr().out
    assert TokenStore(out).manifest["invalid_utf8_replaced"] == 81
    below = tmp_path / "below"  # under the 1 % limit: kept, and counted
    assert prepare([tmp_path / "mostly_ok.txt"], below, progress=False)["invalid_utf8_replaced"] == 1
