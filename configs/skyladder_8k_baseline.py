"""SkyLadder experiment, baseline arm: a 76M-parameter byte-level Llama at 8K tokens per row,
documents masked, full causal attention, on every .py file of the installed Python
(`python_packages`). tools/experiment_skyladder.py trains it and configs/skyladder_8k_ladder.py
(the same run with the SkyLadder window) for the same tokens and compares them; it sets
train.steps (and warmup_steps and eval.every in proportion) from a throughput probe so both arms
fit one 10-minute GPU command.

    python3 tools/experiment_skyladder.py --out results/    # one H200, about 9 minutes

By hand: python -m ctxjax.train --config=configs/skyladder_8k_baseline.py --workdir=runs/base

Choices:
- Model: the body of configs/llama_150m_8k_skyladder.py (d_model 768, 12 layers, 12 query and
  4 key/value heads of 64, SwiGLU 2048) with the byte tokenizer's 259 ids padded to 320:
  75.5M parameters outside the embeddings, 76.0M in all. Bytes need no tokenizer training on the
  GPU machine and make 8K tokens 8K bytes of code. Head dim 64 takes the Hopper kernel.
- At 8K, attention is 44% of the training FLOPs here (362 of 817 MFLOP per token with this
  corpus's documents, measured with ctxjax.metrics.step_flops), so a short window saves time.
- Batch: 16 rows x 8K = 128K tokens per step. An arm of 2-4 minutes on an H200 (at an estimated
  0.3-0.5M tokens/s) sees some 40-120M tokens, i.e. 300-900 steps; a larger batch would leave
  too few steps for the window to climb smoothly.
- remat 'none': nothing is recomputed. XLA's memory analysis of this step compiled for the CPU
  gives 45 KB per token and layer, i.e. about 70 GB of activations for 128K tokens x 12 layers,
  within an H200's 139 GiB (the experiment lets JAX take 92% of it instead of the default 75%).
- Data settings: the byte tokenizer and first-fit packing of python_packages produced 10-27M
  tokens/s on 2 busy CPU cores in one process (docs/experiments/README.md), 20x or more what this
  model consumes on an H200 (~0.3-0.6M tokens/s): read_threads 8, no worker processes (they
  cost seconds to start and change nothing here), prefetch 4 batches.
"""
from ctxjax import config as base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size = 320  # the byte tokenizer's 259 ids, padded to a multiple of 64
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 768, 12, 12, 4, 2048
    m.max_position_embeddings = 8192
    m.rope = {"rope_type": "default", "rope_theta": 500000.0}
    m.document_mask = True
    config.parallel.remat = "none"

    d = config.data
    d.sources = (dict(kind="python_packages", path="", text_field="text", weight=1.0),)
    d.tokenizer = "byte"
    d.packing = "first_fit"
    d.read_threads, d.worker_count, d.prefetch = 8, 0, 4
    d.validation_fraction = 0.05

    t = config.train
    t.seq_len = 8192
    t.global_batch_size = 16  # 128K tokens per step
    t.steps = 600  # the experiment sets it from its time budget
    t.log_every = 10
    t.plot = False

    o = config.optim
    o.lr = 1e-3
    o.warmup_steps = 36  # 6% of steps (the experiment keeps this share)
    o.schedule = "cosine"
    o.min_lr_ratio = 0.1

    config.skyladder.enabled = False  # full causal attention (within documents)

    config.checkpoint.every = 10**9  # only the final save (the experiment reads its params)
    config.checkpoint.keep = 1
    config.eval.every = 40  # the experiment sets ~15 points per arm
    config.eval.batches = 4
    config.eval.batch_size = 8  # 4 x 8 rows x 8K = 256K held-out tokens per point
    return config
