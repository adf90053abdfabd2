"""ctxjax.data sources and corpora: the embedded stdlib corpus and its fixed held-out split, text /
JSONL / Parquet / ArrayRecord readers against the files they read, bad input (empty files,
non-UTF-8 bytes, globs matching nothing, unfinished shards), and tools/build_corpus.py."""
import json
import logging
import os
import subprocess
import sys
import sysconfig

import ml_collections
import numpy as np
import pytest

from ctxjax.data import build_corpus, make_tokenizer, stdlib_files
from ctxjax.data import corpus as corpus_lib
from ctxjax.data.sources import key_hash, open_source, unit_hash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = np.random.SeedSequence().entropy


def _rng(*salt):
    return np.random.default_rng([SEED % 2**63, *salt])


def _splitmix_reference(base: int, index: int) -> float:
    """unit_hash written with Python integers (no NumPy wrap-around to get wrong)."""
    mask = 2**64 - 1
    x = base ^ (((index + 1) * 0x9E3779B97F4A7C15) & mask)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return (x >> 11) / 2.0**53


def _docs(source):
    return [source.docs[i] for i in range(len(source.docs))]


def test_unit_hash_matches_integer_reference():
    rng = _rng(0)
    for _ in range(5):
        base = int(rng.integers(0, 2**63)) * 2 + 1
        index = rng.integers(0, 2**40, 50)
        got = unit_hash(base, index)
        want = [_splitmix_reference(base, int(i)) for i in index]
        np.testing.assert_array_equal(got, want)
        assert 0.0 <= got.min() and got.max() < 1.0


def test_stdlib_corpus_and_fixed_split():
    root, rel = stdlib_files()
    assert root == sysconfig.get_paths()["stdlib"]
    assert len(rel) > 500 and all(r.endswith(".py") for r in rel)
    assert not any("site-packages" in r.split(os.sep) for r in rel)
    train_src = open_source(dict(kind="stdlib"), split="train", validation_fraction=0.05)
    val_src = open_source(dict(kind="stdlib"), split="validation", validation_fraction=0.05)
    train, val = train_src.docs, val_src.docs
    nonempty = [r for r in rel if os.path.getsize(os.path.join(root, r)) > 0]
    assert len(train) + len(val) == len(nonempty)
    # Held out exactly the files whose path hash (recomputed here with Python ints) is < 5%.
    want_val = sorted(r for r in nonempty if _splitmix_reference(key_hash(r), 0) < 0.05)
    assert sorted(val_src.keys) == want_val
    assert 0.02 < len(val) / len(nonempty) < 0.09
    # Real long-range structure: plenty of documents beyond 8K tokens (bytes).
    assert sum(os.path.getsize(os.path.join(root, r)) > 8192 for r in nonempty) > 100
    # A document is its file, decoded.
    i = int(_rng(1).integers(len(train)))
    with open(os.path.join(root, train_src.keys[i]), "rb") as f:
        assert train[i] == f.read().decode("utf-8", errors="replace")


def test_split_ignores_python_hash_seed():
    # Python's hash() is salted per process: the split must not depend on it.
    code = ("from ctxjax.data.sources import open_source; import os;"
            "print(sorted(open_source(dict(kind='stdlib'), split='validation', validation_fraction=0.05).keys))")
    here = repr(sorted(open_source(dict(kind="stdlib"), split="validation", validation_fraction=0.05).keys))
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                           env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": REPO}).stdout
    assert there.strip() == here and len(here) > 100


def test_text_files_globs_empty_files_and_bad_utf8(tmp_path, caplog):
    rng = _rng(2)
    texts = {}
    for name in ["a/one.txt", "a/b/two.txt", "c/three.md", "a/empty.txt", "a/.hidden.txt"]:
        body = "" if "empty" in name else "".join(chr(c) for c in rng.integers(32, 1000, 50))
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
        texts[name] = body
    bad = {"a/bad1.txt": b"ok \xff\xfe end\n", "a/bad2.txt": b"\xc3(x\xa0\xa1"}
    for name, raw in bad.items():
        (tmp_path / name).write_bytes(raw)

    with caplog.at_level(logging.WARNING, logger="ctxjax.data.sources"):
        src = open_source(dict(kind="text", path=str(tmp_path / "a")), split="all", validation_fraction=0.0)
        docs = _docs(src)
    want = [texts["a/b/two.txt"], (b"ok \xff\xfe end\n").decode("utf-8", "replace"),
            bad["a/bad2.txt"].decode("utf-8", "replace"), texts["a/one.txt"]]
    assert sorted(docs) == sorted(want)  # empty and hidden files are skipped
    assert src.decoder.bad_documents == 2
    assert src.decoder.bad_sequences == sum(d.count("\ufffd") for d in want)
    assert len([r for r in caplog.records if "not valid UTF-8" in r.message]) == 1  # reported once

    src = open_source(dict(kind="text", path=[str(tmp_path / "**/*.txt"), str(tmp_path / "c/*.md")]),
                      split="all", validation_fraction=0.0)
    assert len(src.docs) == 5
    with pytest.raises(FileNotFoundError, match=r"nothing_here/\*\.txt"):
        open_source(dict(kind="text", path=str(tmp_path / "nothing_here/*.txt")), split="all", validation_fraction=0)
    (tmp_path / "e").mkdir()
    (tmp_path / "e/x.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        open_source(dict(kind="text", path=str(tmp_path / "e")), split="all", validation_fraction=0)


def test_jsonl_lines_fields_and_split(tmp_path, caplog):
    rng = _rng(3)
    lines, records = [], []
    for i in range(200):
        rec = {"id": i, "body": f"doc {i}: " + "x" * int(rng.integers(0, 30))}
        records.append(rec)
        lines.append(json.dumps(rec))
    lines.insert(7, "")  # blank lines are skipped
    lines.insert(50, "{not json")  # invalid lines are skipped with one warning
    (tmp_path / "d.jsonl").write_text("\n".join(lines))  # no final newline
    with caplog.at_level(logging.WARNING):
        train = _docs(open_source(dict(kind="jsonl", path=str(tmp_path / "*.jsonl"), text_field="body"),
                                  split="train", validation_fraction=0.25))
        val = _docs(open_source(dict(kind="jsonl", path=str(tmp_path / "d.jsonl"), text_field="body"),
                                split="validation", validation_fraction=0.25))
    assert sum("not valid JSON" in r.message for r in caplog.records) == 1
    assert "" in train or "" in val  # the invalid line reads as an empty document (dropped later)
    got = sorted(d for d in train + val if d)
    assert got == sorted(r["body"] for r in records)
    assert not set(train) & set(val) - {""}
    assert 20 < len(val) < 90
    with pytest.raises(KeyError, match="'text'"):
        open_source(dict(kind="jsonl", path=str(tmp_path / "d.jsonl")), split="all", validation_fraction=0).docs[0]


def test_parquet_stream_covers_every_row_once_per_epoch(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "y" * (i % 7) for i in range(90)]
    for f in range(3):
        part = texts[f * 30:(f + 1) * 30]
        pq.write_table(pa.table({"content": part, "n": list(range(30))}), str(tmp_path / f"p{f}.parquet"),
                       row_group_size=8)
    spec = dict(kind="parquet", path=str(tmp_path / "*.parquet"), text_field="content")
    # One file at a time and no window shuffle, so that epochs do not overlap.
    val = open_source(spec, split="validation", validation_fraction=0.2, parquet_cycle_length=1, shuffle_window=1)
    train = open_source(spec, split="train", validation_fraction=0.2, parquet_cycle_length=1, shuffle_window=1)
    seen = {}
    for split, src in (("train", train), ("validation", val)):
        it = iter(src.stream(0, 1, 7, True))
        docs = [d for d in (next(it) for _ in range(90)) if d]  # one epoch: 90 rows, other split ''
        seen[split] = docs
        assert len(set(docs)) == len(docs)
    assert sorted(seen["train"] + seen["validation"]) == sorted(texts)
    assert 5 < len(seen["validation"]) < 35
    # Two hosts read disjoint (file, epoch) pairs.
    texts_in_order, total, _ = corpus_lib.iter_documents(spec)  # what tools/build_corpus.py reads
    assert list(texts_in_order) == texts and total == 90
    every = open_source(spec, split="all", validation_fraction=0.0, parquet_cycle_length=1, shuffle_window=1)
    host = [set(next(it) for _ in range(30)) for it in (iter(every.stream(h, 2, 7, True)) for h in range(2))]
    assert host[0] and host[1] and not host[0] & host[1]


def test_build_corpus_and_read_it_back(tmp_path):
    rng = _rng(4)
    texts = ["".join(chr(c) for c in rng.integers(32, 0x800, int(rng.integers(1, 400)))) for _ in range(60)]
    texts[5] = ""  # skipped
    tok = make_tokenizer(ml_collections.ConfigDict(dict(tokenizer="byte")))
    out = str(tmp_path / "corpus")
    meta = build_corpus(iter(texts), tok, out, shard_mb=0.005, batch_size=7, progress=False)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
    assert len(shards) == len(meta["shards"]) > 2 and not [f for f in os.listdir(out) if "tmp" in f]
    assert meta["documents"] == 59 and meta["skipped_empty"] == 1 and meta["dtype"] == "<u2"
    assert meta["tokens"] == sum(len(t.encode()) for t in texts)

    src = open_source(dict(kind="arrayrecord", path=out), split="all", validation_fraction=0.0)
    got = [src.docs[i] for i in range(len(src.docs))]
    assert [bytes(g.astype(np.uint8)) for g in got] == [t.encode() for t in texts if t]  # in order, exact
    train = open_source(dict(kind="arrayrecord", path=out + "/*.array_record"), split="train",
                        validation_fraction=0.3)
    val = open_source(dict(kind="arrayrecord", path=out), split="validation", validation_fraction=0.3)
    assert len(train.docs) + len(val.docs) == 59 and len(val.docs) > 5

    with pytest.raises(FileExistsError, match="overwrite"):
        build_corpus(iter(texts), tok, out, progress=False)
    with pytest.raises(ValueError, match="byte.*fingerprint.*tools/build_corpus.py"):
        corpus_lib.check_corpus_tokenizer(dict(meta, tokenizer=dict(name="bpe.json", fingerprint="abc",
                                                                    vocab_size=600)), tok, "corpus")


def test_build_corpus_crash_leaves_no_half_written_shard(tmp_path):
    def texts():
        for i in range(50):
            yield "z" * 300
        raise RuntimeError("disk on fire")

    tok = make_tokenizer(ml_collections.ConfigDict(dict(tokenizer="byte")))
    out = str(tmp_path / "corpus")
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_corpus(texts(), tok, out, shard_mb=0.01, batch_size=4, progress=False)
    files = os.listdir(out)
    assert "corpus.json" not in files and not [f for f in files if "tmp" in f]
    from array_record.python import array_record_module

    for f in files:  # whatever carries a final name is complete and readable
        reader = array_record_module.ArrayRecordReader(os.path.join(out, f))
        assert all(len(r) == 600 for r in reader.read_all())
        reader.close()
    with pytest.raises(ValueError, match="did not finish"):
        open_source(dict(kind="arrayrecord", path=out), split="all", validation_fraction=0.0)


def test_build_corpus_tool_on_jsonl(tmp_path):
    lines = [json.dumps({"t": f"line {i}\n\tindented"}) for i in range(30)]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "c"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools/build_corpus.py"), "--out", str(out),
                             "--kind", "jsonl", "--path", str(tmp_path / "*.jsonl"), "--text_field", "t"],
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "30 documents" in result.stdout
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["tokens"] == sum(len(f"line {i}\n\tindented") for i in range(30))
