"""A 150M Llama at 8K context with a SkyLadder chunked-window schedule, on one GPU.

    python -m ctxjax.train --config=configs/llama_150m_8k_skyladder.py --workdir=runs/150m \
        --config.data.sources='[{"kind": "arrayrecord", "path": "corpus/", "weight": 1.0}]' \
        --config.data.tokenizer=corpus/tokenizer.json
"""
from ctxjax import config as base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size = 32768
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 768, 12, 12, 4, 2048
    m.max_position_embeddings = 8192
    m.rope = {"rope_type": "default", "rope_theta": 500000.0}
    m.tie_embeddings = True
    config.parallel.remat = "save_matmuls"

    config.mesh.fsdp = -1
    config.train.seq_len = 8192
    config.train.global_batch_size = 32  # 256K tokens per step
    config.train.steps = 20000
    config.train.log_every = 50

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 1000
    config.optim.grad_accum_steps = 4

    config.skyladder.enabled = True  # chunked window 32 -> 8192 over the first 60% of steps
    config.skyladder.start = 32
    config.skyladder.climb_fraction = 0.6
    config.skyladder.multiple_of = 32

    config.checkpoint.every = 1000
    config.eval.every = 1000
    config.eval.batch_size = 8
    return config
