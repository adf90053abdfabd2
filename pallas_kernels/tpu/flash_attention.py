"""Flash attention for TPU (Pallas / Mosaic TPU) with run-time block skipping.

Same contract as `pallas_kernels.reference.attention_reference`: q [B,T,Hq,D], k/v [B,S,Hkv,D]
(GQA: Hq a multiple of Hkv; K/V are never repeated in HBM, each q head reads its group's K/V
block), mask a `MaskSpec`, lse [B,Hq,T] float32. Forward and backward (dq, dk, dv) through
`jax.custom_vjp`; bf16 or f32 inputs, float32 accumulation. Fully masked rows give 0 and
lse = -inf, and zero gradients.

Block skipping. Inside jit, `classify_tiles` labels every (q-block, k-block) tile EMPTY,
PARTIAL or FULL from per-block min/max of token_index and segment ids (window, chunk and sinks
may be traced, so a SkyLadder schedule never recompiles). The tiles are compacted into a
work list, one entry per non-empty tile, ordered by q-block (forward, dq) or by k-block
(dk/dv), and prefetched into SMEM with `PrefetchScalarGridSpec`. The grid is
(heads, number of entries): a dynamic grid dimension, so empty tiles are never visited and
the cost tracks the allowed area. FULL tiles skip the elementwise mask; PARTIAL tiles
apply it. A q-block (or k-block) with no visible tile gets one entry that only writes its
zeros, so every output block is written.

Layout inside the kernels: heads-major [B, H, T, D] (the wrapper transposes), T and S
padded up to the block sizes (the padding is masked). Per-row mask data travels
lane-broadcast ([B, T, 128]) when it indexes sublanes and sublane-broadcast ([B, 8, T])
when it indexes lanes, as in JAX's splash attention, so mask vectors never need a relayout;
lse leaves the forward through one transpose and is stored lane-major ([B, H, 8, T]).

`flash_attention_fwd` / `flash_attention_bwd` are the two halves, for ring attention: the
backward recomputes probabilities from the lse it is given and uses D = rowsum(dout * out),
so it is exact when out and lse are the merge over several K/V shards.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mask import EMPTY, FULL, PARTIAL, MaskSpec, classify_tiles
from pallas_kernels.operands import mask_operands

NUM_LANES = 128
NUM_SUBLANES = 8
# Largest work list we prefetch into SMEM (1 MiB on v4..v7; leave room for the rest).
MAX_TABLE_BYTES = 512 * 1024

# A work-list entry is two int32: the row (batch * blocks + block) and an info word,
# (other block index << 4) | LAST | FIRST | tile kind (2 bits).
_FIRST, _LAST, _SHIFT = 4, 8, 4

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (multiples of 128). None picks a default from the sequence length."""

    block_q: int | None = None
    block_kv: int | None = None


def default_block(length: int) -> int:
    """512 where it divides the 128-padded length, else 256, else 128 (never pads further)."""
    padded = -(-length // NUM_LANES) * NUM_LANES
    return next(b for b in (512, 256, 128) if padded % b == 0)


def resolve_block_sizes(block_sizes, q_len: int, kv_len: int) -> tuple[int, int]:
    if block_sizes is None:
        block_sizes = BlockSizes()
    elif isinstance(block_sizes, (tuple, list)):
        block_sizes = BlockSizes(*block_sizes)
    bq = block_sizes.block_q or default_block(q_len)
    bk = block_sizes.block_kv or default_block(kv_len)
    for name, b in (("block_q", bq), ("block_kv", bk)):
        if not isinstance(b, int) or b <= 0 or b % NUM_LANES:
            raise ValueError(f"flash_attention: {name}={b} must be a positive multiple of {NUM_LANES} "
                             f"(TPU lane width); e.g. BlockSizes(block_q=512, block_kv=512).")
    return bq, bk


def _default_interpret(interpret):
    """None: compile for TPU when on one, else run in TPU interpret mode on the host."""
    if interpret is None:
        return False if jax.default_backend() == "tpu" else pltpu.InterpretParams()
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret


# ----------------------------------------------------------------------------- mask data


class KernelMask(NamedTuple):
    """`operands.MaskOperands` as the kernels take it (int32, padded to the block grid):

    allowed(i, j) = k_pos[j] <= q_hi[i]                         (causal)
                    and (k_pos[j] < sinks or (k_pos[j] >= q_lo[i] and k_seg[j] == q_seg[i]))

    A None field is a term that is not configured (q_hi: not causal; k_pos: no term reads it).
    """

    q_hi: jax.Array | None  # [B, Tp]
    q_lo: jax.Array | None  # [B, Tp]
    q_seg: jax.Array | None  # [B, Tp]
    k_pos: jax.Array | None  # [B, Sp]
    k_seg: jax.Array | None  # [B, Sp]
    sinks: jax.Array | None  # [1]


def prepare_mask(mask: MaskSpec, batch: int, q_len: int, kv_len: int, block_q: int, block_kv: int):
    """-> (KernelMask, tiles [B, Tp/bq, Sp/bk] int32 EMPTY/PARTIAL/FULL). Runs inside jit."""
    if not isinstance(mask, MaskSpec):
        raise TypeError(f"flash_attention: mask must be a pallas_kernels.mask.MaskSpec, got {type(mask).__name__}.")
    q_pad, kv_pad = q_len + (-q_len) % block_q, kv_len + (-kv_len) % block_kv
    ops = mask_operands(mask, batch, q_len, kv_len, q_pad, kv_pad)
    tiles = classify_tiles(ops.padded, batch, q_pad, kv_pad, block_q, block_kv)
    if kv_pad > kv_len:  # the last k-block holds padding: never FULL, so the kernel masks it
        tiles = tiles.at[:, :, -1].set(jnp.minimum(tiles[:, :, -1], PARTIAL))
    causal = ops.padded.causal
    needs_k_pos = causal or ops.q_lo is not None or ops.sinks is not None
    kernel_mask = KernelMask(q_hi=ops.q_pos if causal else None, q_lo=ops.q_lo, q_seg=ops.q_seg,
                             k_pos=ops.k_pos if needs_k_pos else None, k_seg=ops.k_seg, sinks=ops.sinks)
    return kernel_mask, tiles


def _terms(km: KernelMask) -> KernelMask:
    """Which terms are configured (static bools), for the kernel bodies."""
    return KernelMask(*(x is not None for x in km))


def _allowed(q_hi, q_lo, q_seg, k_pos, k_seg, sinks, valid):
    """The mask of one tile (either orientation); arguments already broadcast to the tile."""
    ok = valid
    if q_hi is not None:
        ok = k_pos <= q_hi if ok is None else ok & (k_pos <= q_hi)
    body = None
    if q_lo is not None:
        body = k_pos >= q_lo
    if q_seg is not None:
        same = k_seg == q_seg
        body = same if body is None else body & same
    if body is not None:
        if sinks is not None:
            body = body | (k_pos < sinks)
        ok = body if ok is None else ok & body
    return ok


# ----------------------------------------------------------------------------- work lists


def build_schedule(tiles: jax.Array):
    """Compact tiles [R, C] (rows: (batch, q-block) or (batch, k-block)) into a work list.

    Returns (rows [R*C] int32, infos [R*C] int32, num_steps int32): entry t visits row
    rows[t] and block infos[t] >> 4 along the other axis; infos carries the tile kind and
    FIRST / LAST flags (first / last entry of its row). Entries past num_steps are unused.
    Rows with no visible tile get one EMPTY entry (block 0) so their outputs are written.
    """
    num_rows, num_cols = tiles.shape
    visible = tiles != EMPTY
    keep = visible | ((jnp.arange(num_cols) == 0) & ~visible.any(1, keepdims=True))
    rank = jnp.cumsum(keep, axis=1, dtype=jnp.int32)  # 1-based position within the row
    info = ((jnp.arange(num_cols, dtype=jnp.int32) << _SHIFT) | tiles
            | jnp.where(rank == 1, _FIRST, 0) | jnp.where(rank == rank[:, -1:], _LAST, 0))
    keep = keep.reshape(-1)
    slot = jnp.where(keep, jnp.cumsum(keep, dtype=jnp.int32) - 1, num_rows * num_cols)  # dropped if not kept
    row_ids = jnp.broadcast_to(jnp.arange(num_rows, dtype=jnp.int32)[:, None], tiles.shape).reshape(-1)
    rows = jnp.zeros(num_rows * num_cols, jnp.int32).at[slot].set(row_ids, mode="drop")
    infos = jnp.zeros(num_rows * num_cols, jnp.int32).at[slot].set(info.reshape(-1), mode="drop")
    return rows, infos, keep.sum(dtype=jnp.int32)


def _check_table_size(entries: int):
    if 2 * 4 * entries > MAX_TABLE_BYTES:
        raise ValueError(f"flash_attention: the tile work list ({entries} entries) would not fit in TPU scalar "
                         f"memory; use larger blocks (block_sizes=BlockSizes(block_q=1024, block_kv=1024)) or fewer "
                         f"rows per device (shard the batch or the sequence).")


# ----------------------------------------------------------------------------- kernels


def _lanes(x, n):
    """(rows, 128) lane-replicated -> (rows, n)."""
    reps = -(-n // NUM_LANES)
    x = x if reps == 1 else jnp.tile(x, (1, reps))
    return x if x.shape[1] == n else x[:, :n]


def _kind(info):
    return info & 3


def _fwd_kernel(rows_ref, infos_ref, *refs, km, scale, block_q, block_kv, kv_len, num_mask_refs):
    sinks_ref, refs = (refs[0], refs[1:]) if km.sinks else (None, refs)
    q_ref, k_ref, v_ref = refs[:3]
    mask_refs = refs[3:3 + num_mask_refs]
    o_ref, lse_ref, m_scratch, l_scratch, acc_scratch = refs[3 + num_mask_refs:]
    info = infos_ref[pl.program_id(1)]
    head_dim = acc_scratch.shape[-1]

    @pl.when((info & _FIRST) != 0)
    def _init():
        m_scratch[...] = jnp.full_like(m_scratch, -jnp.inf)
        l_scratch[...] = jnp.zeros_like(l_scratch)
        acc_scratch[...] = jnp.zeros_like(acc_scratch)

    def step(masked):
        s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            s = jnp.where(_fwd_tile_mask(km, mask_refs, sinks_ref, info >> _SHIFT, block_q, block_kv, kv_len),
                          s, -jnp.inf)
        m_prev, l_prev = m_scratch[...], l_scratch[...]  # (bq, 128), lanes equal
        m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        # A row with nothing visible yet keeps m = -inf; exponentiate against 0 to avoid inf - inf.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - _lanes(m_safe, block_kv))
        alpha = jnp.exp(m_prev - m_safe)
        l_scratch[...] = alpha * l_prev + p.sum(axis=-1, keepdims=True)
        m_scratch[...] = m_next
        pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], _NN, preferred_element_type=jnp.float32)
        acc_scratch[...] = _lanes(alpha, head_dim) * acc_scratch[...] + pv

    pl.when(_kind(info) == FULL)(lambda: step(masked=False))
    pl.when(_kind(info) == PARTIAL)(lambda: step(masked=True))

    @pl.when((info & _LAST) != 0)
    def _finish():
        l, m = l_scratch[...], m_scratch[...]
        empty = l == 0.0  # no visible key: output 0, lse -inf
        o_ref[...] = (acc_scratch[...] * _lanes(jnp.where(empty, 0.0, 1.0 / l), head_dim)).astype(o_ref.dtype)
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))  # (bq, 128)
        lse_ref[...] = lse.T[:NUM_SUBLANES]  # (8, bq): lse along lanes, as the backward reads it


def _fwd_tile_mask(km, mask_refs, sinks_ref, kv_block, block_q, block_kv, kv_len):
    """Mask of a (bq, bk) tile: q-side refs are (bq, 128) lane-replicated, k-side (8, bk)."""
    refs = iter(mask_refs)
    q_hi = _lanes(next(refs)[...], block_kv) if km.q_hi else None
    q_lo = _lanes(next(refs)[...], block_kv) if km.q_lo else None
    q_seg = _lanes(next(refs)[...], block_kv) if km.q_seg else None
    shape = (block_q, block_kv)
    k_pos = jnp.broadcast_to(next(refs)[:1, :], shape) if km.k_pos else None
    k_seg = jnp.broadcast_to(next(refs)[:1, :], shape) if km.k_seg else None
    valid = None
    if kv_len % block_kv:
        valid = kv_block * block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 1) < kv_len
    sinks = sinks_ref[0] if sinks_ref is not None else None
    return _allowed(q_hi, q_lo, q_seg, k_pos, k_seg, sinks, valid)


def _dkv_tile_mask(km, mask_refs, sinks_ref, kv_block, block_q, block_kv, kv_len):
    """Transposed mask of a (bk, bq) tile: q-side refs are (8, bq), k-side (bk, 128)."""
    refs = iter(mask_refs)
    shape = (block_kv, block_q)
    q_hi = jnp.broadcast_to(next(refs)[:1, :], shape) if km.q_hi else None
    q_lo = jnp.broadcast_to(next(refs)[:1, :], shape) if km.q_lo else None
    q_seg = jnp.broadcast_to(next(refs)[:1, :], shape) if km.q_seg else None
    k_pos = _lanes(next(refs)[...], block_q) if km.k_pos else None
    k_seg = _lanes(next(refs)[...], block_q) if km.k_seg else None
    valid = None
    if kv_len % block_kv:
        valid = kv_block * block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 0) < kv_len
    sinks = sinks_ref[0] if sinks_ref is not None else None
    return _allowed(q_hi, q_lo, q_seg, k_pos, k_seg, sinks, valid)


def _dq_kernel(rows_ref, infos_ref, *refs, km, scale, block_q, block_kv, kv_len, num_mask_refs):
    sinks_ref, refs = (refs[0], refs[1:]) if km.sinks else (None, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    mask_refs = refs[6:6 + num_mask_refs]
    dq_ref, dq_scratch = refs[6 + num_mask_refs:]
    info = infos_ref[pl.program_id(1)]

    @pl.when((info & _FIRST) != 0)
    def _init():
        dq_scratch[...] = jnp.zeros_like(dq_scratch)

    def step(masked):
        k = k_ref[...]
        s = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            s = jnp.where(_fwd_tile_mask(km, mask_refs, sinks_ref, info >> _SHIFT, block_q, block_kv, kv_len),
                          s, -jnp.inf)
        lse = jnp.expand_dims(lse_ref[0], -1)  # (bq, 1); +inf for rows with nothing visible
        p = jnp.exp(s - lse)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.expand_dims(delta_ref[0], -1))
        dq_scratch[...] += jax.lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

    pl.when(_kind(info) == FULL)(lambda: step(masked=False))
    pl.when(_kind(info) == PARTIAL)(lambda: step(masked=True))

    @pl.when((info & _LAST) != 0)
    def _finish():
        dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(rows_ref, infos_ref, *refs, km, scale, block_q, block_kv, kv_len, num_mask_refs,
                num_kv_blocks):
    sinks_ref, refs = (refs[0], refs[1:]) if km.sinks else (None, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    mask_refs = refs[6:6 + num_mask_refs]
    dk_ref, dv_ref, dk_scratch, dv_scratch = refs[6 + num_mask_refs:]
    t, g = pl.program_id(1), pl.program_id(2)  # g: q head within the K/V group, innermost
    info = infos_ref[t]

    @pl.when(((info & _FIRST) != 0) & (g == 0))
    def _init():
        dk_scratch[...] = jnp.zeros_like(dk_scratch)
        dv_scratch[...] = jnp.zeros_like(dv_scratch)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        # Transposed orientation (keys along sublanes), so per-query lse / delta are rows.
        s = jax.lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32) * scale  # (bk, bq)
        if masked:
            kv_block = rows_ref[t] % num_kv_blocks
            s = jnp.where(_dkv_tile_mask(km, mask_refs, sinks_ref, kv_block, block_q, block_kv, kv_len),
                          s, -jnp.inf)
        p = jnp.exp(s - lse_ref[:1, :])  # lse +inf for rows with nothing visible: p = 0
        dv_scratch[...] += jax.lax.dot_general(p.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[:1, :])
        dk_scratch[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)

    pl.when(_kind(info) == FULL)(lambda: step(masked=False))
    pl.when(_kind(info) == PARTIAL)(lambda: step(masked=True))

    @pl.when(((info & _LAST) != 0) & (g == pl.num_programs(2) - 1))
    def _finish():
        dk_ref[...] = (dk_scratch[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


def _mask_operands(km: KernelMask, block_q, block_kv, coords, transposed):
    """The mask arrays (lane- or sublane-broadcast) and their BlockSpecs, in KernelMask order.

    Forward / dq: q-side [B, Tp, 128] in (bq, 128) blocks, k-side [B, 8, Sp] in (8, bk).
    dk/dv (transposed): q-side [B, 8, Tp] in (8, bq), k-side [B, Sp, 128] in (bk, 128).
    """
    def as_columns(x):
        return jnp.broadcast_to(x[:, :, None], (*x.shape, NUM_LANES))

    def as_rows(x):
        return jnp.broadcast_to(x[:, None, :], (x.shape[0], NUM_SUBLANES, x.shape[1]))

    q_col = pl.BlockSpec((None, block_q, NUM_LANES), lambda *a: (coords(*a)[0], coords(*a)[2], 0))
    q_row = pl.BlockSpec((None, NUM_SUBLANES, block_q), lambda *a: (coords(*a)[0], 0, coords(*a)[2]))
    k_col = pl.BlockSpec((None, block_kv, NUM_LANES), lambda *a: (coords(*a)[0], coords(*a)[4], 0))
    k_row = pl.BlockSpec((None, NUM_SUBLANES, block_kv), lambda *a: (coords(*a)[0], 0, coords(*a)[4]))
    arrays, specs = [], []
    for x in (km.q_hi, km.q_lo, km.q_seg):
        if x is not None:
            arrays.append(as_rows(x) if transposed else as_columns(x))
            specs.append(q_row if transposed else q_col)
    for x in (km.k_pos, km.k_seg):
        if x is not None:
            arrays.append(as_columns(x) if transposed else as_rows(x))
            specs.append(k_col if transposed else k_row)
    return arrays, specs


def _to_heads_major(x, block):
    """[B, L, H, D] -> [B, H, Lp, D], L zero-padded up to a multiple of block."""
    x = jnp.swapaxes(x, 1, 2)
    pad = (-x.shape[2]) % block
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x


def _row_stat(x, block, fill):
    """[B, H, T] float32 -> [B, H, 8, Tp] (sublane-broadcast, padded with fill)."""
    pad = (-x.shape[-1]) % block
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)), constant_values=fill) if pad else x
    return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], NUM_SUBLANES, x.shape[-1]))


def _prefetch(rows, infos, km):
    return (rows, infos) + ((km.sinks,) if km.sinks is not None else ())


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "interpret"))
def _forward(q, k, v, km, tiles, *, scale, block_q, block_kv, interpret):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    qh, kh, vh = _to_heads_major(q, block_q), _to_heads_major(k, block_kv), _to_heads_major(v, block_kv)
    nq, nk = qh.shape[2] // block_q, kh.shape[2] // block_kv
    rows, infos, num_steps = build_schedule(tiles.reshape(batch * nq, nk))

    def coords(h, t, rows, infos, *_):  # -> (batch, q head, q block, kv head, kv block)
        r = rows[t]
        return r // nq, h, r % nq, h // group, infos[t] >> _SHIFT

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda *a: (coords(*a)[0], coords(*a)[1], coords(*a)[2], 0))
    kv_spec = pl.BlockSpec((None, None, block_kv, head_dim), lambda *a: (coords(*a)[0], coords(*a)[3], coords(*a)[4], 0))
    lse_spec = pl.BlockSpec((None, None, NUM_SUBLANES, block_q), lambda *a: (coords(*a)[0], coords(*a)[1], 0, coords(*a)[2]))
    mask_arrays, mask_specs = _mask_operands(km, block_q, block_kv, coords, transposed=False)
    prefetch = _prefetch(rows, infos, km)
    kernel = functools.partial(_fwd_kernel, km=_terms(km), scale=scale, block_q=block_q, block_kv=block_kv,
                               kv_len=kv_len, num_mask_refs=len(mask_arrays))
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(num_heads, num_steps),
            in_specs=[q_spec, kv_spec, kv_spec, *mask_specs],
            out_specs=[q_spec, lse_spec],
            scratch_shapes=[pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(qh.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, NUM_SUBLANES, qh.shape[2]), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="ctxjax_flash_fwd",
    )(*prefetch, qh, kh, vh, *mask_arrays)
    return jnp.swapaxes(out[:, :, :q_len], 1, 2), lse[:, :, 0, :q_len]


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_kv", "interpret"))
def _backward(q, k, v, km, tiles, out, lse, dout, dlse, *, scale, block_q, block_kv, interpret):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    # D = rowsum(dout * out) from the (possibly merged) output; a cotangent on lse enters as
    # d lse / d s = p, i.e. it shifts D.
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    # Rows with nothing visible (lse = -inf) use +inf, so every probability is exp(-inf) = 0.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse.astype(jnp.float32))
    lse_rows, delta_rows = _row_stat(lse, block_q, jnp.inf), _row_stat(delta, block_q, 0.0)
    qh, doh = _to_heads_major(q, block_q), _to_heads_major(dout.astype(q.dtype), block_q)
    kh, vh = _to_heads_major(k, block_kv), _to_heads_major(v, block_kv)
    nq, nk = qh.shape[2] // block_q, kh.shape[2] // block_kv
    common = dict(km=_terms(km), scale=scale, block_q=block_q, block_kv=block_kv, kv_len=kv_len)

    # dq: walk each q-block's visible k-blocks, as in the forward.
    rows, infos, num_steps = build_schedule(tiles.reshape(batch * nq, nk))

    def coords(h, t, rows, infos, *_):
        r = rows[t]
        return r // nq, h, r % nq, h // group, infos[t] >> _SHIFT

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda *a: (coords(*a)[0], coords(*a)[1], coords(*a)[2], 0))
    kv_spec = pl.BlockSpec((None, None, block_kv, head_dim), lambda *a: (coords(*a)[0], coords(*a)[3], coords(*a)[4], 0))
    row_spec = pl.BlockSpec((None, None, NUM_SUBLANES, block_q), lambda *a: (coords(*a)[0], coords(*a)[1], 0, coords(*a)[2]))
    mask_arrays, mask_specs = _mask_operands(km, block_q, block_kv, coords, transposed=False)
    prefetch = _prefetch(rows, infos, km)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, num_mask_refs=len(mask_arrays), **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(num_heads, num_steps),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *mask_specs],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="ctxjax_flash_dq",
    )(*prefetch, qh, kh, vh, doh, lse_rows, delta_rows, *mask_arrays)

    # dk, dv: walk each k-block's visible q-blocks; the q heads of a K/V group are the
    # innermost grid axis, so dk/dv accumulate over the group without leaving VMEM.
    rows_t, infos_t, num_steps_t = build_schedule(jnp.swapaxes(tiles, 1, 2).reshape(batch * nk, nq))

    def coords_t(hk, t, g, rows, infos, *_):
        r = rows[t]
        return r // nk, hk * group + g, infos[t] >> _SHIFT, hk, r % nk

    q_spec_t = pl.BlockSpec((None, None, block_q, head_dim), lambda *a: (coords_t(*a)[0], coords_t(*a)[1], coords_t(*a)[2], 0))
    kv_spec_t = pl.BlockSpec((None, None, block_kv, head_dim), lambda *a: (coords_t(*a)[0], coords_t(*a)[3], coords_t(*a)[4], 0))
    row_spec_t = pl.BlockSpec((None, None, NUM_SUBLANES, block_q), lambda *a: (coords_t(*a)[0], coords_t(*a)[1], 0, coords_t(*a)[2]))
    mask_arrays_t, mask_specs_t = _mask_operands(km, block_q, block_kv, coords_t, transposed=True)
    prefetch_t = _prefetch(rows_t, infos_t, km)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, num_mask_refs=len(mask_arrays_t), num_kv_blocks=nk, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch_t),
            grid=(num_kv_heads, num_steps_t, group),
            in_specs=[q_spec_t, kv_spec_t, kv_spec_t, q_spec_t, row_spec_t, row_spec_t, *mask_specs_t],
            out_specs=[kv_spec_t, kv_spec_t],
            scratch_shapes=[pltpu.VMEM((block_kv, head_dim), jnp.float32),
                            pltpu.VMEM((block_kv, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="ctxjax_flash_dkv",
    )(*prefetch_t, qh, kh, vh, doh, lse_rows, delta_rows, *mask_arrays_t)

    def back(x, length):
        return jnp.swapaxes(x[:, :, :length], 1, 2)

    return back(dq, q_len), back(dk, kv_len), back(dv, kv_len)


# ----------------------------------------------------------------------------- public API


def _setup(q, k, v, mask, scale, block_sizes, interpret):
    """Validate, pick blocks, build the kernel mask and tile classes. -> (km, tiles, static kwargs)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention: expected q [B,T,Hq,D] and k/v [B,S,Hkv,D], got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}.")
    batch, q_len, num_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} must both be [B={batch}, S, Hkv, D={head_dim}].")
    if num_heads % k.shape[2]:
        raise ValueError(f"flash_attention: query heads ({num_heads}) must be a multiple of key/value heads "
                         f"({k.shape[2]}).")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.bfloat16, jnp.float32):
            raise ValueError(f"flash_attention: {name} has dtype {x.dtype}; cast to bfloat16 or float32.")
    kv_len = k.shape[1]
    block_q, block_kv = resolve_block_sizes(block_sizes, q_len, kv_len)
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    _check_table_size(batch * nq * nk)
    km, tiles = prepare_mask(mask if mask is not None else MaskSpec(), batch, q_len, kv_len, block_q, block_kv)
    static = dict(scale=float(head_dim ** -0.5 if scale is None else scale), block_q=block_q, block_kv=block_kv,
                  interpret=_default_interpret(interpret))
    return km, tiles, static


def flash_attention_fwd(q, k, v, mask: MaskSpec | None = None, *, scale: float | None = None,
                        block_sizes: BlockSizes | None = None, interpret=None):
    """Forward only: -> (out [B,T,Hq,D] in q.dtype, lse [B,Hq,T] float32). Not differentiable;
    pair with `flash_attention_bwd` (ring attention calls both per K/V shard)."""
    km, tiles, static = _setup(q, k, v, mask, scale, block_sizes, interpret)
    return _forward(q, k, v, km, tiles, **static)


def flash_attention_bwd(q, k, v, mask: MaskSpec | None, out, lse, dout, *, scale: float | None = None,
                        block_sizes: BlockSizes | None = None, interpret=None):
    """Backward for one K/V shard: -> (dq, dk, dv). `out` and `lse` may be the merge over all
    shards (probabilities are recomputed as exp(s - lse), D = rowsum(dout * out))."""
    km, tiles, static = _setup(q, k, v, mask, scale, block_sizes, interpret)
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"flash_attention_bwd: expected out/dout {q.shape} and lse "
                         f"{(q.shape[0], q.shape[2], q.shape[1])}, got {out.shape}, {dout.shape}, {lse.shape}.")
    return _backward(q, k, v, km, tiles, out, lse, dout, None, **static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, km, tiles, static):
    return _forward(q, k, v, km, tiles, **dict(static))


def _attention_fwd(q, k, v, km, tiles, static):
    out, lse = _forward(q, k, v, km, tiles, **dict(static))
    return (out, lse), (q, k, v, km, tiles, out, lse)


def _attention_bwd(static, residuals, cotangents):
    q, k, v, km, tiles, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, km, tiles, out, lse, dout, dlse, **dict(static))
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, mask: MaskSpec | None = None, *, scale: float | None = None,
                    return_lse: bool = False, block_sizes: BlockSizes | None = None, interpret=None):
    """Masked attention on TPU with block skipping; differentiable (dq, dk, dv).

    q [B,T,Hq,D], k/v [B,S,Hkv,D] (bf16 or f32), mask a `MaskSpec` (None: causal) ->
    out [B,T,Hq,D] (q.dtype), and lse [B,Hq,T] float32 when return_lse (lse is
    differentiable too). `block_sizes`: `BlockSizes(block_q, block_kv)` or a pair, multiples
    of 128 (default: 512 / 256 / 128 from the lengths). `interpret`: None picks TPU interpret
    mode when no TPU is present; pass `pltpu.InterpretParams(...)` to configure it.
    """
    km, tiles, static = _setup(q, k, v, mask, scale, block_sizes, interpret)
    out, lse = _attention(q, k, v, km, tiles, tuple(sorted(static.items())))
    return (out, lse) if return_lse else out


def tile_schedule_stats(mask: MaskSpec, batch: int, q_len: int, kv_len: int,
                        block_sizes: BlockSizes | None = None) -> dict:
    """What the kernels will visit for this mask (for tests and reports): tile counts by kind
    and the grid steps per head of the forward / dq (by q-block) and dk/dv (by k-block) work
    lists, which include one write-only step per q- or k-block that sees nothing."""
    block_q, block_kv = resolve_block_sizes(block_sizes, q_len, kv_len)
    _, tiles = prepare_mask(mask, batch, q_len, kv_len, block_q, block_kv)
    nq, nk = tiles.shape[1], tiles.shape[2]
    return dict(
        block_q=block_q, block_kv=block_kv, tiles=batch * nq * nk,
        full=int((tiles == FULL).sum()), partial=int((tiles == PARTIAL).sum()), empty=int((tiles == EMPTY).sum()),
        fwd_steps=int(build_schedule(tiles.reshape(batch * nq, nk))[2]),
        dkv_steps=int(build_schedule(jnp.swapaxes(tiles, 1, 2).reshape(batch * nk, nq))[2]),
    )
