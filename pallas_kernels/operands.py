"""A MaskSpec as the padded int32 vectors the Pallas kernels test, shared by GPU and TPU.

Every kernel evaluates the mask algebra of `pallas_kernels.mask` in this reduced form, per
query i and key j of the padded problem:

    allowed(i, j) = k_pos[j] <= q_pos[i]                                        (if causal)
                    and (k_pos[j] < sinks or (k_pos[j] >= q_lo[i] and k_seg[j] == q_seg[i]))

`q_lo` folds the window (q - w + 1) and chunk (floor(q / c) * c) lower bounds into one
vector; `q_seg` maps the padding segment 0 to INT_MIN, so equality alone also says "not
padding"; a term that is not configured is None and drops out (with no body term the sinks
cannot matter, so they are None too). The kernels add one thing: keys past the real length
are masked by index.

Lengths are padded by repeating the last real token (edge padding): the per-block min/max
of token_index and segment ids, hence the tile classes of `mask.classify_tiles`, are then
unchanged. Padded queries are sliced off by the kernels.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from pallas_kernels.mask import MaskSpec

Array = Any

INT_MIN = -(2 ** 31)
INT_MAX = 2 ** 31 - 1


@dataclasses.dataclass(frozen=True)
class MaskOperands:
    """The mask of a padded problem, as the kernels read it. Arrays are int32 [B, Tp] or [B, Sp]."""

    padded: MaskSpec          # resolved and edge-padded: what `classify_tiles` reads
    q_pos: Array              # query token_index
    k_pos: Array              # key token_index
    q_lo: Array | None        # first key token_index the window / chunk allow
    q_seg: Array | None       # query segment ids, padding (0) mapped to INT_MIN
    k_seg: Array | None       # key segment ids
    sinks: Array | None       # [1]: keys with token_index < sinks are always visible

    @property
    def flags(self) -> dict[str, bool]:
        """The static facts the kernels specialise on."""
        return dict(causal=self.padded.causal, has_lo=self.q_lo is not None,
                    has_seg=self.q_seg is not None, has_sinks=self.sinks is not None)


def _edge_pad(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])), mode="edge") if length > x.shape[1] else x


def _static_int(x, value):
    return isinstance(x, int) and not isinstance(x, bool) and x == value


def mask_operands(mask: MaskSpec, batch: int, q_len: int, kv_len: int, q_pad: int,
                  kv_pad: int) -> MaskOperands:
    """Resolve `mask` for [B, q_len] x [B, kv_len] and pad it to (q_pad, kv_pad). Runs inside jit;
    window, chunk and sinks may be traced."""
    m = mask.resolved(batch, q_len, kv_len)
    q_pos, k_pos = _edge_pad(m.q_token_index, q_pad), _edge_pad(m.kv_token_index, kv_pad)
    q_seg_ids = k_seg = None
    if m.has_segments:
        q_seg_ids, k_seg = _edge_pad(m.q_segment_ids, q_pad), _edge_pad(m.kv_segment_ids, kv_pad)
    q_lo = None
    if m.window is not None:
        # A static window past the int32 range means "no window"; q - w + 1 must not overflow.
        w = min(m.window, INT_MAX) if isinstance(m.window, int) else m.window
        q_lo = q_pos - jnp.asarray(w, jnp.int32) + 1
    if m.chunk is not None:
        c = jnp.asarray(m.chunk, jnp.int32)
        start = (q_pos // c) * c
        q_lo = start if q_lo is None else jnp.maximum(q_lo, start)
    q_seg = None
    if q_seg_ids is not None:
        q_seg = jnp.where(q_seg_ids != 0, q_seg_ids, INT_MIN).astype(jnp.int32)
    has_sinks = not _static_int(m.sinks, 0) and (q_lo is not None or q_seg is not None)
    sinks = jnp.reshape(jnp.asarray(m.sinks, jnp.int32), (1,)) if has_sinks else None
    padded = m.replace(q_token_index=q_pos, kv_token_index=k_pos, q_segment_ids=q_seg_ids,
                       kv_segment_ids=k_seg)
    return MaskOperands(padded=padded, q_pos=q_pos, k_pos=k_pos, q_lo=q_lo, q_seg=q_seg,
                        k_seg=k_seg, sinks=sinks)
