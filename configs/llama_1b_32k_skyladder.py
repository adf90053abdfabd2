"""A 1B Llama at 32K context: SkyLadder chunked windows, documents masked, interleaved
local/global attention; one GPU node (8 GPUs: fsdp x context)."""
from ctxjax import config as base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size = 128256
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 2048, 16, 32, 8, 8192
    m.head_dim = 64
    m.max_position_embeddings = 32768
    m.rope = {"rope_type": "default", "rope_theta": 500000.0}
    m.tie_embeddings = True
    m.layer_pattern = ("local", "local", "global")
    m.local_window = 4096
    config.parallel.remat = "full"

    config.mesh.update(dict(data=1, fsdp=-1, tensor=1, context=2))
    config.train.seq_len = 32768
    config.train.global_batch_size = 16  # 512K tokens per step
    config.train.steps = 50000
    config.train.log_every = 20

    config.optim.lr = 4e-4
    config.optim.warmup_steps = 2000
    config.optim.schedule = "wsd"
    config.optim.decay_fraction = 0.2

    config.skyladder.enabled = True
    config.skyladder.start = 64
    config.skyladder.climb_fraction = 0.5
    config.skyladder.multiple_of = 64

    config.checkpoint.every = 1000
    config.eval.every = 2000
    return config
