"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) locally and save tokenizer.json.

    python tools/train_tokenizer.py --out corpus/tokenizer.json --vocab_size 8192            # stdlib
    python tools/train_tokenizer.py --out tok.json --kind jsonl --path 'data/*.jsonl' --max_docs 200000

Trains on the training split only (documents held out by data.validation_fraction are not seen),
then checks that held-out documents round-trip exactly and reports bytes per token on them.
"""
import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ctxjax.data import train_bpe  # noqa: E402
from ctxjax.data.sources import open_source  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write tokenizer.json")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--kind", default="stdlib", choices=("stdlib", "python_packages", "text", "jsonl", "arrayrecord"))
    parser.add_argument("--path", nargs="*", default=[], help="files, directories or globs (not for stdlib)")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--max_docs", type=int, default=0, help="train on at most this many documents (0: all)")
    parser.add_argument("--validation_fraction", type=float, default=0.05, help="as data.validation_fraction")
    args = parser.parse_args(argv)

    spec = dict(kind=args.kind, path=args.path, text_field=args.text_field)
    train = open_source(spec, split="train", validation_fraction=args.validation_fraction).docs
    n = min(len(train), args.max_docs) if args.max_docs else len(train)
    start = time.time()
    tok = train_bpe((train[i] for i in range(n)), args.vocab_size, args.out, num_texts=n)
    print(f"trained {args.out}: vocab {tok.vocab_size} on {n} documents in {time.time() - start:.1f} s")

    if args.validation_fraction > 0:
        held_out = open_source(spec, split="validation", validation_fraction=args.validation_fraction).docs
        texts = [held_out[i] for i in itertools.islice(range(len(held_out)), 200)]
        encoded = tok.encode_batch(texts)
        exact = sum(tok.decode(ids) == t for ids, t in zip(encoded, texts))
        ratio = sum(len(t.encode()) for t in texts) / max(1, sum(len(ids) for ids in encoded))
        print(f"held-out: {exact}/{len(texts)} documents round-trip exactly; {ratio:.2f} bytes per token")


if __name__ == "__main__":
    main()
