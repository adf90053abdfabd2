"""Flash attention for Hopper GPUs (sm_90), written with Pallas Mosaic GPU.

Forward and backward (custom VJP) over the mask algebra of `pallas_kernels.mask`, with
block skipping: per (batch row, query block) a compacted list of the key blocks to visit is
built inside jit from per-block min/max of token_index / segment ids
(`mask.classify_tiles`), so the work follows the allowed area and a new window, chunk or
sink count (traced scalars) never recompiles. Tiles proven FULL skip the elementwise mask.

Kernel structure (FlashAttention-3 style, one CTA = three warpgroups: two compute, one
issuing TMA copies):
  * `forward`: a persistent grid walks (batch, head, 128-query block) work items; the two
    compute warpgroups ping-pong so one's softmax overlaps the other's matmuls.
  * `backward`: dK/dV by 128-key blocks and dQ by query blocks in two kernels (no atomics,
    deterministic), or with `deterministic=False` dQ fused into the dK/dV kernel and
    reduce-added in float32, for masks without a window or chunk.
  * `common`: what they share (Tuning, block lists, the mask of a tile, the work deal).
  * `api`: checks, padding, the custom VJP.

`Tuning` sets how the kernels run (block_kv, num_stages, num_ctas, and the profiler and
ablation hooks of tools/probe_hopper.py); it is a frozen dataclass argument, part of the
compile key. Measurements, versions and what did not help: docs/hopper_kernel_notes.md.

Importing needs only jax; the kernels run on a Hopper GPU with JAX >= 0.11 (Mosaic GPU's
wgmma / TMA / warp specialisation).
"""
from pallas_kernels.gpu.api import (  # noqa: F401
    flash_attention,
    flash_attention_bwd,
    flash_attention_fwd,
    kernel_path,
)
from pallas_kernels.gpu.common import (  # noqa: F401
    ABLATIONS,
    Tuning,
    backward_lists,
    block_lists,
    forward_lists,
)
