"""The attention op every layer calls: one mask algebra, several backends.

`attention(q, k, v, mask, implementation="auto")` picks, by platform:
  TPU -> Pallas TPU kernel; Hopper GPU -> Pallas Mosaic GPU kernel for the inputs it takes
  (bf16/fp16, head_dim 64 or 128), XLA blockwise otherwise (e.g. a float32 model); other
  backends -> XLA blockwise. When the active mesh has a `context` axis > 1 the chosen
  backend runs inside the context-parallel wrapper (ring or all-gather).

`deterministic=False` lets the Pallas GPU kernel fuse its backward into one kernel (dQ
reduce-added in float32, so gradients vary in the last bits between runs); the other
backends ignore it. The kernel fuses only masks without a window or chunk; on an H100 that
made causal forward+backward 1.07-1.13x faster (docs/hopper_kernel_notes.md, session 6).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.blockwise import blockwise_attention, blockwise_attention_bwd, blockwise_attention_fwd
from pallas_kernels.mask import MaskSpec
from pallas_kernels.reference import attention_reference

IMPLEMENTATIONS = ("auto", "xla", "xla_blockwise", "cudnn", "pallas_gpu", "pallas_tpu", "splash")


def _xla(q, k, v, mask, *, scale=None, return_lse=False):
    return attention_reference(q, k, v, mask, scale=scale, return_lse=return_lse)


def _cudnn(q, k, v, mask: MaskSpec, *, scale=None, return_lse=False):
    """cuDNN through jax.nn.dot_product_attention: causal and a static sliding window only."""
    problems = []
    if return_lse:
        problems.append("it returns no logsumexp (needed for ring attention)")
    if mask.q_segment_ids is not None:
        problems.append("document masks (segment ids)")
    if mask.q_token_index is not None or mask.kv_token_index is not None:
        problems.append("explicit token_index (e.g. zigzag-ordered shards)")
    if mask.chunk is not None:
        problems.append("chunked (SkyLadder) windows")
    if not (isinstance(mask.sinks, int) and mask.sinks == 0):
        problems.append("attention sinks")
    if mask.window is not None and not isinstance(mask.window, int):
        problems.append("a traced window (it needs a Python int)")
    if problems:
        raise ValueError("implementation='cudnn' cannot express: " + "; ".join(problems)
                         + ". Use implementation='auto' (Pallas kernel / XLA blockwise) instead.")
    window = None if mask.window is None else (mask.window - 1, 0 if mask.causal else mask.window - 1)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=mask.causal,
                                        local_window_size=window, implementation="cudnn")


def _pallas_gpu():
    from pallas_kernels import gpu
    return gpu


def _pallas_tpu():
    from pallas_kernels import tpu
    return tpu


def _is_hopper() -> bool:
    """sm_90 exactly: the Mosaic GPU kernels use Hopper-only wgmma."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def resolve_implementation(implementation: str, dtype=None, head_dim: int | None = None) -> str:
    """Map "auto" to a concrete backend for the default device (and, when given, the inputs'
    dtype and head_dim)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}.")
    if implementation != "auto":
        return implementation
    platform = jax.default_backend()
    if platform == "tpu":
        return "pallas_tpu"
    if platform == "gpu" and _is_hopper():
        kernel_takes = ((dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))
                        and head_dim in (None, 64, 128))
        return "pallas_gpu" if kernel_takes else "xla_blockwise"
    return "xla_blockwise"


def local_fwd_bwd(implementation: str, deterministic: bool = True):
    """(fwd, bwd) halves of a backend, as the context-parallel wrapper needs them."""
    if implementation in ("xla", "xla_blockwise", "cudnn", "splash"):
        return blockwise_attention_fwd, blockwise_attention_bwd
    if implementation == "pallas_gpu":
        gpu = _pallas_gpu()
        return gpu.flash_attention_fwd, functools.partial(gpu.flash_attention_bwd,
                                                          deterministic=deterministic)
    tpu = _pallas_tpu()
    return tpu.flash_attention_fwd, tpu.flash_attention_bwd


def _local_attention(implementation, q, k, v, mask, scale, deterministic):
    if implementation == "xla":
        return _xla(q, k, v, mask, scale=scale)
    if implementation == "xla_blockwise":
        return blockwise_attention(q, k, v, mask, scale=scale)
    if implementation == "cudnn":
        return _cudnn(q, k, v, mask, scale=scale)
    if implementation == "pallas_gpu":
        return _pallas_gpu().flash_attention(q, k, v, mask, scale=scale, deterministic=deterministic)
    if implementation == "pallas_tpu":
        return _pallas_tpu().flash_attention(q, k, v, mask, scale=scale)
    if implementation == "splash":
        from pallas_kernels.tpu import splash
        return splash.splash_attention(q, k, v, mask, scale=scale)
    raise AssertionError(implementation)


def attention(q, k, v, mask: MaskSpec | None = None, *, implementation: str = "auto", scale=None,
              context_strategy: str = "ring", deterministic: bool = True):
    """q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D]. See DESIGN.md for the mask algebra."""
    mask = MaskSpec() if mask is None else mask
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q [B,T,Hq,D] and k/v [B,S,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}.")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} do not match (batch, head_dim, k == v).")
    implementation = resolve_implementation(implementation, q.dtype, q.shape[-1])
    from ctxjax import mesh as mesh_lib  # the mesh module alone knows axis names
    mesh = mesh_lib.active_mesh()
    if mesh is not None and mesh.shape.get("context", 1) > 1:
        from ctxjax.attention.context_parallel import context_parallel_attention
        fwd, bwd = local_fwd_bwd(implementation, deterministic)
        b, t, s = q.shape[0], q.shape[1], k.shape[1]
        return context_parallel_attention(
            q, k, v, mask.resolved(b, t, s), mesh=mesh, strategy=context_strategy, local_fwd=fwd,
            local_bwd=bwd, scale=scale, **mesh_lib.attention_axes(mesh))
    return _local_attention(implementation, q, k, v, mask, scale, deterministic)
