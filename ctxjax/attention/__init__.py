"""The attention op: `attention(q, k, v, mask, implementation="auto")` and `MaskSpec`."""
from pallas_kernels.mask import MaskSpec  # noqa: F401
from pallas_kernels.blockwise import (  # noqa: F401
    blockwise_attention, blockwise_attention_bwd, blockwise_attention_fwd)
from ctxjax.attention.ops import IMPLEMENTATIONS, attention, resolve_implementation  # noqa: F401
