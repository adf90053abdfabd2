"""JAX's splash attention behind the `flash_attention` signature, for the static masks it supports.

Splash (`jax.experimental.pallas.ops.tpu.splash_attention`) builds its block-sparsity tables in
NumPy from a static mask, so it covers: causal or not, a sliding window given as a Python int,
and segment ids (packed documents). It cannot express traced windows, chunks, sinks or custom
token_index arrays; those raise an error pointing to `pallas_kernels.tpu.flash_attention`.
Offered so TPU users can compare (`implementation="splash"`); our kernel stays the default.

Differences papered over here: splash does not scale q (we do, in float32), and gives
padding queries (segment id 0) an average instead of 0, so those rows are zeroed (lse = -inf).
`return_lse=True` is forward-only (splash cannot differentiate its residuals).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pallas_kernels.mask import MaskSpec
from pallas_kernels.tpu.flash_attention import BlockSizes, _default_interpret


def _unsupported(what):
    raise ValueError(f"splash_attention: {what} is not supported by splash (static masks only); use "
                     f"pallas_kernels.tpu.flash_attention (implementation='pallas').")


def _static_int(value, name):
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        return None if value is None else int(value)
    _unsupported(f"a traced or array {name} ({type(value).__name__})")


def _splash_mask(mask: MaskSpec, q_len: int, kv_len: int):
    """-> (splash 2-D mask, static [T] bool of rows that see no key)."""
    if mask.q_token_index is not None or mask.kv_token_index is not None:
        _unsupported("an explicit token_index")
    if mask.chunk is not None:
        _unsupported("a chunked window")
    if _static_int(mask.sinks, "sinks") != 0:
        _unsupported("attention sinks")
    window = _static_int(mask.window, "window")
    shape = (q_len, kv_len)
    rows = np.arange(q_len)
    if window is None:
        blind = np.zeros(q_len, bool)
        return (splash.CausalMask(shape) if mask.causal else splash.FullMask(shape)), blind
    # allowed iff k >= q - (window - 1) (and k <= q when causal): a local mask.
    blind = rows - (window - 1) > kv_len - 1
    return splash.LocalMask(shape, window_size=(window - 1, 0 if mask.causal else None), offset=0), blind


def splash_attention(q, k, v, mask: MaskSpec | None = None, *, scale: float | None = None,
                     return_lse: bool = False, block_sizes: BlockSizes | None = None, interpret=None):
    """q [B,T,Hq,D], k/v [B,S,Hkv,D] -> out [B,T,Hq,D] (and lse [B,Hq,T] float32, forward-only)."""
    mask = MaskSpec() if mask is None else mask
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"splash_attention: query heads ({num_heads}) must be a multiple of key/value heads "
                         f"({num_kv_heads}).")
    block_sizes = block_sizes or BlockSizes()
    bq = block_sizes.block_q or min(512, q_len)
    bk = block_sizes.block_kv or min(512, kv_len)
    if q_len % bq or kv_len % bk or bq % 128 or bk % 128:
        raise ValueError(f"splash_attention: T={q_len} and S={kv_len} must be multiples of block sizes "
                         f"({bq}, {bk}) that are multiples of 128; pad the sequence, pass "
                         f"block_sizes=BlockSizes(...), or use pallas_kernels.tpu.flash_attention (pads itself).")
    base_mask, blind_rows = _splash_mask(mask, q_len, kv_len)
    interpret = _default_interpret(interpret)
    kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask([base_mask] * num_heads),
        block_sizes=splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                                      block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                                      block_q_dq=bq, block_kv_dq=bk),
        save_residuals=return_lse,
        interpret=interpret,
    )
    scale = head_dim ** -0.5 if scale is None else scale
    qh = (jnp.swapaxes(q, 1, 2).astype(jnp.float32) * scale).astype(q.dtype)  # splash does not scale
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    segments = None
    if mask.has_segments:
        m = mask.resolved(batch, q_len, kv_len)
        segments = splash.SegmentIds(q=m.q_segment_ids, kv=m.kv_segment_ids)
    per_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=s)
    if interpret:  # TPU interpret mode cannot run a vmapped pallas_call: loop over the batch
        result = jax.lax.map(lambda xs: per_row(*xs), (qh, kh, vh, segments))
    else:
        result = jax.vmap(per_row)(qh, kh, vh, segments)
    out, lse = (result[0], result[1][0]) if return_lse else (result, None)

    blind = jnp.broadcast_to(jnp.asarray(blind_rows), (batch, q_len))
    if mask.has_segments:
        blind = blind | (segments.q == 0)
    out = jnp.where(blind[:, None, :, None], 0, out)
    out = jnp.swapaxes(out, 1, 2).astype(q.dtype)
    if not return_lse:
        return out
    return out, jnp.where(blind[:, None, :], -jnp.inf, lse.astype(jnp.float32))

