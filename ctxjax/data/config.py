"""The `config.data` section: every knob of the input pipeline, with its default."""
from __future__ import annotations

import ml_collections

from ctxjax.data.sources import KINDS

PACKINGS = ("first_fit", "concat")
ROPE_POSITIONS = ("reset", "continuous", "pose")
LONG_DOCUMENTS = ("split_keep", "split_drop")
_SOURCE_KEYS = ("kind", "path", "text_field", "weight")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: the embedded standard-library corpus, byte tokenizer, first-fit packing."""
    c = ml_collections.ConfigDict()

    # --- where documents come from
    # A list of dicts, mixed by `weight`. Each source is packed on its own, so weights are shares
    # of packed rows, i.e. of training tokens (e.g. ProLong's 0.6 long code/books + 0.4 short).
    #   kind: 'stdlib'      the Python standard library's own .py files (no download, one
    #                       document per file; many are longer than 8K tokens)
    #         'python_packages'  every .py file of this Python: the standard library and every
    #                       site-/dist-packages directory, each content once (no download; ~300 MB
    #                       with torch, transformers and jax; the file set differs between machines: record
    #                       sources.source_fingerprint). Held out by content hash.
    #         'text'        one document per file
    #         'jsonl'       one document per line, the text in `text_field`
    #         'parquet'     streamed row groups, the text in column `text_field`
    #         'arrayrecord' random access: token ids written by tools/build_corpus.py (a
    #                       corpus.json beside the shards), or else UTF-8 text records
    #   path: a file, a directory (every file below it), a glob ('**' recurses) or a list of
    #         them; ignored for 'stdlib'; for 'python_packages', top-level package or module
    #         names to keep (e.g. ['numpy', 'json']), empty for all
    c.sources = (dict(kind="stdlib", path="", text_field="text", weight=1.0),)

    # --- tokenizer
    # 'byte' (256 bytes + BOS/EOS/PAD = 259 ids), a Hugging Face tokenizer.json
    # (tools/train_tokenizer.py trains one), or a SentencePiece .model.
    c.tokenizer = "byte"
    # Special tokens of a tokenizer.json, when neither tokenizer_config.json beside it nor the
    # usual spellings (<s>, </s>, <|endoftext|>, ...) find them. Empty: look them up.
    c.bos_token = ""
    c.eos_token = ""
    c.pad_token = ""
    c.add_bos = True  # prepend BOS to every document
    c.add_eos = True  # append EOS to every document

    # --- packing into rows of seq_len tokens
    # 'first_fit': whole documents into the first of `packing_bins` open rows with room, the
    #              rest padded (segment_ids 0); 'concat': concatenate and cut every seq_len
    #              tokens (no padding; a document may continue in the next row).
    c.packing = "first_fit"
    c.packing_bins = 16  # rows open at once for first_fit: more bins, less padding, more memory
    # Documents longer than seq_len are cut into seq_len pieces (separate segments). The last,
    # shorter piece is kept ('split_keep') or dropped ('split_drop'); with 'concat', split_drop
    # trims each long document to a multiple of seq_len.
    c.long_documents = "split_keep"
    # What RoPE sees: 'reset' (0.. within each document), 'continuous' (= token_index, 0..L-1
    # along the row), 'pose' (PoSE: each document cut into `pose_chunks` chunks whose positions
    # skip ahead at random so they span up to pose_target_length; train short, attend long).
    c.rope_positions = "reset"
    c.pose_target_length = 0  # required for 'pose': the context length to simulate (> seq_len)
    c.pose_chunks = 2

    # --- order and sharding
    c.seed = 0  # mixed with make_train_iterator's seed: change data order alone
    c.shuffle = True  # global shuffle of random-access sources, reshuffled every epoch
    c.shuffle_window = 1024  # documents: window shuffle for streaming (parquet) sources
    c.parquet_cycle_length = 4  # parquet files read at once per host

    # --- parallelism
    c.read_threads = 8  # threads reading and tokenizing documents, per source
    c.read_buffer = 64  # documents read ahead per source
    # Processes per source reading + tokenizing (Grain mp_prefetch); 0: in this process. Worth it
    # when online tokenization is the bottleneck and cores are free; >1 changes the document order.
    c.worker_count = 0
    c.worker_buffer_size = 8  # documents buffered per worker process
    c.prefetch = 2  # batches assembled ahead in a background thread; 0: none

    # --- sequence-length curriculum
    # Stages ((start_step, seq_len, global_batch_size), ...), the first at step 0. Every stage
    # must keep seq_len * global_batch_size equal to the run's tokens per step. Empty: one stage.
    # A new stage goes on with the next unread document (what the packers held back, at most
    # packing_bins rows per source, is dropped); the iterator state records the stage.
    c.curriculum = ()

    # --- validation
    # Documents held out of training by a stable hash of their key (path, line, record), the same
    # on every machine. make_eval_batches reads them, or `validation_sources` (same format as
    # `sources`, nothing held out) when given.
    c.validation_fraction = 0.05
    c.validation_sources = ()
    return c


def _get(cfg, key):
    if key not in cfg:
        raise KeyError(f"config.data has no key {key!r}; start from ctxjax.data.default_data_config().")
    return cfg[key]


def validate_data_config(cfg) -> None:
    """Raises an error naming the knob and the fix for an unknown key or a value out of range."""
    import difflib

    known = set(default_data_config())
    for key in set(cfg) - known:
        close = difflib.get_close_matches(key, known, n=1)
        raise KeyError(f"config.data has no key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                       + " See ctxjax.data.default_data_config() for every knob.")
    def choice(key, options):
        if _get(cfg, key) not in options:
            raise ValueError(f"data.{key}={cfg[key]!r}: expected one of {options}.")

    choice("packing", PACKINGS)
    choice("rope_positions", ROPE_POSITIONS)
    choice("long_documents", LONG_DOCUMENTS)
    for key, low in (("packing_bins", 1), ("read_threads", 1), ("read_buffer", 1), ("worker_count", 0),
                     ("worker_buffer_size", 1), ("prefetch", 0), ("pose_chunks", 1), ("shuffle_window", 1),
                     ("parquet_cycle_length", 1)):
        if int(_get(cfg, key)) < low:
            raise ValueError(f"data.{key}={cfg[key]} must be >= {low}.")
    if not 0.0 <= float(_get(cfg, "validation_fraction")) < 1.0:
        raise ValueError(f"data.validation_fraction={cfg.validation_fraction} must be in [0, 1).")
    for list_key in ("sources", "validation_sources"):
        entries = list(_get(cfg, list_key))
        if list_key == "sources" and not entries:
            raise ValueError("data.sources is empty; add at least one source, e.g. dict(kind='stdlib').")
        for i, src in enumerate(entries):
            unknown = set(src) - set(_SOURCE_KEYS)
            if unknown:
                raise ValueError(f"data.{list_key}[{i}] has unknown keys {sorted(unknown)}; allowed: {_SOURCE_KEYS}.")
            if src.get("kind") not in KINDS:
                raise ValueError(f"data.{list_key}[{i}].kind={src.get('kind')!r}: expected one of {KINDS}.")
