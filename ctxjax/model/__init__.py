"""The Llama-family model, its typed architecture config, RoPE, and the training loss."""
from ctxjax.model.config import LayerMask, ModelConfig  # noqa: F401
from ctxjax.model.llama import KVCache, Llama, abstract_model, init_params, logical_axes  # noqa: F401
from ctxjax.model.loss import chunked_cross_entropy, lm_loss, next_token_targets  # noqa: F401
