"""Document sources: where raw documents come from, before tokenization and packing.

Each `data.sources` entry becomes a `Source`: either random access (a `grain.MapDataset` of
documents, globally shuffled by the pipeline) or streaming (Parquet: a function giving a
`grain.IterDataset` for one host's shard). A document is a `str`, or an int array of token ids
when the source was pre-tokenized by tools/build_corpus.py.

Held-out split: a document is held out for validation iff a stable 64-bit hash of its key falls
below `validation_fraction`. Keys are the relative path (stdlib, text), the SHA-256 of the
contents (python_packages, whose files sit at different paths on different machines), (path,
line) for JSONL, (shard, record) for ArrayRecord and (path, row) for Parquet, so the split is the
same on every machine and does not depend on the shuffle seed.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import mmap
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Callable, Sequence

import grain
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("stdlib", "python_packages", "text", "jsonl", "parquet", "arrayrecord")
ONE_DOCUMENT_PER_FILE = ("stdlib", "python_packages", "text")
PACKAGE_DIRS = ("site-packages", "dist-packages")  # where installed packages live
CORPUS_META = "corpus.json"  # written by tools/build_corpus.py beside its ArrayRecord shards
CORPUS_FORMAT = "ctxjax-tokens-v1"


@dataclasses.dataclass
class Source:
    """One entry of `data.sources`, opened for one split."""
    name: str
    weight: float
    docs: grain.MapDataset | None = None  # random access, unshuffled
    stream: Callable[..., grain.IterDataset] | None = None  # (shard_index, shard_count, seed, shuffle)
    corpus_meta: dict | None = None  # set when documents are token ids (pre-tokenized ArrayRecord)
    decoder: Utf8Decoder | None = None  # its counts cover reads made in this process
    keys: list[str] | None = None  # one-document-per-file sources: each document's path relative to its root


# ----------------------------------------------------------------------------- hashing

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def unit_hash(base: int, index: np.ndarray | int = 0) -> np.ndarray:
    """Maps (base, index) to floats uniform in [0, 1): splitmix64 of base ^ golden * (index + 1)."""
    with np.errstate(over="ignore"):
        x = np.uint64(base) ^ (np.asarray(index, np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _keep(held_out: np.ndarray, split: str) -> np.ndarray:
    if split == "train":
        return ~held_out
    if split == "validation":
        return held_out
    if split == "all":
        return np.ones_like(held_out)
    raise ValueError(f"split={split!r}: expected 'train', 'validation' or 'all'.")


# ----------------------------------------------------------------------------- decoding

class Utf8Decoder:
    """Decodes bytes as UTF-8; invalid bytes become U+FFFD, are counted, and are reported once
    (per source and process) with the first offending document named."""

    def __init__(self, source_name: str):
        self.source_name = source_name
        self.bad_documents = 0
        self.bad_sequences = 0
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            with self._lock:
                self.bad_documents += 1
                self.bad_sequences += text.count("\ufffd") - raw.count("\ufffd".encode())
                first = self.bad_documents == 1
            if first:
                log.warning("%s: %s is not valid UTF-8; invalid bytes are replaced by U+FFFD. Further "
                            "documents like it are only counted (Utf8Decoder.bad_documents).",
                            self.source_name, where)
            return text


# ----------------------------------------------------------------------------- files

_GLOB_CHARS = set("*?[")


def _glob_root(pattern: str) -> str:
    """The directory part of a pattern before its first wildcard: keys are relative to it."""
    parts = []
    for part in pattern.split(os.sep):
        if _GLOB_CHARS & set(part):
            break
        parts.append(part)
    root = os.sep.join(parts) or "."
    return root if os.path.isdir(root) else os.path.dirname(root) or "."


def expand_paths(path: str | Sequence[str], *, what: str) -> list[tuple[str, str]]:
    """Files named by a path, a directory (every file below it) or a glob, or a list of those.

    Returns sorted (absolute path, key) pairs, the key being the path relative to the pattern's
    fixed prefix. A pattern that matches nothing is an error naming it.
    """
    patterns = [path] if isinstance(path, str) else list(path)
    if not patterns or not all(patterns):
        raise ValueError(f"{what}: 'path' is empty; give a file, a directory or a glob.")
    found = {}
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            root, matches = pattern, glob.glob(os.path.join(glob.escape(pattern), "**", "*"), recursive=True)
        else:
            root, matches = _glob_root(pattern), glob.glob(pattern, recursive=True)
        files = [m for m in matches if os.path.isfile(m)
                 and not any(p.startswith(".") for p in os.path.relpath(m, root).split(os.sep))]
        if not files:
            raise FileNotFoundError(f"{what}: the pattern {pattern!r} matches no files. Check the path "
                                    "(relative paths are taken from the current directory).")
        for f in files:
            found[os.path.abspath(f)] = os.path.relpath(f, root)
    return sorted(found.items())


def drop_empty_files(files: list[tuple[str, str]], *, what: str) -> list[tuple[str, str]]:
    nonempty = [(p, k) for p, k in files if os.path.getsize(p) > 0]
    if not nonempty:
        raise ValueError(f"{what}: every matched file is empty ({len(files)} files).")
    if len(nonempty) < len(files):
        log.info("%s: skipping %d empty file(s).", what, len(files) - len(nonempty))
    return nonempty


def _py_files(root: str, only: Sequence[str] = ()) -> list[str]:
    """Sorted paths, relative to `root`, of the .py files below it. Installed-package directories
    (roots of their own) and __pycache__ are skipped; `only` keeps these top-level names alone."""
    rel = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (*PACKAGE_DIRS, "__pycache__")]
        if only and dirpath == root:
            dirnames[:] = [d for d in dirnames if d in only]
            filenames = [f for f in filenames if f.removesuffix(".py") in only]
        rel += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return sorted(rel)


def stdlib_files() -> tuple[str, list[str]]:
    """The standard library's own .py files: (root, sorted relative paths).

    Installed packages (site-packages, dist-packages) are left out so that the corpus is the same
    on every machine with the same Python.
    """
    root = sysconfig.get_paths()["stdlib"]
    rel = _py_files(root)
    if not rel:
        raise FileNotFoundError(f"No .py files under the standard library directory {root!r}.")
    return root, rel


def python_package_roots() -> list[str]:
    """The standard library, then every site-packages / dist-packages directory of this Python
    (sysconfig's purelib and platlib, site's, the user's, and those on sys.path), each once."""
    paths = sysconfig.get_paths()
    site_dirs = [paths["purelib"], paths["platlib"], *getattr(site, "getsitepackages", list)()]
    if site.ENABLE_USER_SITE:
        site_dirs.append(site.getusersitepackages())
    site_dirs += [p for p in sys.path if os.path.basename(os.path.normpath(p or ".")) in PACKAGE_DIRS]
    roots, seen = [], set()
    for d in [paths["stdlib"], *sorted(site_dirs)]:
        if os.path.isdir(d) and os.path.realpath(d) not in seen:
            seen.add(os.path.realpath(d))
            roots.append(d)
    return roots


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> tuple[str, bool]:
    """(SHA-256 of a file's bytes, whether they are valid UTF-8). Cached by (path, size, mtime),
    so that opening both splits and fingerprinting read each file once per process."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    return hashlib.sha256(raw).hexdigest(), valid


def file_digest(path: str) -> tuple[str, bool]:
    """(SHA-256 of the file's bytes, whether they are valid UTF-8)."""
    st = os.stat(path)
    return _file_digest(path, st.st_size, st.st_mtime_ns)


def python_package_files(only: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """Every .py file of the standard library and the installed packages, once per content:
    sorted (path, key, sha256), the key being the path relative to its root.

    Identical files (vendored copies, a package installed twice) count once, under the smallest
    key; empty files and files that are not valid UTF-8 are skipped. `only`: top-level package
    or module names to keep (e.g. ['json', 'numpy']); empty keeps everything.
    """
    what = f"python_packages{' ' + str(list(only)) if only else ''}"
    files = [(os.path.join(root, rel), rel) for root in python_package_roots() for rel in _py_files(root, only)]
    missing = set(only) - {key.split(os.sep)[0].removesuffix(".py") for _, key in files}
    if not files or missing:
        raise FileNotFoundError(f"{what}: no .py files {f'for {sorted(missing)} ' if only else ''}"
                                f"under {python_package_roots()}.")
    found, not_utf8 = [], 0
    for path, key in drop_empty_files(files, what=what):
        digest, valid = file_digest(path)
        if valid:
            found.append((key, digest, path))
        else:
            not_utf8 += 1
    kept, seen = [], set()
    for key, digest, path in sorted(found):  # sorted: the kept copy does not depend on listing order
        if digest not in seen:
            seen.add(digest)
            kept.append((path, key, digest))
    log.info("%s: %d files, %d duplicates and %d not valid UTF-8 skipped.", what, len(kept),
             len(found) - len(kept), not_utf8)
    return kept


class FileDocuments:
    """Random access to one document per file."""

    def __init__(self, paths: Sequence[str], decoder: Utf8Decoder):
        self._paths = list(paths)
        self._decode = decoder

    def __len__(self):
        return len(self._paths)

    def __getitem__(self, index: int) -> str:
        path = self._paths[index]
        with open(path, "rb") as f:
            return self._decode(f.read(), path)


# ----------------------------------------------------------------------------- JSON Lines

def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the non-blank lines of a file, found with NumPy."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        newlines = np.flatnonzero(np.frombuffer(m, np.uint8) == ord("\n"))
    ends = newlines if (newlines.size and newlines[-1] == size - 1) else np.append(newlines, size)
    starts = np.concatenate([[0], newlines + 1])[: len(ends)]
    keep = (ends - starts) > 1  # at least one character besides a possible '\r'
    return starts[keep].astype(np.int64), ends[keep].astype(np.int64)


class JsonlDocuments:
    """Random access to the lines of JSON Lines files, through a byte-offset index."""

    def __init__(self, paths, file_ids, starts, ends, text_field: str, decoder: Utf8Decoder, name: str):
        self._paths, self._file_ids, self._starts, self._ends = list(paths), file_ids, starts, ends
        self._field, self._decode, self._name = text_field, decoder, name
        self._maps = None
        self._bad_json = 0

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def __len__(self):
        return len(self._starts)

    def _map(self, file_id):
        if self._maps is None:
            self._maps = {}
        m = self._maps.get(file_id)
        if m is None:
            with open(self._paths[file_id], "rb") as f:
                m = self._maps[file_id] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def __getitem__(self, index: int) -> str:
        file_id = int(self._file_ids[index])
        raw = self._map(file_id)[int(self._starts[index]):int(self._ends[index])]
        where = f"{self._paths[file_id]} (byte {int(self._starts[index])})"
        try:
            record = json.loads(self._decode(raw, where))
        except json.JSONDecodeError:
            self._bad_json += 1
            if self._bad_json == 1:
                log.warning("%s: %s is not valid JSON; such lines are skipped.", self._name, where)
            return ""  # empty documents are dropped by the pipeline
        if not isinstance(record, dict) or self._field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise KeyError(f"{self._name}: {where} has no field {self._field!r} (it has {keys}); "
                           "set text_field in this data.sources entry.")
        return str(record[self._field])


# ----------------------------------------------------------------------------- ArrayRecord

def read_corpus_meta(directory: str) -> dict | None:
    path = os.path.join(directory, CORPUS_META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != CORPUS_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {CORPUS_FORMAT!r}; "
                         "rebuild the corpus with tools/build_corpus.py.")
    return meta


class ArrayRecordDocuments:
    """Random access to chosen records of ArrayRecord shards: token ids (pre-tokenized) or text."""

    def __init__(self, shards: Sequence[str], indices: np.ndarray, dtype: str | None, decoder: Utf8Decoder):
        self._shards, self._indices, self._dtype, self._decode = list(shards), indices, dtype, decoder
        self._source = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def __len__(self):
        return len(self._indices)

    def __getitem__(self, index: int):
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self._shards)
        record = self._source[int(self._indices[index])]
        if self._dtype is not None:
            return np.frombuffer(record, self._dtype)
        return self._decode(record, f"record {int(self._indices[index])} of {self._shards}")


def _shard_lengths(shards: Sequence[str]) -> list[int]:
    from array_record.python import array_record_module

    lengths = []
    for shard in shards:
        reader = array_record_module.ArrayRecordReader(shard)
        lengths.append(reader.num_records())
        reader.close()
    return lengths


# ----------------------------------------------------------------------------- Parquet

def _parquet_stream(files, keys, text_field, split, fraction, name, decoder, cycle_length, window):
    """A function making the Parquet IterDataset of one host's shard of (file, epoch) pairs."""

    def make(shard_index: int, shard_count: int, seed: int, shuffle: bool) -> grain.IterDataset:
        def rows_of(file_index: int) -> grain.IterDataset:
            path, base = files[file_index], key_hash(keys[file_index])

            def pick(row_index, row):
                held_out = bool(unit_hash(base, row_index) < fraction)
                if not _keep(np.array([held_out]), split)[0]:
                    return ""
                if text_field not in row:
                    raise KeyError(f"{name}: {path} has no column {text_field!r} (it has {sorted(row)}); "
                                   "set text_field in this data.sources entry.")
                value = row[text_field]
                if isinstance(value, bytes):
                    return decoder(value, f"{path} (row {row_index})")
                return "" if value is None else str(value)

            return grain.experimental.ParquetIterDataset(path).map_with_index(pick)

        order = grain.MapDataset.range(len(files))
        if shuffle:
            order = order.shuffle(seed=seed)
        # Each host reads whole (file, epoch) pairs: with fewer files than hosts, hosts read the
        # same file in different epochs rather than every host reading every row.
        order = order.repeat()[shard_index::shard_count].map(rows_of)
        ds = grain.experimental.InterleaveIterDataset(order, cycle_length=cycle_length if shuffle else 1)
        if shuffle and window > 1:
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window, seed=seed)
        return ds

    return make


# ----------------------------------------------------------------------------- opening

def field_of(spec, key, default=None):
    value = spec.get(key, default) if hasattr(spec, "get") else getattr(spec, key, default)
    return default if value is None else value


def open_source(spec, *, split: str, validation_fraction: float, index: int = 0,
                parquet_cycle_length: int = 4, shuffle_window: int = 1024) -> Source:
    """Opens one `data.sources` entry for `split` ('train', 'validation' or 'all')."""
    kind = field_of(spec, "kind", "")
    path = field_of(spec, "path", "")
    weight = float(field_of(spec, "weight", 1.0))
    text_field = str(field_of(spec, "text_field", "text"))
    name = f"data.sources[{index}] ({kind}{': ' + str(path) if path else ''})"
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}.")
    if not weight > 0:
        raise ValueError(f"{name}: weight must be > 0 (got {weight}).")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction={validation_fraction} must be in [0, 1).")
    decoder = Utf8Decoder(name)

    if kind in ONE_DOCUMENT_PER_FILE:
        files, split_keys = _file_documents(kind, path, name)
        held_out = np.array([unit_hash(key_hash(k)) < validation_fraction for k in split_keys], bool)
        chosen = [(p, k) for (p, k), keep in zip(files, _keep(held_out, split)) if keep]
        docs = FileDocuments([p for p, _ in chosen], decoder)
        return Source(name, weight, docs=_nonempty(docs, name, split), decoder=decoder, keys=[k for _, k in chosen])

    if kind == "jsonl":
        files = drop_empty_files(expand_paths(path, what=name), what=name)
        file_ids, starts, ends = [], [], []
        for file_id, (p, key) in enumerate(files):
            s, e = _line_spans(p)
            keep = _keep(unit_hash(key_hash(key), np.arange(len(s))) < validation_fraction, split)
            file_ids.append(np.full(int(keep.sum()), file_id, np.int32))
            starts.append(s[keep])
            ends.append(e[keep])
        docs = JsonlDocuments([p for p, _ in files], np.concatenate(file_ids), np.concatenate(starts),
                              np.concatenate(ends), text_field, decoder, name)
        return Source(name, weight, docs=_nonempty(docs, name, split), decoder=decoder)

    if kind == "arrayrecord":
        # A directory means its *.array_record shards (tools/build_corpus.py writes corpus.json beside them).
        patterns = [path] if isinstance(path, str) else list(path)
        patterns = [os.path.join(glob.escape(p), "*.array_record") if os.path.isdir(p) else p for p in patterns]
        shards = [p for p, _ in expand_paths(patterns, what=name)]
        metas = {d: read_corpus_meta(d) for d in sorted({os.path.dirname(s) for s in shards})}
        if any(m is None for m in metas.values()) and any(os.path.basename(s).startswith("tokens-") for s in shards):
            raise ValueError(f"{name}: token shards without {CORPUS_META}: tools/build_corpus.py did not "
                             "finish writing this corpus. Run it again with --overwrite.")
        kinds = {json.dumps(m and {"dtype": m["dtype"], "tokenizer": m["tokenizer"]}, sort_keys=True)
                 for m in metas.values()}
        if len(kinds) > 1:
            raise ValueError(f"{name}: its directories hold corpora of different tokenizers or formats "
                             f"({sorted(metas)}); give each its own data.sources entry.")
        meta = next(iter(metas.values()))
        chosen = []
        offset = 0
        for shard, n in zip(shards, _shard_lengths(shards)):
            keep = _keep(unit_hash(key_hash(os.path.basename(shard)), np.arange(n)) < validation_fraction, split)
            chosen.append(offset + np.flatnonzero(keep))
            offset += n
        docs = ArrayRecordDocuments(shards, np.concatenate(chosen), meta and meta["dtype"], decoder)
        return Source(name, weight, docs=_nonempty(docs, name, split), corpus_meta=meta, decoder=decoder)

    # parquet: streaming
    import pyarrow.parquet as pq

    files = expand_paths(path, what=name)
    # Row counts come from the footers: refuse an empty split now rather than spin on it later.
    count = sum(int(_keep(unit_hash(key_hash(k), np.arange(pq.ParquetFile(p).metadata.num_rows))
                          < validation_fraction, split).sum()) for p, k in files)
    if count == 0:
        _nonempty([], name, split)
    stream = _parquet_stream([p for p, _ in files], [k for _, k in files], text_field, split,
                             validation_fraction, name, decoder, parquet_cycle_length, shuffle_window)
    return Source(name, weight, stream=stream, decoder=decoder)


def _names(path) -> tuple[str, ...]:
    """python_packages' `path`: top-level names, as a str or a list ('' or []: all)."""
    return (path,) if isinstance(path, str) and path else tuple(path or ())


def _file_documents(kind: str, path, name: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(path, key) of every document of a one-document-per-file source, and the key that its
    split is drawn from."""
    if kind == "python_packages":
        found = python_package_files(_names(path))
        # Split by content: the same file, wherever a machine installs it, stays in one split.
        return [(p, k) for p, k, _ in found], [digest for _, _, digest in found]
    if kind == "stdlib":
        root, rel = stdlib_files()
        files = [(os.path.join(root, r), r) for r in rel]
    else:
        files = expand_paths(path, what=name)
    files = drop_empty_files(files, what=name)
    return files, [k for _, k in files]


def source_fingerprint(spec) -> dict:
    """Which files a stdlib, python_packages or text source reads (both splits): {'kind', 'files',
    'bytes', 'sha256'}, the hash taken over the sorted (key, SHA-256 of the contents) pairs.

    Record it with a run: python_packages differs between machines. Reads every file once per
    process (open_source of python_packages has already read them)."""
    kind, path = field_of(spec, "kind", ""), field_of(spec, "path", "")
    if kind not in ONE_DOCUMENT_PER_FILE:
        raise ValueError(f"source_fingerprint: kind {kind!r} is not one of {ONE_DOCUMENT_PER_FILE}.")
    files, _ = _file_documents(kind, path, f"{kind}{': ' + str(path) if path else ''}")
    pairs = sorted((key, file_digest(p)[0]) for p, key in files)
    return {"kind": kind, "files": len(pairs), "bytes": sum(os.path.getsize(p) for p, _ in files),
            "sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()}


def _nonempty(docs, name, split):
    if len(docs) == 0:
        hint = ("raise data.validation_fraction or set data.validation_sources" if split == "validation"
                else "lower data.validation_fraction or add documents")
        raise ValueError(f"{name}: no {split} documents; {hint}.")
    return grain.MapDataset.source(docs)
