"""Mosaic TPU attention kernels (run in TPU interpret mode on CPU for tests).

- `flash_attention`: block-skipping flash attention, forward + backward, every MaskSpec.
- `flash_attention_fwd` / `flash_attention_bwd`: the two halves, for ring attention.
- `splash_attention`: JAX's splash attention behind the same signature, for static masks.
"""
from pallas_kernels.tpu.flash_attention import (  # noqa: F401
    BlockSizes,
    flash_attention,
    flash_attention_bwd,
    flash_attention_fwd,
    tile_schedule_stats,
)
from pallas_kernels.tpu.splash import splash_attention  # noqa: F401
