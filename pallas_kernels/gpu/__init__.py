"""Mosaic GPU (Hopper, sm_90) attention kernels. Import needs only jax; the kernels run on a
Hopper GPU with JAX >= 0.11 (Mosaic GPU's wgmma / TMA / warp specialisation)."""
from pallas_kernels.gpu.flash_attention import (  # noqa: F401
    block_lists,
    flash_attention,
    flash_attention_bwd,
    flash_attention_fwd,
)
