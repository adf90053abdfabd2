"""The demo: a ~3M-parameter byte-level model on the embedded standard-library corpus, with a
SkyLadder window that climbs from 32 to the full 512 tokens. About 5 minutes on 2 CPU cores.

    python -m ctxjax.train --config=configs/tiny_cpu.py --workdir=runs/tiny
"""
from ctxjax import config as base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size = 320  # byte tokenizer's 259 ids, padded to a multiple of 64
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 256, 4, 4, 2, 768
    m.max_position_embeddings = 512
    m.dtype = "float32"  # CPUs have no fast bfloat16 matmuls
    config.parallel.remat = "none"

    config.train.seq_len = 512
    config.train.global_batch_size = 8
    config.train.steps = 180
    config.train.log_every = 10

    config.optim.lr = 2e-3
    config.optim.warmup_steps = 20
    config.optim.schedule = "cosine"

    config.skyladder.enabled = True
    config.skyladder.start = 32
    config.skyladder.climb_fraction = 0.6  # reach the full 512-token window at 60% of training

    config.checkpoint.every = 90
    config.eval.every = 90
    config.eval.batches = 2
    return config
