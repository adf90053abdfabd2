"""ctxjax.data tokenizers: exact round trips of code (bytes, a BPE trained here, SentencePiece),
ids against independent references, special tokens, and the vocabulary check."""
import json
import os

import ml_collections
import numpy as np
import pytest

from ctxjax.data import check_vocab, make_tokenizer, stdlib_files, train_bpe
from ctxjax.data.sources import open_source
from ctxjax.data.tokenizer import ByteTokenizer, sentencepiece_trainer_args

SEED = np.random.SeedSequence().entropy  # fresh draws each run; shown on failure


def _rng(*salt):
    return np.random.default_rng([SEED % 2**63, *salt])


def _random_code(rng, n_lines=40):
    """Code-like text with what breaks tokenizers: indentation, tabs, blank lines, trailing
    spaces, CRLF, non-ASCII identifiers and strings, emoji."""
    pieces = ["def f(x):", "    return x", "\tif y:\t# tab", "", "   ", "s = 'héllo wörld'", "λ = 1  ",
              "πr² = 3.14\r", "# 日本語のコメント", "x = [1,\n 2]", "🙂 = '🙂'", "    \\", "a  =  b   "]
    return "\n".join(pieces[i] for i in rng.integers(0, len(pieces), n_lines)) + "\n" * int(rng.integers(0, 3))


def _cfg(tokenizer):
    return ml_collections.ConfigDict(dict(tokenizer=tokenizer, bos_token="", eos_token="", pad_token=""))


def test_byte_tokenizer_is_utf8_and_round_trips():
    tok = make_tokenizer(_cfg("byte"))
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    root, rel = stdlib_files()
    rng = _rng(0)
    texts = [_random_code(rng) for _ in range(5)]
    for r in rng.choice(len(rel), 5, replace=False):
        with open(os.path.join(root, rel[r]), "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
    for text in texts:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))  # the reference: Python's own UTF-8 encoder
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials dropped


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    train = open_source(dict(kind="stdlib"), split="train", validation_fraction=0.05).docs
    texts = [train[i] for i in range(0, len(train), 25)][:60]  # a small, fixed sample: ~1 s
    path = str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
    train_bpe(texts, 600, path, num_texts=len(texts), show_progress=False)
    return path


def test_trained_bpe_round_trips_held_out_code(bpe_path):
    import tokenizers

    tok = make_tokenizer(_cfg(bpe_path))
    assert tok.vocab_size == 600
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    held_out = open_source(dict(kind="stdlib"), split="validation", validation_fraction=0.05).docs
    rng = _rng(1)
    texts = [held_out[int(i)] for i in rng.choice(len(held_out), 6, replace=False)]
    texts += [_random_code(rng) for _ in range(4)]
    reference = tokenizers.Tokenizer.from_file(bpe_path)
    n_bytes = n_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert max(ids) < tok.vocab_size and min(ids) > 2  # specials never come out of plain text
        assert tok.decode(ids) == text
        n_bytes, n_tokens = n_bytes + len(text.encode()), n_tokens + len(ids)
    assert n_bytes / n_tokens > 1.5  # it learned merges, it is not just bytes


def test_tokenizer_json_special_tokens_from_config_and_overrides(bpe_path, tmp_path):
    # tokenizer_config.json beside tokenizer.json names the specials (as transformers saves it).
    path = tmp_path / "tokenizer.json"
    path.write_text(open(bpe_path).read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|eos|>"}, "eos_token": "<|bos|>"}))
    tok = make_tokenizer(_cfg(str(path)))
    assert (tok.bos_id, tok.eos_id) == (1, 0)
    cfg = _cfg(str(path))
    cfg.pad_token = "<|bos|>"
    assert make_tokenizer(cfg).pad_id == 0
    cfg.pad_token = "<nope>"
    with pytest.raises(ValueError, match="<nope>"):
        make_tokenizer(cfg)


def test_sentencepiece_round_trips_code(tmp_path):
    import sentencepiece as spm

    rng = _rng(2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_random_code(rng) for _ in range(30)))
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=400,
                                   minloglevel=2, **sentencepiece_trainer_args)
    tok = make_tokenizer(_cfg(prefix + ".model"))
    reference = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert tok.vocab_size == 400 and tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 3
    for text in [_random_code(rng) for _ in range(5)] + ["  leading spaces\n\n\ttab\n"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text)
        assert tok.decode(ids) == text


def test_check_vocab_names_both_sizes(bpe_path):
    tok = make_tokenizer(_cfg(bpe_path))
    check_vocab(tok, 600)
    check_vocab(tok, 640)
    with pytest.raises(ValueError, match=r"600 tokens.*vocab_size is 599"):
        check_vocab(tok, 599)
    with pytest.raises(ValueError, match=r"259 tokens.*vocab_size is 256"):
        check_vocab(make_tokenizer(_cfg("byte")), 256)


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        make_tokenizer(_cfg(str(tmp_path / "missing.json")))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        make_tokenizer(_cfg(str(tmp_path / "vocab.txt")))
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], 100, str(tmp_path / "t.json"), show_progress=False)
