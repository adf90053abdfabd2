"""Attention kernels (Pallas) and the reference they match. Kernels know nothing about models.

- `pallas_kernels.mask`: MaskSpec, the mask algebra, tile classification for block skipping,
  allowed-pair counts (for FLOP and MFU accounting).
- `pallas_kernels.operands`: a MaskSpec as the padded int32 vectors the Pallas kernels test.
- `pallas_kernels.reference`: the pure-JAX reference attention.
- `pallas_kernels.blockwise`: XLA blockwise (online-softmax) attention, any backend.
- `pallas_kernels.gpu`: Mosaic GPU kernels for Hopper.
- `pallas_kernels.tpu`: Mosaic TPU kernels.
"""
from pallas_kernels.blockwise import blockwise_attention  # noqa: F401
from pallas_kernels.mask import MaskSpec, classify_tiles, dense_mask  # noqa: F401
from pallas_kernels.reference import attention_reference  # noqa: F401
