"""The Llama-family model, its RoPE family, and the training loss."""
import ml_collections

from ctxjax.model.llama import (  # noqa: F401
    Llama, count_params, head_dim_of, init_params, logical_axes, matmul_flops_per_token)
from ctxjax.model.loss import chunked_cross_entropy, lm_loss, next_token_targets  # noqa: F401


def default_model_config() -> ml_collections.ConfigDict:
    """The `config.model` section: every model knob, documented once."""
    c = ml_collections.ConfigDict()
    c.vocab_size = 259  # byte tokenizer: 256 bytes + BOS/EOS/PAD (set from the tokenizer by configs)
    c.d_model = 256
    c.n_layers = 4
    c.n_heads = 4
    c.n_kv_heads = 2  # GQA: n_heads must be a multiple
    c.head_dim = 0  # 0 = d_model // n_heads; may differ (e.g. Gemma-style 256)
    c.mlp_dim = 768  # SwiGLU hidden size
    c.norm_eps = 1e-5
    c.tie_embeddings = False
    c.qkv_bias = False  # biases on the q/k/v projections (Qwen2 family)
    c.init_std = 0.02
    c.max_position_embeddings = 2048  # the length RoPE scalings are relative to
    c.rope = {"rope_type": "default", "rope_theta": 10000.0}  # HF transformers 5.x `rope_parameters`
    c.layer_pattern = ("global",)  # repeating; entries 'global', 'local' or 'local:<window>'
    c.local_window = 1024  # window of 'local' layers
    c.document_mask = True  # attend only within a document of a packed row
    c.sinks = 0  # first n tokens of each row visible to every later query (Λ-shape / anchor)
    c.attention_impl = "auto"  # auto | xla | xla_blockwise | cudnn | pallas_gpu | pallas_tpu | splash
    c.attention_deterministic = True  # False: Pallas GPU fused backward (1.07-1.13x for causal masks, not bit-reproducible)
    c.context_strategy = "ring"  # context parallelism: ring | all_gather
    c.remat = "full"  # none | full | save_matmuls | offload
    c.param_dtype = "float32"
    c.dtype = "bfloat16"  # compute dtype
    return c
