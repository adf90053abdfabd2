"""The attention mask algebra shared by every backend (docs/architecture.md, "The mask algebra").

For query i and key j with token_index values q_i, k_j and segment ids s_i, t_j:

    allowed(i, j) = causal(i, j) and (k_j < sinks or (document and window and chunk))

    causal:   k_j <= q_i
    document: s_i == t_j and s_i != 0
    window w: q_i - k_j < w
    chunk c:  k_j >= floor(q_i / c) * c

A term that is not configured (None) counts as true. `window`, `chunk` and `sinks` may be
traced scalars, so a SkyLadder schedule changes them without recompiling.

This module knows nothing about models; kernels and the XLA reference both build on it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile classes used by block-skipping kernels


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which (query, key) pairs may attend. Arrays are [B, T] (queries) or [B, S] (keys).

    `q_token_index` / `kv_token_index` default to arange(T) / arange(S); they are the
    positions the mask uses (not necessarily the RoPE positions). Segment ids: 1.. per
    document, 0 = padding; None turns the document term off. Passing only
    `q_segment_ids` uses them for the keys too (self-attention).
    """

    causal: bool = True
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    q_token_index: Array | None = None
    kv_token_index: Array | None = None
    window: Array | int | None = None
    chunk: Array | int | None = None
    sinks: Array | int = 0

    def __post_init__(self):
        if self.kv_segment_ids is not None and self.q_segment_ids is None:
            raise ValueError("MaskSpec: kv_segment_ids given without q_segment_ids; pass both "
                             "(or only q_segment_ids for self-attention).")
        for name in ("window", "chunk"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"MaskSpec: {name}={value} must be >= 1 (or None for no {name}).")
        if isinstance(self.sinks, int) and self.sinks < 0:
            raise ValueError(f"MaskSpec: sinks={self.sinks} must be >= 0.")

    @property
    def has_segments(self) -> bool:
        return self.q_segment_ids is not None

    def replace(self, **changes) -> "MaskSpec":
        return dataclasses.replace(self, **changes)

    def resolved(self, batch: int, q_len: int, kv_len: int) -> "MaskSpec":
        """A copy with every array present, int32 and [B, T] / [B, S] shaped."""

        def as_rows(x, length, what):
            x = jnp.asarray(x, jnp.int32)
            if x.ndim == 1:
                x = jnp.broadcast_to(x[None], (batch, x.shape[0]))
            if x.shape != (batch, length):
                raise ValueError(f"MaskSpec: {what} has shape {x.shape}, expected ({batch}, {length}) "
                                 f"to match the attention inputs.")
            return x

        q_idx = jnp.arange(q_len, dtype=jnp.int32) if self.q_token_index is None else self.q_token_index
        kv_idx = jnp.arange(kv_len, dtype=jnp.int32) if self.kv_token_index is None else self.kv_token_index
        q_seg, kv_seg = self.q_segment_ids, self.kv_segment_ids
        if q_seg is not None and kv_seg is None:
            if q_len != kv_len:
                raise ValueError("MaskSpec: only q_segment_ids given but T != S; pass kv_segment_ids too.")
            kv_seg = q_seg
        return self.replace(
            q_token_index=as_rows(q_idx, q_len, "q_token_index"),
            kv_token_index=as_rows(kv_idx, kv_len, "kv_token_index"),
            q_segment_ids=None if q_seg is None else as_rows(q_seg, q_len, "q_segment_ids"),
            kv_segment_ids=None if kv_seg is None else as_rows(kv_seg, kv_len, "kv_segment_ids"),
        )


jax.tree_util.register_dataclass(
    MaskSpec,
    data_fields=["q_segment_ids", "kv_segment_ids", "q_token_index", "kv_token_index",
                 "window", "chunk", "sinks"],
    meta_fields=["causal"],
)


def allowed_pairs(q_pos, k_pos, q_seg, k_seg, *, causal, window, chunk, sinks):
    """The mask algebra on broadcastable arrays of positions / segment ids (seg may be None)."""
    allowed = (k_pos <= q_pos) if causal else jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
    body = jnp.ones_like(allowed)
    if q_seg is not None:
        body &= (q_seg == k_seg) & (q_seg != 0)
    if window is not None:
        body &= (q_pos - k_pos) < window
    if chunk is not None:
        body &= k_pos >= (q_pos // chunk) * chunk
    return allowed & ((k_pos < sinks) | body)


def dense_mask(mask: MaskSpec, batch: int, q_len: int, kv_len: int) -> jax.Array:
    """The materialised boolean mask, [B, T, S]. O(T*S) memory: for references and small T."""
    m = mask.resolved(batch, q_len, kv_len)
    q_seg = None if m.q_segment_ids is None else m.q_segment_ids[:, :, None]
    k_seg = None if m.kv_segment_ids is None else m.kv_segment_ids[:, None, :]
    return allowed_pairs(m.q_token_index[:, :, None], m.kv_token_index[:, None, :], q_seg, k_seg,
                         causal=m.causal, window=m.window, chunk=m.chunk, sinks=m.sinks)


def _block_min_max(x: jax.Array, block: int):
    b, length = x.shape
    if length % block:
        raise ValueError(f"length {length} is not a multiple of the block size {block}; pad first.")
    x = x.reshape(b, length // block, block)
    return x.min(-1), x.max(-1)


def classify_tiles(mask: MaskSpec, batch: int, q_len: int, kv_len: int, block_q: int, block_k: int) -> jax.Array:
    """Classify each (q-block, k-block) tile as EMPTY, PARTIAL or FULL: int32 [B, T/bq, S/bk].

    Decided from per-block min/max of token_index and segment ids only, so it costs
    O((T/bq) * (S/bk)) and runs inside jit on traced windows. It is conservative: a tile
    called EMPTY has no allowed pair, and one called FULL has every pair allowed; anything
    it cannot prove is PARTIAL (the kernel then applies the elementwise mask).
    """
    m = mask.resolved(batch, q_len, kv_len)
    qmin, qmax = (a[:, :, None] for a in _block_min_max(m.q_token_index, block_q))
    kmin, kmax = (a[:, None, :] for a in _block_min_max(m.kv_token_index, block_k))
    true = jnp.ones(jnp.broadcast_shapes(qmin.shape, kmin.shape), bool)

    causal_any = (kmin <= qmax) if m.causal else true
    causal_all = (kmax <= qmin) if m.causal else true
    body_any, body_all = true, true
    if m.has_segments:
        qs_min, qs_max = (a[:, :, None] for a in _block_min_max(m.q_segment_ids, block_q))
        ks_min, ks_max = (a[:, None, :] for a in _block_min_max(m.kv_segment_ids, block_k))
        body_any &= (qs_max >= 1) & (ks_max >= 1) & (qs_min <= ks_max) & (ks_min <= qs_max)
        body_all &= (qs_min == qs_max) & (ks_min == ks_max) & (qs_min == ks_min) & (qs_min != 0)
    if m.window is not None:
        body_any &= (qmin - kmax) < m.window
        body_all &= (qmax - kmin) < m.window
    if m.chunk is not None:
        body_any &= kmax >= (qmin // m.chunk) * m.chunk
        body_all &= kmin >= (qmax // m.chunk) * m.chunk
    sinks_any = kmin < m.sinks
    sinks_all = kmax < m.sinks
    any_allowed = causal_any & (sinks_any | body_any)
    all_allowed = causal_all & (sinks_all | body_all)
    return jnp.where(all_allowed, FULL, jnp.where(any_allowed, PARTIAL, EMPTY)).astype(jnp.int32)


def allowed_pair_count(mask: MaskSpec, batch: int, q_len: int, kv_len: int, *, rows: int = 512) -> jax.Array:
    """Number of allowed (query, key) pairs, summed over the batch; O(rows * S) memory."""
    m = mask.resolved(batch, q_len, kv_len)
    rows = min(rows, q_len)
    pad = (-q_len) % rows
    q_idx = jnp.pad(m.q_token_index, ((0, 0), (0, pad)))
    q_seg = None if m.q_segment_ids is None else jnp.pad(m.q_segment_ids, ((0, 0), (0, pad)))
    valid = jnp.arange(q_len + pad) < q_len

    def count(i):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=1)
        qs = None if q_seg is None else sl(q_seg)[:, :, None]
        ks = None if m.kv_segment_ids is None else m.kv_segment_ids[:, None, :]
        ok = allowed_pairs(sl(q_idx)[:, :, None], m.kv_token_index[:, None, :], qs, ks,
                           causal=m.causal, window=m.window, chunk=m.chunk, sinks=m.sinks)
        ok &= jax.lax.dynamic_slice_in_dim(valid, i * rows, rows)[None, :, None]
        return ok.sum(dtype=jnp.float32)

    return jax.lax.map(count, jnp.arange((q_len + pad) // rows)).sum()


def count_allowed_pairs(token_index, segment_ids, *, window=None, chunk=None, sinks=0,
                        documents=True) -> float:
    """`allowed_pair_count` of a causal self-attention mask, on the host with NumPy in O(B*L).

    token_index / segment_ids are [B, L] (the same for queries and keys); `documents` turns the
    document term on (segment 0 = padding). Each query sees the keys from the latest of its
    document start, window start and chunk start up to itself, plus the sinks before that.
    Needs the rows in natural order with contiguous documents, as packing produces (i.e.
    before a zigzag reordering). For MFU: no device work, no O(L^2) memory.
    """
    q = np.asarray(token_index, np.int64)
    segment_ids = np.asarray(segment_ids)
    start = np.zeros_like(q)
    if documents:
        new_doc = np.concatenate([np.ones_like(segment_ids[:, :1], bool),
                                  segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        start = np.maximum.accumulate(np.where(new_doc, q, 0), axis=1)
    if window is not None:
        start = np.maximum(start, q - window + 1)
    if chunk is not None:
        start = np.maximum(start, (q // chunk) * chunk)
    body = q - start + 1
    if documents:
        body = np.where(segment_ids != 0, body, 0)
    # Sink keys before `start` (all precede the query) or, for a query with no body, up to itself.
    extra_sinks = np.where(body > 0, np.minimum(sinks, start), np.minimum(sinks, q + 1))
    return float((body + extra_sinks).sum())


def allowed_flops(mask: MaskSpec, batch: int, q_len: int, kv_len: int, num_heads: int, head_dim: int,
                  *, backward: bool = False) -> jax.Array:
    """Matmul FLOPs over the allowed area only: 4*D per pair forward (QK^T and PV), and
    3.5x that for forward+backward (five matmuls more in the backward)."""
    flops = 4.0 * head_dim * num_heads * allowed_pair_count(mask, batch, q_len, kv_len)
    return flops * (3.5 if backward else 1.0)
