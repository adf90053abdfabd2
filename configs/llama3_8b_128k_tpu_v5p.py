"""Llama-3-8B shapes at 128K context on a TPU v5p pod slice, v5p-256 (topology 4x4x8: 128
chips, 32 hosts): fsdp 16 x context 8 mesh, ring attention with zigzag load balancing, Pallas
TPU kernel.

Pre-flight from any host first (compiles every program for the slice; pip install -e ".[tpu]"):

    python -m ctxjax.aot --config=configs/llama3_8b_128k_tpu_v5p.py --topology=v5p:4x4x8

then on every host of the slice:

    python -m ctxjax.train --config=configs/llama3_8b_128k_tpu_v5p.py --workdir=gs://bucket/run \
        --config.train.distributed=True
"""
from ctxjax import config as base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size = 128256
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 4096, 32, 32, 8, 14336
    m.max_position_embeddings = 131072
    m.rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config.parallel.attention = "pallas_tpu"
    config.parallel.context_strategy = "ring"
    config.parallel.remat = "full"

    config.mesh.update(dict(data=1, fsdp=-1, tensor=1, context=8))
    config.train.seq_len = 131072
    config.train.global_batch_size = 16  # 2M tokens per step
    config.train.steps = 10000
    config.train.distributed = True

    config.optim.lr = 3e-4
    config.optim.warmup_steps = 500

    config.skyladder.enabled = True
    config.skyladder.start = 512
    config.skyladder.climb_fraction = 0.5
    config.skyladder.multiple_of = 512

    config.checkpoint.every = 250
    config.checkpoint.keep = 2
    config.eval.batch_size = 16  # one row per fsdp group, as in training (must split over fsdp 16)
    return config
