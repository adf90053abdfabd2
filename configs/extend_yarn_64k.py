"""Context extension: continue pretraining an existing checkpoint at 64K with YaRN (x8 over an
8K model), a lower learning rate, and a 60/40 mix of long and short documents (ProLong).

    python tools/convert_from_hf.py path/to/hf_model --workdir=runs/base   # or a ctxjax run
    python -m ctxjax.train --config=configs/extend_yarn_64k.py --workdir=runs/yarn64k \
        --config.checkpoint.init_from=runs/base
"""
from configs import llama_1b_32k_skyladder


def get_config():
    config = llama_1b_32k_skyladder.get_config()
    m = config.model
    m.max_position_embeddings = 65536
    m.rope = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
              "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0}
    m.layer_pattern = ("global",)

    config.train.seq_len = 65536
    config.train.global_batch_size = 8
    config.train.steps = 2000

    config.optim.lr = 2e-5
    config.optim.warmup_steps = 100
    config.optim.schedule = "cosine"

    config.skyladder.enabled = False  # extension trains on the full window
    config.data.sources = (
        dict(kind="arrayrecord", path="corpus/long/", text_field="text", weight=0.6),
        dict(kind="arrayrecord", path="corpus/short/", text_field="text", weight=0.4),
    )
    config.checkpoint.init_from = "runs/base"  # override on the command line
    return config
