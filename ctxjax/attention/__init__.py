"""Attention for the model: the backends table (ctxjax.attention.backends) and context
parallelism (ctxjax.attention.context_parallel). ctxjax/parallel.py chooses between them."""
from pallas_kernels.mask import MaskSpec  # noqa: F401
from ctxjax.attention.backends import BACKEND_NAMES, BACKENDS, attend  # noqa: F401
