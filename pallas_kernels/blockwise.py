"""Memory-efficient attention in plain JAX (XLA): online softmax over key blocks
(FlashAttention's algorithm written with lax.scan), with a custom VJP that recomputes
probabilities from the logsumexp instead of storing them. O(T * block_k) memory per head,
any backend; the kernel used where no Pallas kernel applies.

The forward and backward halves are public so ring attention can call them once per K/V
shard with the globally merged out/lse.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mask import MaskSpec, allowed_pairs

_PAD_INDEX = np.iinfo(np.int32).max // 2  # token_index of padding keys; masked explicitly too


def _pad_keys(k, v, mask: MaskSpec, block_k: int):
    """Pad S to a multiple of block_k; returns (k, v, mask, kv_valid [B, S_padded])."""
    b, s = k.shape[:2]
    pad = (-s) % block_k
    valid = jnp.ones((b, s), bool)
    if pad == 0:
        return k, v, mask, valid
    pad_rows = lambda x, value: jnp.pad(x, ((0, 0), (0, pad)), constant_values=value)
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = mask.replace(
        kv_token_index=pad_rows(mask.kv_token_index, _PAD_INDEX),
        kv_segment_ids=None if mask.kv_segment_ids is None else pad_rows(mask.kv_segment_ids, 0))
    return k, v, mask, pad_rows(valid, False)


def _blocks(x, block_k):
    """[B, S, ...] -> [S/block_k, B, block_k, ...] for scanning over key blocks."""
    b, s = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, s // block_k, block_k, *x.shape[2:]), 1, 0)


def _block_allowed(mask: MaskSpec, kv_pos, kv_seg, kv_valid):
    """Allowed pairs for all queries against one key block: [B, 1, 1, T, bk] (heads broadcast)."""
    q_seg = None if mask.q_segment_ids is None else mask.q_segment_ids[:, None, None, :, None]
    k_seg = None if kv_seg is None else kv_seg[:, None, None, None, :]
    ok = allowed_pairs(mask.q_token_index[:, None, None, :, None], kv_pos[:, None, None, None, :],
                       q_seg, k_seg, causal=mask.causal, window=mask.window, chunk=mask.chunk,
                       sinks=mask.sinks)
    return ok & kv_valid[:, None, None, None, :]


def _prepare(q, k, v, mask, scale, block_k):
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")
    mask = (MaskSpec() if mask is None else mask).resolved(b, t, s)
    block_k = min(block_k, s)
    k, v, mask, kv_valid = _pad_keys(k, v, mask, block_k)
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    kv_seg = None if mask.kv_segment_ids is None else _blocks(mask.kv_segment_ids, block_k)
    xs = (_blocks(k, block_k), _blocks(v, block_k), _blocks(mask.kv_token_index, block_k), kv_seg,
          _blocks(kv_valid, block_k))
    return qg, xs, mask, scale


def blockwise_attention_fwd(q, k, v, mask: MaskSpec | None = None, *, scale=None, block_k: int = 512):
    """-> (out [B,T,Hq,D] in q.dtype, lse [B,Hq,T] float32). Rows with no allowed key: 0 and -inf."""
    b, t, hq, d = q.shape
    qg, xs, mask, scale = _prepare(q, k, v, mask, scale, block_k)
    hkv, g = qg.shape[2], qg.shape[3]
    qf = qg.astype(jnp.float32) * scale

    def step(carry, x):
        m, l, acc = carry  # [B,Hkv,G,T], [B,Hkv,G,T], [B,Hkv,G,T,D]
        kb, vb, kpos, kseg, kvalid = x
        ok = _block_allowed(mask, kpos, kseg, kvalid)

        def attend(carry):
            m, l, acc = carry
            s = jnp.einsum("btkgd,bskd->bkgts", qf, kb.astype(jnp.float32))
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(ok, jnp.exp(s - m_safe[..., None]), 0.0)
            correction = jnp.exp(m - m_safe)  # m = -inf -> 0
            l = l * correction + p.sum(-1)
            acc = acc * correction[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, vb.astype(jnp.float32))
            return m_new, l, acc

        return jax.lax.cond(ok.any(), attend, lambda c: c, carry), None

    init = (jnp.full((b, hkv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32),
            jnp.zeros((b, hkv, g, t, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    has_keys = l > 0
    out = acc / jnp.where(has_keys, l, 1.0)[..., None]
    lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)
    out = jnp.moveaxis(out, 3, 1).reshape(b, t, hq, d).astype(q.dtype)
    return out, lse.reshape(b, hq, t)


def blockwise_attention_bwd(q, k, v, mask: MaskSpec | None, out, lse, dout, *, scale=None,
                            block_k: int = 512, dlse=None):
    """Gradients (dq, dk, dv) given the (possibly globally merged) out and lse, and optionally
    the cotangent of lse (d lse / d logits = p, so it enters as a shift of delta)."""
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    qg, xs, mask, scale = _prepare(q, k, v, mask, scale, block_k)
    g = hq // hkv
    to_groups = lambda x: jnp.moveaxis(x.reshape(b, t, hkv, g, d), 1, 3).astype(jnp.float32)  # [B,Hkv,G,T,D]
    qf, do = to_groups(q), to_groups(dout)
    delta = (do * to_groups(out)).sum(-1)  # [B,Hkv,G,T]
    if dlse is not None:
        delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0).reshape(b, hkv, g, t)
    lse = lse.reshape(b, hkv, g, t)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # no keys -> p = 0

    def step(dq, x):
        kb, vb, kpos, kseg, kvalid = x
        ok = _block_allowed(mask, kpos, kseg, kvalid)

        def grads(dq):
            kf, vf = kb.astype(jnp.float32), vb.astype(jnp.float32)
            s = jnp.einsum("bkgtd,bskd->bkgts", qf, kf) * scale
            p = jnp.where(ok, jnp.exp(s - lse_safe[..., None]), 0.0)
            dv = jnp.einsum("bkgts,bkgtd->bskd", p, do)
            dp = jnp.einsum("bkgtd,bskd->bkgts", do, vf)
            ds = p * (dp - delta[..., None]) * scale
            dq = dq + jnp.einsum("bkgts,bskd->bkgtd", ds, kf)
            dk = jnp.einsum("bkgts,bkgtd->bskd", ds, qf)
            return dq, (dk, dv)

        def skip(dq):
            zeros = jnp.zeros(kb.shape, jnp.float32)
            return dq, (zeros, zeros)

        return jax.lax.cond(ok.any(), grads, skip, dq)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros((b, hkv, g, t, d), jnp.float32), xs)
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, hkv, d)[:, :s_len]
    dq = jnp.moveaxis(dq, 3, 1).reshape(b, t, hq, d)
    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)


def _zero_cotangent(x):
    return np.zeros(np.shape(x), jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, mask, scale, block_k):
    return blockwise_attention_fwd(q, k, v, mask, scale=scale, block_k=block_k)


def _blockwise_fwd(q, k, v, mask, scale, block_k):
    out, lse = blockwise_attention_fwd(q, k, v, mask, scale=scale, block_k=block_k)
    return (out, lse), (q, k, v, mask, out, lse)


def _blockwise_bwd(scale, block_k, residuals, cotangents):
    q, k, v, mask, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = blockwise_attention_bwd(q, k, v, mask, out, lse, dout, scale=scale, block_k=block_k,
                                         dlse=dlse)
    return dq, dk, dv, jax.tree.map(_zero_cotangent, mask)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, mask: MaskSpec | None = None, *, scale=None, block_k: int = 512,
                        return_lse: bool = False):
    """Differentiable blockwise attention. See `blockwise_attention_fwd` for shapes."""
    out, lse = _blockwise(q, k, v, MaskSpec() if mask is None else mask, scale, block_k)
    return (out, lse) if return_lse else out
