"""Throughput of the whole input pipeline, per host, on the embedded standard-library corpus.

    python tools/bench_data.py                       # prints a table, appends it to docs/benchmarks.md
    python tools/bench_data.py --seconds 20 --worker_counts 0 2 --no_record
    python tools/bench_data.py --source python_packages --bpe_vocab 0   # every .py file installed

Rows: reading text (decode + tokenize online) and reading the pre-tokenized ArrayRecord corpus
(built here first, timed too), each through packing, batching and the background prefetch the
train loop uses. tokens/s counts every position of every batch (what a train step consumes);
'fill' is the share that is not padding. The goal for ArrayRecord is 1.5M tokens/s per host:
20x what a 1B model at 50% MFU consumes on one H100.
"""
import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402

import ml_collections  # noqa: E402

from ctxjax.config import get_config
from ctxjax.data import build_corpus, make_tokenizer, make_train_iterator, train_bpe  # noqa: E402
from ctxjax.data.corpus import iter_documents  # noqa: E402
from ctxjax.data.sources import open_source  # noqa: E402

GOAL = 1.5e6
SECTION = "## Data pipeline (tools/bench_data.py)"
HEADER = "# Benchmarks\n\nResults appended by `tools/bench_*.py`, one section per tool, newest last.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}"


def measure(data_cfg, *, seq_len, batch, seconds):
    it = make_train_iterator(data_cfg, seq_len=seq_len, global_batch_size=batch, seed=0,
                             process_index=0, process_count=1)
    try:
        start = time.perf_counter()
        for _ in range(2):  # warm up: threads, worker processes, first packed groups
            next(it)
        first = time.perf_counter() - start
        tokens = filled = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            b = next(it)
            tokens += b["tokens"].size
            filled += int(np.count_nonzero(b["segment_ids"]))
        return tokens / elapsed, filled / tokens, first
    finally:
        it.close()


def record(path, text):
    """Appends `text` at the end of this tool's section, creating the file or section if absent."""
    body = open(path).read() if os.path.exists(path) else HEADER
    if SECTION not in body:
        body = body.rstrip("\n") + f"\n\n{SECTION}\n\n{__doc__.strip().splitlines()[0]}\n"
    start = body.index(SECTION) + len(SECTION)
    nxt = body.find("\n## ", start)
    end = len(body) if nxt < 0 else nxt + 1
    body = body[:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n" + ("\n" + body[end:] if nxt >= 0 else "")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, path)


def run_rows(args, workdir):
    """Builds the corpora in `workdir`, then measures every (source, packing, worker_count) row."""
    tokenizers = {"byte": "byte"}
    if args.bpe_vocab:  # a BPE trained here on a quarter of the training documents
        tokenizers[f"BPE {args.bpe_vocab}"] = os.path.join(workdir, "bpe.json")
        train = open_source(dict(kind=args.source), split="train", validation_fraction=0.05).docs
        sample = range(0, len(train), 4)
        train_bpe((train[i] for i in sample), args.bpe_vocab, tokenizers[f"BPE {args.bpe_vocab}"],
                  num_texts=len(sample), show_progress=False)
    corpora, builds = {}, []
    for name, spec in tokenizers.items():  # the source tokenized once into ArrayRecord, timed
        texts, total, _ = iter_documents(dict(kind=args.source))
        corpora[name] = os.path.join(workdir, f"{args.source}_{name.split()[0].lower()}")
        tok = make_tokenizer(ml_collections.ConfigDict(dict(tokenizer=spec)))
        meta = build_corpus(texts, tok, corpora[name], total=total, overwrite=True, progress=False)
        builds.append(f"{name} {meta['tokens'] / meta['seconds'] / 1e6:.1f}M tokens/s "
                      f"({meta['tokens'] / 1e6:.1f}M tokens)")
        print(f"built {corpora[name]}: {builds[-1]}", flush=True)

    load_before = os.getloadavg()[0]
    rows = []
    settings = []
    for name, spec in tokenizers.items():
        settings.append((f"ArrayRecord (pre-tokenized, {name})", dict(kind="arrayrecord", path=corpora[name]), spec))
        settings.append((f"text ({args.source} .py, {name} online)", dict(kind=args.source), spec))
    for name, source, tokenizer in settings:
        for packing in args.packings:
            for workers in args.worker_counts:
                cfg = get_config().data
                cfg.sources = [dict(source)]
                cfg.tokenizer, cfg.packing, cfg.worker_count = tokenizer, packing, workers
                rate, fill, first = measure(cfg, seq_len=args.seq_len, batch=args.batch, seconds=args.seconds)
                rows.append((name, packing, workers, rate, fill, first))
                print(f"{name:42s} {packing:9s} workers={workers}  {rate / 1e6:7.2f}M tokens/s  fill {fill:.3f}  "
                      f"first batch {first:.2f} s", flush=True)
    return rows, builds, load_before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["stdlib", "python_packages"], default="stdlib",
                        help="the documents: the standard library, or every .py file of this Python")
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16, help="global batch size (one host)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per row")
    parser.add_argument("--worker_counts", type=int, nargs="+", default=[0, 1], help="data.worker_count values")
    parser.add_argument("--packings", nargs="+", default=["first_fit", "concat"])
    parser.add_argument("--bpe_vocab", type=int, default=8192, help="also time online BPE tokenization (0: skip)")
    parser.add_argument("--workdir", default="", help="where to build the corpus (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"))
    parser.add_argument("--no_record", action="store_true", help="print only")
    args = parser.parse_args(argv)

    import grain
    import jax

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    try:
        rows, builds, load_before = run_rows(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    best_ar = max(r[3] for r in rows if r[0].startswith("ArrayRecord"))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"### {stamp} · {machine()} · JAX {jax.__version__} · Grain {grain.__version__} · "
        f"Python {platform.python_version()}",
        "",
        f"L={args.seq_len}, global batch {args.batch} ({args.seq_len * args.batch // 1024}K tokens/step), one host, "
        f"{args.seconds:g} s per row after 2 warm-up batches, prefetch=2. Corpus build (tools/build_corpus.py, "
        f"{args.source} -> ArrayRecord): {'; '.join(builds)}. Load average (1 min) "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after: other work on the machine slows every row.",
        "",
        "| source | packing | worker_count | tokens/s | fill | first batch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {n} | {p} | {w} | {r / 1e6:.2f}M | {f:.3f} | {t:.2f} s |" for n, p, w, r, f, t in rows]
    verdict = "meets" if best_ar >= GOAL else "is SHORT of"
    lines += ["", f"Best from ArrayRecord: {best_ar / 1e6:.2f}M tokens/s per host, which {verdict} the "
              f"{GOAL / 1e6:.1f}M tokens/s goal ({best_ar / GOAL:.1f}x)."]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_record:
        record(os.path.abspath(args.out), text)
        print(f"\nappended to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
