"""Tokenize text once into ArrayRecord shards, so training never re-tokenizes.

    python tools/build_corpus.py --out corpus/ --kind stdlib
    python tools/build_corpus.py --out corpus/ --kind python_packages   # + every site-packages
    python tools/build_corpus.py --out corpus/ --kind jsonl --path 'data/*.jsonl' --text_field text \
        --tokenizer corpus/tokenizer.json

then train with data.sources = [dict(kind='arrayrecord', path='corpus/')] and the same
data.tokenizer. Shards are written under temporary names and renamed when complete; corpus.json,
written last, marks a finished corpus.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import ml_collections  # noqa: E402

from ctxjax.data import build_corpus, make_tokenizer  # noqa: E402
from ctxjax.data.corpus import iter_documents  # noqa: E402
from ctxjax.data.sources import KINDS, ONE_DOCUMENT_PER_FILE, source_fingerprint  # noqa: E402

EMBEDDED = ("stdlib", "python_packages")  # need no --path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--kind", default="stdlib", choices=[k for k in KINDS if k != "arrayrecord"])
    parser.add_argument("--path", nargs="*", default=[], help="files, directories or globs (not for stdlib); "
                        "for python_packages, top-level package names to keep (default: all)")
    parser.add_argument("--text_field", default="text", help="JSON key / Parquet column with the text")
    parser.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json or a SentencePiece .model")
    parser.add_argument("--shard_mb", type=float, default=256.0, help="start a new shard after this many MiB")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.kind not in EMBEDDED and not args.path:
        parser.error(f"--kind {args.kind} needs --path")
    spec = dict(kind=args.kind, path=args.path, text_field=args.text_field)
    tokenizer = make_tokenizer(ml_collections.ConfigDict(dict(tokenizer=args.tokenizer)))
    texts, total, decoders = iter_documents(spec)
    description = f"{args.kind}: {' '.join(args.path)}"
    if args.kind in ONE_DOCUMENT_PER_FILE:  # which files exactly (python_packages differs between machines)
        fp = source_fingerprint(spec)
        description += f" ({fp['files']} files, {fp['bytes']} bytes, sha256 {fp['sha256']})"
    meta = build_corpus(texts, tokenizer, args.out, total=total, shard_mb=args.shard_mb,
                        overwrite=args.overwrite, description=description)
    bad = sum(d.bad_documents for d in decoders)
    print(f"{args.out}: {meta['documents']} documents, {meta['tokens']} tokens in {len(meta['shards'])} "
          f"shard(s), {meta['seconds']} s ({meta['tokens'] / max(meta['seconds'], 1e-9) / 1e6:.1f}M tokens/s); "
          f"{meta['skipped_empty']} empty skipped; {bad} not valid UTF-8 (invalid bytes replaced by U+FFFD).")


if __name__ == "__main__":
    main()
