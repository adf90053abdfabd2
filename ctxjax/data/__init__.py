"""Input pipeline: sources, tokenizers and the Grain pipeline that packs long-context batches.

The train loop uses:
  make_tokenizer(data_cfg) / check_vocab()   the tokenizer, and its fit to the model
  make_train_iterator(data_cfg, ...)         checkpointable Grain iterator of packed batches
  make_eval_batches(data_cfg, ...)           fixed batches of held-out documents
"""
from ctxjax.data.corpus import build_corpus
from ctxjax.data.pipeline import (
    BATCH_KEYS,
    Stage,
    curriculum_stages,
    make_eval_batches,
    make_train_iterator,
    pose_positions,
)
from ctxjax.data.sources import source_fingerprint, stdlib_files
from ctxjax.data.tokenizer import Tokenizer, check_vocab, make_tokenizer, train_bpe

__all__ = [
    "BATCH_KEYS", "Stage", "Tokenizer", "build_corpus", "check_vocab", "curriculum_stages",
    "make_eval_batches", "make_tokenizer", "make_train_iterator",
    "pose_positions", "source_fingerprint", "stdlib_files", "train_bpe",
]
