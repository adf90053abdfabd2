"""Pure-JAX reference attention over a materialised mask: the function every kernel matches.

O(T*S) memory; float32 softmax. Fully masked query rows return 0 and lse = -inf.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.mask import MaskSpec, dense_mask


def attention_reference(q, k, v, mask: MaskSpec | None = None, *, scale: float | None = None,
                        return_lse: bool = False):
    """q [B,T,Hq,D], k/v [B,S,Hkv,D] (Hq a multiple of Hkv) -> out [B,T,Hq,D] (q.dtype),
    and lse [B,Hq,T] float32 (natural log) when return_lse."""
    mask = MaskSpec() if mask is None else mask
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
    allowed = dense_mask(mask, b, t, s)[:, None, None]
    logits = jnp.where(allowed, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
    denom = p.sum(-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(denom == 0, 1.0, denom), v.astype(jnp.float32))
    out = out.reshape(b, t, hq, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(denom[..., 0] > 0, jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0)) + row_max[..., 0], -jnp.inf)
    return out, lse.reshape(b, hq, t)
