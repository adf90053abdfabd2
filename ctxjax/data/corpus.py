"""Pre-tokenized corpora: text or JSONL tokenized once into ArrayRecord shards.

Layout of a corpus directory:
  tokens-00000.array_record ...  one record per document: its token ids, little-endian
                                 `dtype` (uint16 when the vocabulary fits, else uint32),
                                 without BOS/EOS (the pipeline adds those by config)
  corpus.json                    format, dtype, tokenizer (name, fingerprint, vocab size),
                                 shard names and sizes, document and token counts

Each shard is written under a temporary name and renamed when complete; corpus.json is
written last, so a directory without it is an unfinished build and is refused.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator

import numpy as np

from ctxjax.data import sources as sources_lib
from ctxjax.data.tokenizer import Tokenizer

SHARD_PREFIX = "tokens-"
WRITER_OPTIONS = "group_size:1,zstd:1"  # group_size 1: random access reads one record only


def iter_documents(spec, *, index: int = 0) -> tuple[Iterator[str], int | None, list]:
    """Every document of one `data.sources`-style entry, in order: (texts, count or None,
    decoders). Holds nothing out: the corpus is split by record when it is read."""
    kind = sources_lib.field_of(spec, "kind", "")
    if kind == "arrayrecord":
        raise ValueError("build_corpus reads stdlib, text, jsonl or parquet sources, not arrayrecord.")
    if kind == "parquet":
        import pyarrow.parquet as pq

        path = sources_lib.field_of(spec, "path", "")
        field = str(sources_lib.field_of(spec, "text_field", "text"))
        name = f"parquet: {path}"
        decoder = sources_lib.Utf8Decoder(name)
        files = [p for p, _ in sources_lib.expand_paths(path, what=name)]

        def rows():
            for p in files:
                pf = pq.ParquetFile(p)
                if field not in pf.schema_arrow.names:
                    raise KeyError(f"{p} has no column {field!r} (it has {pf.schema_arrow.names}); set text_field.")
                for batch in pf.iter_batches(columns=[field], batch_size=1024):
                    for value in batch.column(0).to_pylist():
                        yield decoder(value, p) if isinstance(value, bytes) else ("" if value is None else str(value))

        total = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        return rows(), total, [decoder]
    source = sources_lib.open_source(spec, split="all", validation_fraction=0.0, index=index)
    docs = source.docs
    return (docs[i] for i in range(len(docs))), len(docs), [source.decoder]


class ShardWriter:
    """Writes records to numbered ArrayRecord shards of about `shard_bytes` each, each under a
    temporary name until it is closed."""

    def __init__(self, out_dir: str, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.shards: list[dict] = []
        self._writer = None

    def _open(self):
        from array_record.python import array_record_module

        name = f"{SHARD_PREFIX}{len(self.shards):05d}.array_record"
        self._tmp = os.path.join(self.out_dir, f".{name}.tmp-{os.getpid()}")
        self._writer = array_record_module.ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
        self.shards.append({"name": name, "documents": 0, "tokens": 0, "bytes": 0})

    def write(self, record: bytes, num_tokens: int):
        if self._writer is None:
            self._open()
        self._writer.write(record)
        shard = self.shards[-1]
        shard["documents"] += 1
        shard["tokens"] += num_tokens
        shard["bytes"] += len(record)
        if shard["bytes"] >= self.shard_bytes:
            self.close()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            os.replace(self._tmp, os.path.join(self.out_dir, self.shards[-1]["name"]))
            self._writer = None

    def abort(self):
        """Drops the shard being written: only complete shards ever carry a final name."""
        if self._writer is not None:
            self._writer.close()
            os.remove(self._tmp)
            self.shards.pop()
            self._writer = None


def build_corpus(texts: Iterable[str], tokenizer: Tokenizer, out_dir: str, *, total: int | None = None,
                 shard_mb: float = 256.0, batch_size: int = 256, overwrite: bool = False,
                 description: str = "", progress: bool = True) -> dict:
    """Tokenizes `texts` (empty ones are skipped) into ArrayRecord shards in `out_dir`.

    Returns the corpus.json contents. Refuses a directory that already holds a corpus unless
    `overwrite`, so a finished corpus is never half-replaced by accident.
    """
    from tqdm import tqdm

    meta_path = os.path.join(out_dir, sources_lib.CORPUS_META)
    if os.path.exists(meta_path) or (os.path.isdir(out_dir) and any(
        f.startswith(SHARD_PREFIX) for f in os.listdir(out_dir))):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a corpus; pass overwrite=True (--overwrite) "
                                  "or choose another directory.")
        for f in os.listdir(out_dir):
            if f.startswith(SHARD_PREFIX) or f == sources_lib.CORPUS_META:
                os.remove(os.path.join(out_dir, f))
    os.makedirs(out_dir, exist_ok=True)
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 2**16 else np.dtype("<u4")
    writer = ShardWriter(out_dir, int(shard_mb * 2**20))
    skipped_empty = 0
    start = time.time()
    bar = tqdm(total=total, unit="doc", desc=f"tokenizing into {out_dir}", disable=not progress)
    texts = iter(texts)
    try:
        while chunk := list(itertools.islice(texts, batch_size)):
            nonempty = [t for t in chunk if t]
            skipped_empty += len(chunk) - len(nonempty)
            for ids in tokenizer.encode_batch(nonempty):
                writer.write(ids.astype(dtype).tobytes(), len(ids))
            bar.update(len(chunk))
    except BaseException:
        writer.abort()  # no corpus.json is written, so readers refuse the unfinished corpus
        raise
    finally:
        bar.close()
    writer.close()
    if not writer.shards:
        raise ValueError(f"No non-empty documents to write to {out_dir}.")
    meta = {
        "format": sources_lib.CORPUS_FORMAT,
        "dtype": dtype.str,
        "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size},
        "documents": sum(s["documents"] for s in writer.shards),
        "tokens": sum(s["tokens"] for s in writer.shards),
        "skipped_empty": skipped_empty,
        "shards": writer.shards,
        "description": description,
        "seconds": round(time.time() - start, 2),
    }
    tmp = f"{meta_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, meta_path)
    return meta


def check_corpus_tokenizer(meta: dict, tokenizer: Tokenizer, where: str) -> None:
    """A pre-tokenized corpus must be read with the tokenizer that wrote it."""
    written = meta["tokenizer"]
    if written["fingerprint"] != tokenizer.fingerprint:
        raise ValueError(
            f"{where} was tokenized with {written['name']!r} (vocab {written['vocab_size']}, fingerprint "
            f"{written['fingerprint']}) but data.tokenizer is {tokenizer.name!r} (vocab "
            f"{tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint}). Set data.tokenizer to the "
            "corpus's tokenizer or rebuild the corpus with tools/build_corpus.py.")
