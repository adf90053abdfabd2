"""ctxjax.data sources and corpora: the embedded stdlib corpus and its fixed held-out split, the
python_packages corpus (on a fake installation: deduplication, order, split, fingerprint), text /
JSONL / Parquet / ArrayRecord readers against the files they read, bad input (empty files,
non-UTF-8 bytes, globs matching nothing, unfinished shards), and tools/build_corpus.py."""
import hashlib
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
from ctxjax.data import sources as sources_lib
from ctxjax.data.sources import key_hash, open_source, source_fingerprint, unit_hash

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


def _fake_installation(tmp_path, rng, layout="a"):
    """Three roots (stdlib, site-packages, dist-packages) of .py files, with duplicates, an empty
    file, a non-UTF-8 file, a non-.py file and a package directory nested in the stdlib. Returns
    (roots, the distinct contents that make the corpus). Layout 'b' installs the same packages
    in other roots, as another machine would."""
    std, site, dist = (tmp_path / layout / d for d in ("lib", "site-packages", "dist-packages"))
    if layout == "b":
        site, dist = dist, site
    files = {std / "os.py": "import sys\n", std / "json/__init__.py": "from .decoder import *\n",
             std / "json/decoder.py": "class JSONDecoder: ...\n",
             std / "site-packages/not_stdlib.py": "x = 'nested package directory'\n",
             std / "__pycache__/cached.py": "skipped\n",
             site / "six.py": "# six\nPY3 = True\n", site / "pip/_vendor/six.py": "# six\nPY3 = True\n",
             site / "pkg/__init__.py": "VERSION = 1\n", dist / "pkg/__init__.py": "VERSION = 1\n",
             dist / "six.py": "# another six\n", site / "pkg/empty.py": "", site / "pkg/notes.txt": "not python\n"}
    for i in range(150):  # nested packages with random bodies, for the split
        body = "".join(chr(c) for c in rng.integers(32, 0x3000, int(rng.integers(1, 60))))
        files[(site if i % 2 else dist) / f"deep{i % 3}/sub{i % 5}/mod{i}.py"] = f"# {i}\n{body}\n"
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (site / "pkg/latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped
    skipped = {std / "site-packages/not_stdlib.py", std / "__pycache__/cached.py", site / "pkg/notes.txt"}
    contents = {t for p, t in files.items() if p not in skipped and t}
    return [str(std), str(site), str(dist)], contents


def _shuffled_walk(rng):
    """os.walk listing directories and files in a random order (as another filesystem might)."""
    walk = os.walk

    def shuffled(top, *args, **kwargs):
        for dirpath, dirnames, filenames in walk(top, *args, **kwargs):
            rng.shuffle(dirnames)  # in place: os.walk descends into the list it yielded
            rng.shuffle(filenames)
            yield dirpath, dirnames, filenames
    return shuffled


def test_python_packages_dedup_order_split_and_fingerprint(tmp_path, monkeypatch):
    rng = _rng(5)
    roots, contents = _fake_installation(tmp_path, rng)
    monkeypatch.setattr(sources_lib, "python_package_roots", lambda: roots)
    spec = dict(kind="python_packages")
    every = open_source(spec, split="all", validation_fraction=0.0)
    docs = _docs(every)
    assert sorted(docs) == sorted(contents)  # each content once; empty, non-UTF-8, nested, non-.py skipped
    assert every.keys == sorted(every.keys) and every.decoder.bad_documents == 0
    assert "pip/_vendor/six.py" in every.keys and "six.py" in every.keys  # a copy once, under its smallest key
    assert every.keys.count("six.py") == 1 and every.keys.count("pkg/__init__.py") == 1
    fingerprint = source_fingerprint(spec)
    assert fingerprint["files"] == len(contents)
    assert fingerprint["bytes"] == sum(len(t.encode()) for t in contents)

    # Neither the listing order of directories nor the order of the roots changes anything.
    monkeypatch.setattr(sources_lib.os, "walk", _shuffled_walk(rng))
    monkeypatch.setattr(sources_lib, "python_package_roots", lambda: roots[::-1])
    again = open_source(spec, split="all", validation_fraction=0.0)
    assert again.keys == every.keys and _docs(again) == docs
    assert source_fingerprint(spec) == fingerprint

    # A fixed split by content: disjoint, covering, both non-empty, and the same for the same file
    # installed elsewhere (layout 'b').
    split = {s: _docs(open_source(spec, split=s, validation_fraction=0.2)) for s in ("train", "validation")}
    assert sorted(split["train"] + split["validation"]) == sorted(contents)
    assert not set(split["train"]) & set(split["validation"]) and len(split["validation"]) > 5
    digest = {t: hashlib.sha256(t.encode()).hexdigest() for t in contents}
    assert set(split["validation"]) == {t for t in contents if _splitmix_reference(key_hash(digest[t]), 0) < 0.2}
    other_roots, _ = _fake_installation(tmp_path, _rng(5), layout="b")
    monkeypatch.setattr(sources_lib, "python_package_roots", lambda: other_roots)
    assert set(_docs(open_source(spec, split="validation", validation_fraction=0.2))) == set(split["validation"])
    assert source_fingerprint(spec) == fingerprint  # keys are relative to their root

    # Changing one file changes the fingerprint; changing it back restores it. `path` keeps names.
    monkeypatch.setattr(sources_lib, "python_package_roots", lambda: roots)
    changed = tmp_path / "a/site-packages/pkg/__init__.py"
    changed.write_text("VERSION = 2  # changed\n")
    assert source_fingerprint(spec)["sha256"] != fingerprint["sha256"]
    changed.write_text("VERSION = 1\n")
    assert source_fingerprint(spec) == fingerprint
    only = open_source(dict(kind="python_packages", path=["pkg", "os"]), split="all", validation_fraction=0.0)
    assert only.keys == ["os.py", "pkg/__init__.py"]
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(dict(kind="python_packages", path=["pkg", "nope"]), split="all", validation_fraction=0.0)


def test_python_packages_on_this_installation():
    roots = sources_lib.python_package_roots()
    assert roots[0] == sysconfig.get_paths()["stdlib"] and sysconfig.get_paths()["purelib"] in roots
    spec = dict(kind="python_packages", path=["json", "numpy"])  # a few hundred files, not all of them
    src = open_source(spec, split="all", validation_fraction=0.0)
    assert {"json/__init__.py", "numpy/__init__.py"} <= set(src.keys)
    assert {k.split(os.sep)[0] for k in src.keys} == {"json", "numpy"}
    assert "class JSONDecoder" in src.docs[src.keys.index("json/decoder.py")]
    fingerprint = source_fingerprint(spec)
    assert fingerprint["files"] == len(src.docs) and fingerprint["bytes"] > 10**6
    assert len(fingerprint["sha256"]) == 64


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


def test_build_corpus_tool_on_python_packages(tmp_path):
    out = tmp_path / "c"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools/build_corpus.py"), "--out", str(out),
                             "--kind", "python_packages", "--path", "json"],
                            capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "corpus.json").read_text())
    fingerprint = source_fingerprint(dict(kind="python_packages", path="json"))
    assert meta["documents"] == fingerprint["files"] and meta["tokens"] == fingerprint["bytes"]
    assert fingerprint["sha256"] in meta["description"]
