"""Flash attention for Hopper GPUs (sm_90), written with Pallas Mosaic GPU.

Forward and backward (custom VJP) over the mask algebra of `pallas_kernels.mask`, with
block skipping: per (batch row, query block) a compacted list of the key blocks to visit is
built inside jit from per-block min/max of token_index / segment ids
(`mask.classify_tiles`), so the work follows the allowed area and a new window, chunk or
sink count (traced scalars) never recompiles. Tiles proven FULL skip the elementwise mask.

Kernel structure (FlashAttention-3 style, one CTA = three warpgroups):
  * forward: a persistent grid (one CTA per SM) walks (batch, head, 128-query block) work
    items, dealt to the CTAs in snake order (for causal rows of 16K+ keys, one CTA per
    item instead: the hardware scheduler balances their uneven lengths better). Warpgroup
    2 issues TMA copies (Q double-buffered across items, K/V in a ring of `num_stages`
    slots); warpgroups 0 and 1 each own 64 query rows, run QK^T and PV on the tensor cores
    (wgmma) and the online softmax, ping-ponging through a shared barrier so one
    warpgroup's softmax overlaps the other's matmuls.
  * backward: two kernels, so no float32 atomics and deterministic gradients. dK/dV: one
    CTA per (batch, kv head, 128-key block), key blocks launched fastest so the CTAs
    resident together share one head's Q/dO through L2; warpgroups 0/1 own 64 key rows
    each and keep dK, dV in registers while warpgroup 2 streams (Q, dO, lse, delta) blocks
    of 64 queries for every query head of the GQA group (S^T and dP^T, so P^T and dS^T
    feed the dV and dK matmuls straight from registers). dQ: the forward's persistent
    query-stationary structure with 64-key blocks; dQ, S and dP stay in registers (three
    matmuls per tile). With `deterministic=False` the dK/dV kernel also computes dQ and
    TMA reduce-adds it in float32 (five matmuls per tile, FlashAttention-3 style) for masks
    without a window or chunk: on an H100 1.07-1.13x faster forward+backward for causal
    masks.

Measurements, versions and what did not help: docs/hopper_kernel_notes.md.

Layout contract: q [B, T, Hq, D], k/v [B, S, Hkv, D] (Hq a multiple of Hkv, K/V never
repeated in memory), lse [B, Hq, T] float32 natural log; fully masked rows give 0 and
lse = -inf. T and S are padded inside to the block sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import mask as mask_lib
from pallas_kernels.mask import EMPTY, FULL, PARTIAL, MaskSpec
from pallas_kernels.operands import mask_operands

_ROWS = 64                # rows per compute warpgroup: the M of one wgmma
_FWD_BQ = 2 * _ROWS       # forward query block: two compute warpgroups
_BWD_BQ = 64              # backward query block
_BWD_BK = 2 * _ROWS       # backward key block: two compute warpgroups
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_INT_MIN = -(2 ** 31)
_INT_MAX = 2 ** 31 - 1

_DQ_BK = 64               # dQ kernel key block (dQ, S and dP all live in registers)
_DQ_STAGES = 2            # dQ kernel K/V ring depth
_DKDV_STAGES = 2          # dK/dV kernel Q/dO ring depth

# Development hooks (tools/probe_hopper.py), read when a kernel is traced, so use a fresh
# jit after a change: `_PROFILE_DIR` turns on Mosaic GPU's in-kernel profiler for the kernel
# named by `_PROFILE_KERNEL` ("fwd", "dq", "dkdv": per-warpgroup traces of its
# `jax.named_scope` regions, the first `_PROFILE_SPACE` per warpgroup, written there); `_ABLATE`
# drops parts of a kernel for timing attribution only, the results are then WRONG: dK/dV
# "exp" (no exponentials), "steps" (no tiles: launch and epilogue cost only); forward
# "fwd_exp" (no exponentials), "fwd_rescale" (no O rescale), "fwd_pingpong" (no ping-pong).
_PROFILE_DIR: str | None = None
_PROFILE_KERNEL = "dkdv"
_PROFILE_SPACE = 128      # SMEM: 48 bytes per region (3 warpgroups)
_ABLATE: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable; part of the compile key)."""
    causal: bool
    has_lo: bool        # a window or chunk term: a per-query lower bound on the key index
    has_seg: bool
    has_sinks: bool
    q_len: int          # real (unpadded) lengths
    kv_len: int
    q_pad: int          # padded lengths the kernels see
    kv_pad: int
    scale: float
    block_kv: int
    num_stages: int
    num_ctas: int | None  # forward and dQ grid size; None = chosen by _items_grid
    deterministic: bool = True  # backward: dQ by query blocks (else reduce-added, fused)

    @property
    def kv_padded(self) -> bool:
        return self.kv_pad != self.kv_len

    @property
    def needs_mask(self) -> bool:
        return self.causal or self.has_lo or self.has_seg or self.kv_padded

    @property
    def row_names(self) -> tuple[str, ...]:   # per-query int32 vectors the masks read
        return tuple(n for n, on in (("pos", self.causal), ("lo", self.has_lo),
                                     ("seg", self.has_seg)) if on)

    @property
    def col_names(self) -> tuple[str, ...]:   # per-key int32 vectors the masks read
        pos = self.causal or self.has_lo or self.has_sinks
        return tuple(n for n, on in (("pos", pos), ("seg", self.has_seg)) if on)


# ----------------------------------------------------------------------------------------
# Mask preparation and block lists (plain jnp: runs on any backend, tested on CPU).
# ----------------------------------------------------------------------------------------

def prepare_mask(mask: MaskSpec, batch: int, q_len: int, kv_len: int, q_pad: int, kv_pad: int):
    """`operands.mask_operands` as the kernels read it: (padded MaskSpec for tile
    classification, rows, cols, sinks, flags), rows / cols dicts of int32 [B, q_pad] /
    [B, kv_pad] arrays: 'pos' (token_index), 'lo' (first key allowed), 'seg' (segment ids)."""
    ops = mask_operands(mask, batch, q_len, kv_len, q_pad, kv_pad)
    rows, cols = {"pos": ops.q_pos}, {"pos": ops.k_pos}
    if ops.q_lo is not None:
        rows["lo"] = ops.q_lo
    if ops.q_seg is not None:
        rows["seg"], cols["seg"] = ops.q_seg, ops.k_seg
    return ops.padded, rows, cols, ops.sinks, ops.flags


def block_lists(classes: jax.Array, *, kv_padded: bool = False, descending: bool = False):
    """Compact tile classes [B, R, C] (EMPTY/PARTIAL/FULL) into per-row visit lists.

    Returns (lists, counts): lists[b, r, i] = 2 * c + is_partial for the i-th non-empty
    column block c of row block r, in ascending c (descending with `descending`);
    counts[b, r] = number of such blocks. Entries past the count are never read. With
    `kv_padded`, the last column block holds padding and is never FULL (the kernel then
    masks the padded keys).
    """
    if kv_padded:
        last = classes[..., -1]
        classes = classes.at[..., -1].set(jnp.where(last == FULL, PARTIAL, last))
    if descending:
        classes = classes[..., ::-1]
    nonempty = classes != EMPTY
    order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
    is_partial = jnp.take_along_axis(classes, order, axis=-1) == PARTIAL
    if descending:
        order = classes.shape[-1] - 1 - order
    lists = order * 2 + is_partial.astype(jnp.int32)
    return lists, nonempty.sum(-1, dtype=jnp.int32)


def forward_lists(padded: MaskSpec, batch, q_pad, kv_pad, block_kv, kv_padded):
    classes = mask_lib.classify_tiles(padded, batch, q_pad, kv_pad, _FWD_BQ, block_kv)
    return block_lists(classes, kv_padded=kv_padded)


def backward_lists(padded: MaskSpec, batch, q_pad, kv_pad, kv_padded):
    classes = mask_lib.classify_tiles(padded, batch, q_pad, kv_pad, _BWD_BQ, _BWD_BK)
    classes = jnp.swapaxes(classes, 1, 2)          # [B, kv blocks, q blocks]
    if kv_padded:                                  # the last kv block holds padding
        last = classes[:, -1, :]
        classes = classes.at[:, -1, :].set(jnp.where(last == FULL, PARTIAL, last))
    # Query blocks in descending order: under a causal mask every key block's list then
    # starts at the last query block, so the CTAs running together read the same Q/dO
    # tiles and reduce into the same dQ tiles at the same time (shared through L2).
    return block_lists(classes, descending=True)


# ----------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------

def _plgpu():
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return pl, plgpu


def _tiled(plgpu, shape, dtype):
    """SMEM with the 128-byte swizzle wgmma and TMA want (tiles of 8 rows x 128 bytes)."""
    elems = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                plgpu.SwizzleTransform(128)))


def _wgmma_group(accs, ops):
    """Tensor-core work awaited as one group: `accs` are register accumulators, `ops` run in
    order, each either (i, a, b) for accs[i] += a @ b or a callable (e.g. a barrier wait)
    that returns more such ops. Returns the new accumulators."""
    pl, plgpu = _plgpu()

    def body(refs):
        for op in ops:
            for i, a, b in (op() if callable(op) else [op]):
                plgpu.wgmma(refs[i], a, b)

    return pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc in accs))


def _compiler_params(plgpu, kernel):
    if _PROFILE_DIR and kernel == _PROFILE_KERNEL:
        return plgpu.CompilerParams(approx_math=True, profile_space=_PROFILE_SPACE,
                                    profile_dir=_PROFILE_DIR, profile_bounds_check=True)
    return plgpu.CompilerParams(approx_math=True)


def _num_sms():
    return getattr(jax.devices()[0], "core_count", None) or 132


def _mask_tile(shape, *, st, row_vals, col_vals, sinks, key_ids, row_axis):
    """Elementwise mask of one tile (True = attend). `row_vals` are per-query vectors,
    `col_vals` per-key vectors (see `prepare_mask`); `row_axis` says which tile axis holds
    the queries (0 forward, 1 backward); `key_ids` are the global key indices of the tile
    (only read when keys are padded). Plain jnp, so it also runs outside kernels."""
    key_axis = 1 - row_axis
    qb = lambda x: lax.broadcast_in_dim(x, shape, [row_axis])
    kb = lambda x: lax.broadcast_in_dim(x, shape, [key_axis])
    both = lambda a, b: b if a is None else (a if b is None else a & b)
    kpos = kb(col_vals["pos"]) if "pos" in col_vals else None
    ok = kpos <= qb(row_vals["pos"]) if st.causal else None
    body = kpos >= qb(row_vals["lo"]) if st.has_lo else None
    if st.has_seg:
        body = both(body, kb(col_vals["seg"]) == qb(row_vals["seg"]))
    if st.has_sinks:
        body = (kpos < sinks) | body
    ok = both(ok, body)
    if st.kv_padded:
        ok = both(ok, key_ids < st.kv_len)
    return ok


def _key_ids(plgpu, shape, axis, start, st):
    if not st.kv_padded:
        return None
    return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA) + start


def _item_decoder(nq, hq, causal):
    """Work item index -> (batch, head, query block) for the persistent kernels. Query blocks
    vary fastest, so CTAs running together share one head's K/V in L2; under a causal mask
    the heaviest (last) query blocks come first."""
    def decode(t):
        qb, bh = lax.rem(t, nq), lax.div(t, nq)
        if causal:
            qb = nq - 1 - qb
        return lax.div(bh, hq), lax.rem(bh, hq), qb
    return decode


def _snake_deal(total, grid, cta):
    """A persistent grid's share of `total` work items: (item_index(n), number of items).
    Items are dealt out in rounds of `grid`, the order reversed every other round (a snake),
    so every CTA gets a mix of long and short items: plain round-robin aliases with periodic
    masks (with 132 SMs and 8 query blocks per 1024-token chunk, some CTAs drew only the
    longest items: ~25% idle at the end)."""
    full_rounds, rest = total // grid, total % grid

    def item_index(n):
        return n * grid + jnp.where(lax.rem(n, 2) == 1, grid - 1 - cta, cta)

    last_pos = (grid - 1 - cta) if full_rounds % 2 == 1 else cta
    return item_index, full_rounds + (last_pos < rest).astype(jnp.int32)


def _memory_warpgroup(ins, lists_ref, counts_ref, *, my_items, item_index, decode, group, bk,
                      stages, col_names, load_q, k_smem, v_smem, vec_smem, k_ready, v_ready,
                      k_free, v_free, q_free):
    """The memory warpgroup of the query-stationary kernels (forward, dQ). Per work item
    (batch, head, query block): wait until the item's query buffer (of two) is free, let
    `load_q(b, h, qb, qbuf)` issue its copies, then TMA-copy every listed key block's K (with
    its per-key mask vectors) and V into a ring of `stages` slots, each slot handed back by
    the compute warpgroups through k_free / v_free."""
    pl, plgpu = _plgpu()

    def item(n, step):
        b, h, qb = decode(item_index(n))
        qbuf = lax.rem(n, 2)
        hk = lax.div(h, group)

        with jax.named_scope("mem_q"):
            pl.when(n >= 2)(lambda: plgpu.barrier_wait(q_free.at[qbuf]))
            load_q(b, h, qb, qbuf)
        count = counts_ref[b, qb]

        def kv_step(i, entry):
            next_entry = lists_ref[b, qb, jnp.minimum(i + 1, count - 1)]  # prefetch
            slot = lax.rem(step + i, stages)
            ks = pl.ds(lax.div(entry, 2) * bk, bk)
            with jax.named_scope("wait_kfree"):
                plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(ins["k"].at[b, ks, hk], k_smem.at[slot], k_ready.at[slot])
            for c in col_names:
                plgpu.copy_gmem_to_smem(ins[f"col_{c}"].at[b, ks], vec_smem[f"col_{c}"].at[slot],
                                        k_ready.at[slot])
            with jax.named_scope("wait_vfree"):
                plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(ins["v"].at[b, ks, hk], v_smem.at[slot], v_ready.at[slot])
            return next_entry

        lax.fori_loop(0, count, kv_step, lists_ref[b, qb, 0])
        return step + count

    lax.fori_loop(0, my_items, item, jnp.int32(0))
    # Observe the final releases too, so every barrier phase is accounted for.
    for s in range(stages):
        plgpu.barrier_wait(k_free.at[s])
        plgpu.barrier_wait(v_free.at[s])
    for n in range(2):
        pl.when(my_items > n)(lambda: plgpu.barrier_wait(q_free.at[n]))


def _query_stationary_scratch(plgpu, *, d, dtype, bk, stages, row_names, col_names, q_copies,
                              **per_item):
    """SMEM and barriers of the query-stationary kernels (forward, dQ), as `_memory_warpgroup`
    uses them: two buffers of per-item tiles (Q, plus `per_item`, e.g. dO), a K/V ring of
    `stages` slots with the per-key mask vectors, and the ping-pong barrier. `q_copies` is the
    number of TMA copies per warpgroup that fill one item's buffer besides the row vectors."""
    scratch = dict(
        q_smem=_tiled(plgpu, (2, 2, _ROWS, d), dtype),
        k_smem=_tiled(plgpu, (stages, bk, d), dtype),
        v_smem=_tiled(plgpu, (stages, bk, d), dtype),
        q_ready=plgpu.Barrier(num_arrivals=2 * (q_copies + len(row_names)), num_barriers=2),
        q_free=plgpu.Barrier(num_arrivals=2, num_barriers=2),
        k_ready=plgpu.Barrier(num_arrivals=1 + len(col_names), num_barriers=stages),
        v_ready=plgpu.Barrier(num_barriers=stages),
        k_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        v_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        sched=plgpu.Barrier(num_arrivals=2),
        **per_item,
    )
    for r in row_names:
        scratch[f"row_{r}"] = plgpu.SMEM((2, 2, _ROWS), jnp.int32)
    for c in col_names:
        scratch[f"col_{c}"] = plgpu.SMEM((stages, bk), jnp.int32)
    return scratch


def _items_grid(st: _Static, total: int) -> int:
    """CTAs of the forward and dQ kernels, which walk the same (batch, head, 128-query
    block) items. Persistent (one per SM; the next item's Q is prefetched) unless the items
    are long causal rows: from 16K keys, one CTA per item measured 1.4-3.7% faster in the
    forward on an H100 (16K/32K/128K; the hardware's block scheduler balances the uneven
    causal items better than the static snake deal), while at 8K and for window and chunk
    masks it was 1-17% slower (docs/hopper_kernel_notes.md, session 6)."""
    if st.num_ctas:
        return max(1, min(total, st.num_ctas))
    long_causal = st.causal and not (st.has_lo or st.has_seg) and st.kv_pad >= 128 * st.block_kv
    return total if long_causal else max(1, min(total, _num_sms()))


def _fwd_call(q, k, v, rows, cols, sinks, lists, counts, st: _Static):
    pl, plgpu = _plgpu()
    batch, q_pad, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    bk, stages = st.block_kv, st.num_stages
    nq = q_pad // _FWD_BQ
    dtype = q.dtype
    f32 = jnp.float32
    total = batch * hq * nq
    grid = _items_grid(st, total)
    c2 = st.scale * _LOG2E
    ROW, COL = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    WGMMA = plgpu.Layout.WGMMA
    row_names, col_names = st.row_names, st.col_names
    in_names = (["q", "k", "v"] + [f"row_{n}" for n in row_names] + [f"col_{n}" for n in col_names]
                + (["sinks"] if st.has_sinks else []) + ["lists", "counts"])

    decode = _item_decoder(nq, hq, st.causal)

    def kernel(*refs, q_smem, k_smem, v_smem, lse_smem, q_ready, q_free, k_ready, v_ready,
               k_free, v_free, sched, **vec_smem):
        ins = dict(zip(in_names, refs))
        out_ref, lse_ref = refs[len(in_names):]
        lists_ref, counts_ref = ins["lists"], ins["counts"]
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        item_index, my_items = _snake_deal(total, grid, cta)

        pingpong = "fwd_pingpong" not in _ABLATE
        ex2 = (lambda x: x) if "fwd_exp" in _ABLATE else jnp.exp2

        def rendezvous():
            if pingpong:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        def _compute():
            plgpu.set_max_registers(232, action="increase")
            for s in range(stages):   # every K/V slot starts out free
                plgpu.barrier_arrive(k_free.at[s])
                plgpu.barrier_arrive(v_free.at[s])
            sinks_val = ins["sinks"][0] if st.has_sinks else None

            def release_previous_q(qbuf):
                # The previous item's O/lse stores have left its (Q-turned-O) buffer: hand it
                # back to the memory warpgroup. Done one step into the next item, so the
                # store latency stays off the critical path.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                plgpu.barrier_arrive(q_free.at[1 - qbuf])

            def item(n, step):
                b, h, qb = decode(item_index(n))
                qbuf = lax.rem(n, 2)
                with jax.named_scope("item_start"):
                    count = counts_ref[b, qb]
                    first_entry = lists_ref[b, qb, 0]
                    plgpu.barrier_wait(q_ready.at[qbuf])
                    row_vals = {r: plgpu.load(vec_smem[f"row_{r}"].at[qbuf, wg], layout=ROW)
                                for r in row_names}
                    m0 = plgpu.layout_cast(jnp.full((_ROWS,), -1e30, f32), ROW)  # finite: no inf-inf
                    l0 = plgpu.layout_cast(jnp.zeros((_ROWS,), f32), ROW)
                    acc0 = plgpu.layout_cast(jnp.zeros((_ROWS, d), f32), WGMMA)
                    pl.when(wg == 1)(rendezvous)  # offset the two warpgroups by half a step

                def kv_step(i, carry):
                    acc, m_i, l_i, entry = carry
                    next_entry = lists_ref[b, qb, jnp.minimum(i + 1, count - 1)]  # prefetch
                    slot = lax.rem(step + i, stages)
                    with jax.named_scope("wait_k"):
                        plgpu.barrier_wait(k_ready.at[slot])

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem.at[qbuf, wg], k_smem.at[slot].T)
                        rendezvous()
                        return acc_ref[...]

                    with jax.named_scope("qk"):
                        s = pl.run_scoped(qk, plgpu.ACC((_ROWS, bk), f32))
                    if st.needs_mask:
                        def masked():
                            col_vals = {c: plgpu.load(vec_smem[f"col_{c}"].at[slot], layout=COL)
                                        for c in col_names}
                            key_ids = _key_ids(plgpu, s.shape, 1, lax.div(entry, 2) * bk, st)
                            ok = _mask_tile(s.shape, st=st, row_vals=row_vals, col_vals=col_vals,
                                            sinks=sinks_val, key_ids=key_ids, row_axis=0)
                            return jnp.where(ok, s, -jnp.inf)
                        s = lax.cond(lax.rem(entry, 2) == 1, masked, lambda: s)
                    plgpu.barrier_arrive(k_free.at[slot])
                    pl.when((i == 0) & (n > 0))(lambda: release_previous_q(qbuf))

                    with jax.named_scope("softmax"):
                        m_new = jnp.maximum(m_i, s.max(axis=1) * c2)
                        alpha = ex2(m_i - m_new)
                        p = ex2(s * c2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                        if "fwd_rescale" not in _ABLATE:
                            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                        l_i = l_i * alpha + p.sum(axis=1)
                        p16 = p.astype(dtype)
                        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                    with jax.named_scope("wait_v"):
                        if pingpong:   # softmax done: let the other warpgroup's QK in
                            plgpu.barrier_arrive(sched)
                        plgpu.barrier_wait(v_ready.at[slot])
                        if pingpong:
                            plgpu.barrier_wait(sched)

                    with jax.named_scope("pv"):
                        (acc,) = _wgmma_group((acc,), [(0, p16, v_smem.at[slot])])
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l_i, next_entry

                acc, m_i, l_i, _ = lax.fori_loop(0, count, kv_step, (acc0, m0, l0, first_entry))
                pl.when((count == 0) & (n > 0))(lambda: release_previous_q(qbuf))
                with jax.named_scope("item_sync"):
                    pl.when(wg == 0)(rendezvous)
                with jax.named_scope("epilogue"):
                    finish_item(b, h, qb, qbuf, acc, m_i, l_i)
                return step + count

            def finish_item(b, h, qb, qbuf, acc, m_i, l_i):
                """Normalise O, write O and lse (TMA stores, waited one item later)."""
                empty = l_i == 0.0
                safe_l = jnp.where(empty, 1.0, l_i)
                inv_l = jnp.where(empty, 0.0, 1.0 / safe_l)
                o_smem = q_smem.at[qbuf, wg]      # this item's Q is dead: reuse it for O
                o_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
                lse_smem.at[qbuf, wg][...] = jnp.where(empty, -jnp.inf, m_i * _LN2 + jnp.log(safe_l))
                plgpu.commit_smem()
                q0 = qb * _FWD_BQ + wg * _ROWS
                plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(q0, _ROWS), h],
                                        commit_group=False)
                plgpu.copy_smem_to_gmem(lse_smem.at[qbuf, wg], lse_ref.at[b, h, pl.ds(q0, _ROWS)],
                                        commit_group=False)
                plgpu.commit_smem_to_gmem_group()

            lax.fori_loop(0, my_items, item, jnp.int32(0))
            release_previous_q(lax.rem(my_items, 2))   # the last item's buffer
            plgpu.wait_smem_to_gmem(0)

        pl.when(wg < 2)(_compute)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def load_q(b, h, qb, qbuf):
                for w in range(2):
                    rs = pl.ds(qb * _FWD_BQ + w * _ROWS, _ROWS)
                    plgpu.copy_gmem_to_smem(ins["q"].at[b, rs, h], q_smem.at[qbuf, w],
                                            q_ready.at[qbuf])
                    for r in row_names:
                        plgpu.copy_gmem_to_smem(ins[f"row_{r}"].at[b, rs],
                                                vec_smem[f"row_{r}"].at[qbuf, w], q_ready.at[qbuf])

            _memory_warpgroup(ins, lists_ref, counts_ref, my_items=my_items, item_index=item_index,
                              decode=decode, group=group, bk=bk, stages=stages, col_names=col_names,
                              load_q=load_q, k_smem=k_smem, v_smem=v_smem, vec_smem=vec_smem,
                              k_ready=k_ready, v_ready=v_ready, k_free=k_free, v_free=v_free,
                              q_free=q_free)

    scratch = _query_stationary_scratch(plgpu, d=d, dtype=dtype, bk=bk, stages=stages,
                                        row_names=row_names, col_names=col_names, q_copies=1,
                                        lse_smem=plgpu.SMEM((2, 2, _ROWS), f32))

    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((batch, hq, q_pad), f32)),
        scratch_types=scratch,
        grid=(grid,), grid_names=("cta",),
        num_threads=3, thread_name="wg",
        compiler_params=_compiler_params(plgpu, "fwd"),
    )
    args = dict(q=q, k=k, v=v, lists=lists, counts=counts, sinks=sinks,
                **{f"row_{r}": rows[r] for r in row_names}, **{f"col_{c}": cols[c] for c in col_names})
    return call(*[args[n] for n in in_names])


def _dq_call(q, k, v, do, lse2, delta, rows, cols, sinks, lists, counts, st: _Static):
    """dQ (unscaled by the softmax scale) without atomics: the forward's persistent,
    query-stationary structure, three matmuls per tile (S = Q K^T, dP = dO V^T,
    dQ += dS K). dQ stays in registers for the whole item and is written once."""
    pl, plgpu = _plgpu()
    batch, q_pad, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    bk, stages = _DQ_BK, _DQ_STAGES
    nq = q_pad // _FWD_BQ
    dtype = q.dtype
    f32 = jnp.float32
    total = batch * hq * nq
    grid = _items_grid(st, total)
    c2 = st.scale * _LOG2E
    ROW, COL = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    WGMMA = plgpu.Layout.WGMMA
    row_names, col_names = st.row_names, st.col_names
    in_names = (["q", "k", "v", "do", "lse", "delta"] + [f"row_{n}" for n in row_names]
                + [f"col_{n}" for n in col_names] + (["sinks"] if st.has_sinks else [])
                + ["lists", "counts"])

    decode = _item_decoder(nq, hq, st.causal)

    def kernel(*refs, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, q_ready, q_free,
               k_ready, v_ready, k_free, v_free, sched, **vec_smem):
        ins = dict(zip(in_names, refs))
        (dq_ref,) = refs[len(in_names):]
        lists_ref, counts_ref = ins["lists"], ins["counts"]
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        item_index, my_items = _snake_deal(total, grid, cta)

        def rendezvous():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            for s_ in range(stages):
                plgpu.barrier_arrive(k_free.at[s_])
                plgpu.barrier_arrive(v_free.at[s_])
            sinks_val = ins["sinks"][0] if st.has_sinks else None

            def release_previous_q(qbuf):   # the previous item's dQ store has left its Q buffer
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                plgpu.barrier_arrive(q_free.at[1 - qbuf])

            def item(n, step):
                b, h, qb = decode(item_index(n))
                qbuf = lax.rem(n, 2)
                count = counts_ref[b, qb]
                first_entry = lists_ref[b, qb, 0]
                plgpu.barrier_wait(q_ready.at[qbuf])
                row_vals = {r: plgpu.load(vec_smem[f"row_{r}"].at[qbuf, wg], layout=ROW)
                            for r in row_names}
                lse = plgpu.load(lse_smem.at[qbuf, wg], layout=ROW)
                delta = plgpu.load(delta_smem.at[qbuf, wg], layout=ROW)
                dq0 = plgpu.layout_cast(jnp.zeros((_ROWS, d), f32), WGMMA)
                pl.when(wg == 1)(rendezvous)  # offset the two warpgroups by half a step

                def kv_step(i, carry):
                    dq, entry = carry
                    next_entry = lists_ref[b, qb, jnp.minimum(i + 1, count - 1)]
                    slot = lax.rem(step + i, stages)
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[slot])

                    def scores(s_ref, dp_ref):
                        plgpu.wgmma(s_ref, q_smem.at[qbuf, wg], k_smem.at[slot].T)
                        plgpu.wgmma(dp_ref, do_smem.at[qbuf, wg], v_smem.at[slot].T)
                        rendezvous()
                        return s_ref[...], dp_ref[...]

                    acc = plgpu.ACC((_ROWS, bk), f32)
                    s, dp = pl.run_scoped(scores, acc, acc)
                    plgpu.barrier_arrive(v_free.at[slot])
                    if st.needs_mask:
                        def masked():
                            col_vals = {c: plgpu.load(vec_smem[f"col_{c}"].at[slot], layout=COL)
                                        for c in col_names}
                            key_ids = _key_ids(plgpu, s.shape, 1, lax.div(entry, 2) * bk, st)
                            ok = _mask_tile(s.shape, st=st, row_vals=row_vals, col_vals=col_vals,
                                            sinks=sinks_val, key_ids=key_ids, row_axis=0)
                            return jnp.where(ok, s, -jnp.inf)
                        s = lax.cond(lax.rem(entry, 2) == 1, masked, lambda: s)
                    pl.when((i == 0) & (n > 0))(lambda: release_previous_q(qbuf))
                    p = jnp.exp2(s * c2 - lax.broadcast_in_dim(lse, s.shape, [0]))
                    ds = (p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))).astype(dtype)
                    dq, ds = lax.optimization_barrier((dq, ds))
                    plgpu.barrier_arrive(sched)   # elementwise done: let the other warpgroup in
                    plgpu.barrier_wait(sched)
                    (dq,) = _wgmma_group((dq,), [(0, ds, k_smem.at[slot])])
                    plgpu.barrier_arrive(k_free.at[slot])
                    return dq, next_entry

                dq, _ = lax.fori_loop(0, count, kv_step, (dq0, first_entry))
                pl.when((count == 0) & (n > 0))(lambda: release_previous_q(qbuf))
                pl.when(wg == 0)(rendezvous)
                o_smem = q_smem.at[qbuf, wg]      # this item's Q is dead: stage dQ there
                o_smem[...] = (dq * st.scale).astype(dtype)
                plgpu.commit_smem()
                q0 = qb * _FWD_BQ + wg * _ROWS
                plgpu.copy_smem_to_gmem(o_smem, dq_ref.at[b, pl.ds(q0, _ROWS), h])
                return step + count

            lax.fori_loop(0, my_items, item, jnp.int32(0))
            release_previous_q(lax.rem(my_items, 2))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def load_q(b, h, qb, qbuf):
                ready = q_ready.at[qbuf]
                for w in range(2):
                    rs = pl.ds(qb * _FWD_BQ + w * _ROWS, _ROWS)
                    plgpu.copy_gmem_to_smem(ins["q"].at[b, rs, h], q_smem.at[qbuf, w], ready)
                    plgpu.copy_gmem_to_smem(ins["do"].at[b, rs, h], do_smem.at[qbuf, w], ready)
                    plgpu.copy_gmem_to_smem(ins["lse"].at[b, h, rs], lse_smem.at[qbuf, w], ready)
                    plgpu.copy_gmem_to_smem(ins["delta"].at[b, h, rs], delta_smem.at[qbuf, w], ready)
                    for r in row_names:
                        plgpu.copy_gmem_to_smem(ins[f"row_{r}"].at[b, rs],
                                                vec_smem[f"row_{r}"].at[qbuf, w], ready)

            _memory_warpgroup(ins, lists_ref, counts_ref, my_items=my_items, item_index=item_index,
                              decode=decode, group=group, bk=bk, stages=stages, col_names=col_names,
                              load_q=load_q, k_smem=k_smem, v_smem=v_smem, vec_smem=vec_smem,
                              k_ready=k_ready, v_ready=v_ready, k_free=k_free, v_free=v_free,
                              q_free=q_free)

    scratch = _query_stationary_scratch(
        plgpu, d=d, dtype=dtype, bk=bk, stages=stages, row_names=row_names, col_names=col_names,
        q_copies=4, do_smem=_tiled(plgpu, (2, 2, _ROWS, d), dtype),
        lse_smem=plgpu.SMEM((2, 2, _ROWS), f32), delta_smem=plgpu.SMEM((2, 2, _ROWS), f32))

    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),),
        scratch_types=scratch,
        grid=(grid,), grid_names=("cta",),
        num_threads=3, thread_name="wg",
        compiler_params=_compiler_params(plgpu, "dq"),
    )
    args = dict(q=q, k=k, v=v, do=do, lse=lse2, delta=delta, lists=lists, counts=counts, sinks=sinks,
                **{f"row_{r}": rows[r] for r in row_names}, **{f"col_{c}": cols[c] for c in col_names})
    (dq,) = call(*[args[n] for n in in_names])
    return dq


def _dkdv_call(q, k, v, do, lse2, delta, rows, cols, sinks, lists, counts, st: _Static,
               dq_ref=None):
    """dK, dV: one CTA per (batch, kv head, 128-key block); four matmuls per tile. With
    `dq_ref` (a float32 [B, T, Hq, D] ref) also dQ, unscaled: a fifth matmul per tile whose
    result is TMA reduce-added into dq_ref (fused; not bit-reproducible)."""
    pl, plgpu = _plgpu()
    batch, q_pad, hq, d = q.shape
    kv_pad, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    nk = kv_pad // _BWD_BK
    fused = dq_ref is not None
    stages = 2 if fused else _DKDV_STAGES   # fused: dS and dQ staging take the SMEM
    dtype = q.dtype
    f32 = jnp.float32
    c2 = st.scale * _LOG2E
    ROW, COL = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    WGMMA = plgpu.Layout.WGMMA
    exchange = d == 128   # fused dQ: see the comment in the step below
    chunk = 64            # fused dQ: columns each warpgroup reduce-adds per step
    # In the transposed tile (keys x queries) the kernel's per-row vectors are per key.
    q_names, k_names = st.row_names, st.col_names
    in_names = (["q", "k", "v", "do", "lse", "delta"] + [f"row_{n}" for n in q_names]
                + [f"col_{n}" for n in k_names] + (["sinks"] if st.has_sinks else [])
                + ["lists", "counts"] + (["dq"] if fused else []))

    def kernel(*refs, q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, q_free,
               lse_smem=None, delta_smem=None, stats_smem=None, ds_smem=None, dq_smem=None,
               ds_ready=None, **vec_smem):
        ins = dict(zip(in_names, refs))
        dk_ref, dv_ref = refs[len(in_names):]
        lists_ref, counts_ref = ins["lists"], ins["counts"]
        kb, hk, b = lax.axis_index("kb"), lax.axis_index("hk"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        count = counts_ref[b, kb]
        steps = 0 if "steps" in _ABLATE else group * count

        def lse_at(slot):
            return stats_smem.at[slot, 0] if fused else lse_smem.at[slot]

        def delta_at(slot):
            return stats_smem.at[slot, 1] if fused else delta_smem.at[slot]

        def q_block_of(j):
            g = lax.div(j, jnp.maximum(count, 1))
            entry = lists_ref[b, kb, lax.rem(j, jnp.maximum(count, 1))]
            return hk * group + g, lax.div(entry, 2), lax.rem(entry, 2)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(240, action="increase")
            for s in range(stages):
                plgpu.barrier_arrive(q_free.at[s])
            k0 = kb * _BWD_BK + wg * _ROWS
            ks = pl.ds(k0, _ROWS)
            plgpu.copy_gmem_to_smem(ins["k"].at[b, ks, hk], k_smem.at[wg], kv_ready.at[wg])
            plgpu.copy_gmem_to_smem(ins["v"].at[b, ks, hk], v_smem.at[wg], kv_ready.at[wg])
            key_vals = {c: plgpu.load(ins[f"col_{c}"].at[b, ks], layout=ROW, optimized=False)
                        for c in k_names}
            sinks_val = ins["sinks"][0] if st.has_sinks else None
            plgpu.barrier_wait(kv_ready.at[wg])
            zeros = plgpu.layout_cast(jnp.zeros((_ROWS, d), f32), WGMMA)

            def step_fn(j, carry):
                dk, dv = carry
                h, qb, partial = q_block_of(j)
                slot = lax.rem(j, stages)
                with jax.named_scope("wait_q"):
                    plgpu.barrier_wait(q_ready.at[slot])

                def scores(s_ref, dp_ref):   # S^T = K Q^T and dP^T = V dO^T, one wait for both
                    plgpu.wgmma(s_ref, k_smem.at[wg], q_smem.at[slot].T)
                    plgpu.wgmma(dp_ref, v_smem.at[wg], do_smem.at[slot].T)
                    return s_ref[...], dp_ref[...]

                acc = plgpu.ACC((_ROWS, _BWD_BQ), f32)
                with jax.named_scope("mma_s_dp"):
                    st_, dp_t = pl.run_scoped(scores, acc, acc)
                with jax.named_scope("softmax"):
                    if st.needs_mask:
                        def masked():
                            q_vals = {r: plgpu.load(vec_smem[f"row_{r}"].at[slot], layout=COL)
                                      for r in q_names}
                            ok = _mask_tile(st_.shape, st=st, row_vals=q_vals, col_vals=key_vals,
                                            sinks=sinks_val, key_ids=_key_ids(plgpu, st_.shape, 0, k0, st),
                                            row_axis=1)
                            return jnp.where(ok, st_, -jnp.inf)
                        st_ = lax.cond(partial == 1, masked, lambda: st_)
                    lse = plgpu.load(lse_at(slot), layout=COL)
                    x = st_ * c2 - lax.broadcast_in_dim(lse, st_.shape, [1])
                    p_t = x if "exp" in _ABLATE else jnp.exp2(x)
                    delta = plgpu.load(delta_at(slot), layout=COL)
                    ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(dtype)
                    p_t = p_t.astype(dtype)
                if fused:
                    # dS^T goes through SMEM: dQ = dS @ K needs it as a transposed wgmma
                    # operand. With D=128 the warpgroups swap halves, and each adds dS[q, all
                    # 128 keys] @ K[:, its 64 columns]; with D=64 each adds dS[q, its keys] @
                    # K[its keys, :].
                    parity = lax.rem(j, 2)
                    ds_smem.at[parity, wg][...] = ds_t
                    plgpu.commit_smem()
                    if exchange:
                        plgpu.barrier_arrive(ds_ready)
                with jax.named_scope("mma_dk_dv"):
                    # Fused: dK reads dS^T from its SMEM copy, so the registers die at the
                    # store (spills 156 -> 120 bytes per thread; 2.5-4% faster, session 6).
                    ds_op = ds_smem.at[parity, wg] if fused else ds_t
                    dv, dk = _wgmma_group((dv, dk), [(0, p_t, do_smem.at[slot]), (1, ds_op, q_smem.at[slot])])
                if not fused:
                    plgpu.barrier_arrive(q_free.at[slot])
                    return dk, dv

                def dq_ops():
                    if exchange:
                        plgpu.barrier_wait(ds_ready)
                        cols_ = pl.ds(wg * chunk, chunk)
                        return [(0, ds_smem.at[parity, w].T, k_smem.at[w, :, cols_]) for w in range(2)]
                    return [(0, ds_smem.at[parity, wg].T, k_smem.at[wg])]

                with jax.named_scope("mma_dq"):
                    dq0 = plgpu.layout_cast(jnp.zeros((_BWD_BQ, chunk), f32), WGMMA)
                    (dq,) = _wgmma_group((dq0,), [dq_ops])
                plgpu.barrier_arrive(q_free.at[slot])
                with jax.named_scope("dq_reduce"):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last reduce left dq_smem
                    dq_smem.at[wg][...] = dq
                    plgpu.commit_smem()
                    cols_ = pl.ds(wg * chunk, chunk) if exchange else pl.ds(0, d)
                    plgpu.copy_smem_to_gmem(
                        dq_smem.at[wg], ins["dq"].at[b, pl.ds(qb * _BWD_BQ, _BWD_BQ), h, cols_],
                        reduction_op="add")
                return dk, dv

            dk, dv = lax.fori_loop(0, steps, step_fn, (zeros, zeros))
            if fused:   # the other warpgroup may still read our K rows for its last dQ
                plgpu.barrier_arrive(ds_ready)
                plgpu.barrier_wait(ds_ready)
            k_smem.at[wg][...] = (dk * st.scale).astype(dtype)   # K/V rows are dead: stage there
            v_smem.at[wg][...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, ks, hk], commit_group=False)
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, ks, hk], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(24, action="decrease")

            @pl.loop(0, steps)
            def _(j):
                h, qb, _ = q_block_of(j)
                slot = lax.rem(j, stages)
                qs = pl.ds(qb * _BWD_BQ, _BWD_BQ)
                with jax.named_scope("wait_free"):
                    plgpu.barrier_wait(q_free.at[slot])
                plgpu.copy_gmem_to_smem(ins["q"].at[b, qs, h], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(ins["do"].at[b, qs, h], do_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(ins["lse"].at[b, h, qs], lse_at(slot), q_ready.at[slot])
                plgpu.copy_gmem_to_smem(ins["delta"].at[b, h, qs], delta_at(slot), q_ready.at[slot])
                for r in q_names:
                    plgpu.copy_gmem_to_smem(ins[f"row_{r}"].at[b, qs], vec_smem[f"row_{r}"].at[slot],
                                            q_ready.at[slot])

            for s in range(stages):   # observe the final releases
                plgpu.barrier_wait(q_free.at[s])

    scratch = dict(
        q_smem=_tiled(plgpu, (stages, _BWD_BQ, d), dtype),
        do_smem=_tiled(plgpu, (stages, _BWD_BQ, d), dtype),
        k_smem=_tiled(plgpu, (2, _ROWS, d), dtype),
        v_smem=_tiled(plgpu, (2, _ROWS, d), dtype),
        kv_ready=plgpu.Barrier(num_arrivals=2, num_barriers=2),
        q_ready=plgpu.Barrier(num_arrivals=4 + len(q_names), num_barriers=stages),
        q_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    )
    if fused:
        # lse and delta share one buffer here: 1 KB more SMEM than the fused kernel has made
        # it 6-7% slower on an H100 (1.8x before session 6's grid order; likely the L1 left
        # for its register spills; docs/hopper_kernel_notes.md, runs 27-28 and 46).
        scratch.update(stats_smem=plgpu.SMEM((stages, 2, _BWD_BQ), f32),
                       ds_smem=_tiled(plgpu, (2, 2, _ROWS, _BWD_BQ), dtype),
                       dq_smem=_tiled(plgpu, (2, _BWD_BQ, chunk), f32),
                       ds_ready=plgpu.Barrier(num_arrivals=2))
    else:
        scratch.update(lse_smem=plgpu.SMEM((stages, _BWD_BQ), f32),
                       delta_smem=plgpu.SMEM((stages, _BWD_BQ), f32))
    for r in q_names:
        scratch[f"row_{r}"] = plgpu.SMEM((stages, _BWD_BQ), jnp.int32)

    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=scratch,
        # Mosaic GPU launches the LAST grid axis fastest: with the key blocks last, the CTAs
        # resident together are one head's, sharing its Q/dO tiles and dQ rows through L2
        # (batch last: one CTA per head once B*H nears the SM count, HBM-bound; session 6).
        grid=(batch, hkv, nk), grid_names=("b", "hk", "kb"),
        num_threads=3, thread_name="wg",
        compiler_params=_compiler_params(plgpu, "dkdv"),
    )
    args = dict(q=q, k=k, v=v, do=do, lse=lse2, delta=delta, lists=lists, counts=counts,
                sinks=sinks, dq=dq_ref, **{f"row_{r}": rows[r] for r in q_names},
                **{f"col_{c}": cols[c] for c in k_names})
    return call(*[args[n] for n in in_names])


# ----------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------

def _check_inputs(q, k, v, block_kv, num_stages):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention: q, k, v must be [B, T, H, D]; got shapes {q.shape}, "
                         f"{k.shape}, {v.shape}.")
    b, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: k and v must both be [B={b}, S, Hkv, D={d}]; got "
                         f"{k.shape} and {v.shape}.")
    if hq % k.shape[2]:
        raise ValueError(f"flash_attention: query heads ({hq}) must be a multiple of key/value "
                         f"heads ({k.shape[2]}).")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"flash_attention: q, k, v must all be bfloat16 or all float16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}. Cast them first.")
    if d not in (64, 128):
        raise ValueError(f"flash_attention: head_dim {d} is not supported; use 64 or 128.")
    if block_kv not in (64, 128):
        raise ValueError(f"flash_attention: block_kv={block_kv}; use 64 or 128.")
    if not 2 <= num_stages <= 4:
        raise ValueError(f"flash_attention: num_stages={num_stages}; use 2, 3 or 4.")
    smem = (4 * _ROWS + 2 * num_stages * block_kv) * d * 2
    if smem > 200 * 1024:
        raise ValueError(f"flash_attention: block_kv={block_kv} x num_stages={num_stages} needs "
                         f"{smem // 1024} KiB of shared memory for head_dim {d}; lower num_stages.")


def _setup(q, k, mask, scale, block_kv, num_stages, num_ctas, deterministic=True):
    """Static config and the padded mask parts (padded MaskSpec, rows, cols, sinks)."""
    mask = MaskSpec() if mask is None else mask
    batch, q_len, _, d = q.shape
    kv_len = k.shape[1]
    q_pad = -(-q_len // _FWD_BQ) * _FWD_BQ
    mult = max(block_kv, _BWD_BK)
    kv_pad = -(-kv_len // mult) * mult
    padded, rows, cols, sinks, flags = prepare_mask(mask, batch, q_len, kv_len, q_pad, kv_pad)
    st = _Static(q_len=q_len, kv_len=kv_len, q_pad=q_pad, kv_pad=kv_pad,
                 scale=float(d ** -0.5 if scale is None else scale),
                 block_kv=block_kv, num_stages=num_stages, num_ctas=num_ctas,
                 deterministic=bool(deterministic), **flags)
    return st, (padded, rows, cols, sinks)


def _pad_seq(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))) if length > x.shape[1] else x


def _forward(q, k, v, st, mask_parts):
    padded, rows, cols, sinks = mask_parts
    q_pad, kv_pad = st.q_pad, st.kv_pad
    lists, counts = forward_lists(padded, q.shape[0], q_pad, kv_pad, st.block_kv, st.kv_padded)
    out, lse = _fwd_call(_pad_seq(q, q_pad), _pad_seq(k, kv_pad), _pad_seq(v, kv_pad),
                         rows, cols, sinks, lists, counts, st)
    return out[:, :st.q_len], lse[:, :, :st.q_len]


def _fused_backward(st: _Static) -> bool:
    """The one-kernel backward, if non-deterministic results are allowed and the mask has no
    window or chunk term. On an H100 (docs/hopper_kernel_notes.md, session 6), forward+
    backward, fused against two-kernel: causal 1.07-1.13x (8K-128K), 8 documents per row
    0.94-1.04x, non-causal backward 1.08x; window and chunk 1024 0.94-0.96x in three of four
    cells (1.02x in the fourth), so those keep the two-kernel backward."""
    return not st.deterministic and not st.has_lo


def _backward(q, k, v, out, lse, dout, st, mask_parts, dlse=None):
    padded, rows, cols, sinks = mask_parts
    q_pad, kv_pad = st.q_pad, st.kv_pad
    batch, q_len, hq, d = q.shape
    # dS = P * (dP - delta) with delta = rowsum(dO * O); a cotangent of lse adds P * dlse
    # (d lse / d s = P), i.e. shifts delta by -dlse.
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, q_pad - q_len)))
    # log2-domain lse; rows with no allowed key (lse = -inf) and padded rows get +inf, so
    # their P is 0.
    lse2 = jnp.where(jnp.isfinite(lse), lse * _LOG2E, jnp.inf).astype(jnp.float32)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, q_pad - q_len)), constant_values=jnp.inf)
    qp, kp, vp = _pad_seq(q, q_pad), _pad_seq(k, kv_pad), _pad_seq(v, kv_pad)
    dop = _pad_seq(dout.astype(q.dtype), q_pad)
    lists, counts = backward_lists(padded, batch, q_pad, kv_pad, st.kv_padded)
    if not _fused_backward(st):
        # dK/dV by key blocks and dQ by query blocks, in two kernels: no float32 atomics, and
        # the gradients are bit-reproducible. Seven matmuls per tile instead of five.
        dk, dv = _dkdv_call(qp, kp, vp, dop, lse2, delta, rows, cols, sinks, lists, counts, st)
        dq_lists, dq_counts = forward_lists(padded, batch, q_pad, kv_pad, _DQ_BK, st.kv_padded)
        dq = _dq_call(qp, kp, vp, dop, lse2, delta, rows, cols, sinks, dq_lists, dq_counts, st)
    else:   # one kernel, five matmuls per tile, dQ reduce-added in float32
        dq_acc = jax.new_ref(jnp.zeros((batch, q_pad, hq, d), jnp.float32))
        dk, dv = _dkdv_call(qp, kp, vp, dop, lse2, delta, rows, cols, sinks, lists, counts, st,
                            dq_ref=dq_acc)
        dq = (dq_acc[...] * st.scale).astype(q.dtype)
    return dq[:, :q_len], dk[:, :st.kv_len], dv[:, :st.kv_len]


def flash_attention_fwd(q, k, v, mask: MaskSpec | None = None, *, scale: float | None = None,
                        block_kv: int = 128, num_stages: int = 2, num_ctas: int | None = None):
    """Forward only: (out [B,T,Hq,D], lse [B,Hq,T] float32 natural log). For ring attention."""
    _check_inputs(q, k, v, block_kv, num_stages)
    st, mask_parts = _setup(q, k, mask, scale, block_kv, num_stages, num_ctas)
    return _forward(q, k, v, st, mask_parts)


def flash_attention_bwd(q, k, v, mask: MaskSpec | None, out, lse, dout, *, scale: float | None = None,
                        dlse=None, block_kv: int = 128, num_stages: int = 2,
                        deterministic: bool = True):
    """Backward only: (dq, dk, dv) from out, lse (possibly merged over several K/V shards,
    as in ring attention), dout and optionally the cotangent of lse. Uses
    delta = rowsum(dout * out), so it is exact for merged out/lse. `deterministic` as in
    `flash_attention`."""
    _check_inputs(q, k, v, block_kv, num_stages)
    st, mask_parts = _setup(q, k, mask, scale, block_kv, num_stages, None, deterministic)
    return _backward(q, k, v, out, lse, dout, st, mask_parts, dlse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask_parts, st):
    return _forward(q, k, v, st, mask_parts)


def _attention_fwd(q, k, v, mask_parts, st):
    out, lse = _forward(q, k, v, st, mask_parts)
    return (out, lse), (q, k, v, out, lse, mask_parts)


def _attention_bwd(st, res, cotangents):
    q, k, v, out, lse, mask_parts = res
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, out, lse, dout, st, mask_parts, dlse)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, mask: MaskSpec | None = None, *, scale: float | None = None,
                    return_lse: bool = False, block_kv: int = 128, num_stages: int = 2,
                    num_ctas: int | None = None, deterministic: bool = True):
    """Flash attention on Hopper: q [B,T,Hq,D], k/v [B,S,Hkv,D] (bf16 or fp16, D in {64, 128}).

    `mask` is a `pallas_kernels.mask.MaskSpec` (None = causal). Returns out [B,T,Hq,D], and
    lse [B,Hq,T] float32 when `return_lse`. Differentiable in q, k, v (custom VJP, also
    through lse). `block_kv` / `num_stages` set the
    forward key block and the depth of its K/V pipeline; `num_ctas` sets the grid of the forward
    and dQ kernels (default: one CTA per SM, or one per 128-query block for causal rows of
    16K+ keys).

    `deterministic` (default True) computes dQ in its own kernel: bit-reproducible
    gradients, seven matmuls per tile. False fuses dQ into the dK/dV kernel (five matmuls,
    dQ reduce-added in float32, so the result varies in the last bits from run to run) for
    masks without a window or chunk term. On an H100 that made forward+backward 1.07-1.13x
    faster for causal masks at 8K-128K, 0.94-1.04x for 8 documents per row
    (docs/hopper_kernel_notes.md, session 6). With a window or chunk the two-kernel backward
    runs either way: it measured faster there.
    """
    _check_inputs(q, k, v, block_kv, num_stages)
    st, mask_parts = _setup(q, k, mask, scale, block_kv, num_stages, num_ctas, deterministic)
    out, lse = _attention(q, k, v, mask_parts, st)
    return (out, lse) if return_lse else out
