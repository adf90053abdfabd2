"""What the Hopper kernels share: sizes, `Tuning`, the static spec, block lists, and the
building blocks of the warp-specialised kernels (SMEM layouts, wgmma groups, the mask of one
tile, the work-item deal of the persistent kernels and their memory warpgroup).

Block lists and `mask_tile` are plain jnp (they run on any backend and are tested on CPU);
the rest only runs inside a Mosaic GPU kernel body.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import mask as mask_lib
from pallas_kernels.mask import EMPTY, FULL, PARTIAL, MaskSpec

ROWS = 64                 # rows per compute warpgroup: the M of one wgmma
FWD_BQ = 2 * ROWS         # forward and dQ query block: two compute warpgroups
BWD_BQ = 64               # dK/dV kernel query block
BWD_BK = 2 * ROWS         # dK/dV kernel key block: two compute warpgroups
DQ_BK = 64                # dQ kernel key block (dQ, S and dP all live in registers)
DQ_STAGES = 2             # dQ kernel K/V ring depth
DKDV_STAGES = 2           # dK/dV kernel Q/dO ring depth
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

KERNELS = ("fwd", "dq", "dkdv")
# Parts a kernel can drop for timing attribution (Tuning.ablate); the results are then wrong.
ABLATIONS = {
    "exp": "dK/dV: no exponentials",
    "steps": "dK/dV: no tiles (launch and epilogue cost only)",
    "fwd_exp": "forward: no exponentials",
    "fwd_rescale": "forward: no rescaling of O",
    "fwd_pingpong": "forward: no ping-pong between the compute warpgroups",
}


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How the kernels run (hashable: it is part of the compile key).

    block_kv, num_stages: the forward's key block (64 or 128) and the depth of its K/V ring
    (2-4). num_ctas: the grid of the forward and dQ kernels; None picks it by `items_grid`.

    Development hooks, for tools/probe_hopper.py: `profile_dir` turns on Mosaic GPU's
    in-kernel profiler for the kernel `profile_kernel` ("fwd", "dq" or "dkdv"), which then
    writes per-warpgroup traces of its `jax.named_scope` regions there (the first
    `profile_space` regions per warpgroup; 48 bytes of SMEM each). `ablate` drops parts of the
    kernels (names in ABLATIONS) to attribute time: the results are then WRONG.
    """

    block_kv: int = 128
    num_stages: int = 2
    num_ctas: int | None = None
    profile_dir: str | None = None
    profile_kernel: str = "dkdv"
    profile_space: int = 128
    ablate: frozenset = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "ablate", frozenset(self.ablate))   # any iterable; stays hashable
        if self.block_kv not in (64, 128):
            raise ValueError(f"Tuning: block_kv={self.block_kv}; use 64 or 128.")
        if not 2 <= self.num_stages <= 4:
            raise ValueError(f"Tuning: num_stages={self.num_stages}; use 2, 3 or 4.")
        if self.num_ctas is not None and self.num_ctas < 1:
            raise ValueError(f"Tuning: num_ctas={self.num_ctas}; use a positive count or None.")
        if self.profile_kernel not in KERNELS:
            raise ValueError(f"Tuning: profile_kernel={self.profile_kernel!r}; use one of {KERNELS}.")
        unknown = sorted(self.ablate - ABLATIONS.keys())
        if unknown:
            raise ValueError(f"Tuning: unknown ablations {unknown}; choose from {sorted(ABLATIONS)}.")


@dataclasses.dataclass(frozen=True)
class StaticSpec:
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
    tuning: Tuning
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
# Block lists (plain jnp: runs on any backend, tested on CPU).
# ----------------------------------------------------------------------------------------

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
    """Per (batch row, 128-query block): the key blocks of `block_kv` keys to visit."""
    classes = mask_lib.classify_tiles(padded, batch, q_pad, kv_pad, FWD_BQ, block_kv)
    return block_lists(classes, kv_padded=kv_padded)


def backward_lists(padded: MaskSpec, batch, q_pad, kv_pad, kv_padded):
    """Per (batch row, 128-key block): the 64-query blocks to visit, last block first."""
    classes = mask_lib.classify_tiles(padded, batch, q_pad, kv_pad, BWD_BQ, BWD_BK)
    classes = jnp.swapaxes(classes, 1, 2)          # [B, kv blocks, q blocks]
    if kv_padded:                                  # the last kv block holds padding
        last = classes[:, -1, :]
        classes = classes.at[:, -1, :].set(jnp.where(last == FULL, PARTIAL, last))
    # Query blocks in descending order: under a causal mask every key block's list then
    # starts at the last query block, so the CTAs running together read the same Q/dO
    # tiles and reduce into the same dQ tiles at the same time (shared through L2).
    return block_lists(classes, descending=True)


# ----------------------------------------------------------------------------------------
# Kernel building blocks.
# ----------------------------------------------------------------------------------------

def pallas_modules():
    """(pallas, pallas.mosaic_gpu), imported when a kernel is built, not when this is imported."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return pl, plgpu


def tiled_smem(plgpu, shape, dtype):
    """SMEM with the 128-byte swizzle wgmma and TMA want (tiles of 8 rows x 128 bytes)."""
    elems = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                plgpu.SwizzleTransform(128)))


def wgmma_group(accs, ops):
    """Tensor-core work awaited as one group: `accs` are register accumulators, `ops` run in
    order, each either (i, a, b) for accs[i] += a @ b or a callable (e.g. a barrier wait)
    that returns more such ops. Returns the new accumulators."""
    pl, plgpu = pallas_modules()

    def body(refs):
        for op in ops:
            for i, a, b in (op() if callable(op) else [op]):
                plgpu.wgmma(refs[i], a, b)

    return pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc in accs))


def compiler_params(plgpu, kernel: str, tuning: Tuning):
    if tuning.profile_dir and kernel == tuning.profile_kernel:
        return plgpu.CompilerParams(approx_math=True, profile_space=tuning.profile_space,
                                    profile_dir=tuning.profile_dir, profile_bounds_check=True)
    return plgpu.CompilerParams(approx_math=True)


def num_sms():
    return getattr(jax.devices()[0], "core_count", None) or 132


def input_names(st: StaticSpec, tensors, extra=()) -> list[str]:
    """A kernel's inputs in order: `tensors`, the mask vectors it reads, sinks, block lists."""
    return (list(tensors) + [f"row_{n}" for n in st.row_names] + [f"col_{n}" for n in st.col_names]
            + (["sinks"] if st.has_sinks else []) + ["lists", "counts"] + list(extra))


def kernel_inputs(names, rows, cols, **arrays):
    """The kernel's inputs in the order of `names`, from `arrays` and the mask vectors rows /
    cols (named row_* / col_*)."""
    by_name = dict(arrays, **{f"row_{r}": x for r, x in rows.items()},
                   **{f"col_{c}": x for c, x in cols.items()})
    return [by_name[n] for n in names]


def mask_tile(shape, *, st, row_vals, col_vals, sinks, key_ids, row_axis):
    """Elementwise mask of one tile (True = attend), the rule of `pallas_kernels.operands`.
    `row_vals` are per-query vectors, `col_vals` per-key vectors (keys 'pos', 'lo', 'seg');
    `row_axis` says which tile axis holds the queries (0 forward, 1 backward); `key_ids` are
    the global key indices of the tile (only read when keys are padded). Plain jnp, so it
    also runs outside kernels."""
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


def key_ids(plgpu, shape, axis, start, st):
    """Global key indices along `axis` of a tile whose keys start at `start` (padded keys only)."""
    if not st.kv_padded:
        return None
    return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA) + start


def mask_partial_tile(scores, is_partial, tile_vectors, *, st, sinks, row_axis):
    """`scores` with the disallowed pairs at -inf when `is_partial` (a PARTIAL tile), else as
    they are. `tile_vectors()` loads (row_vals, col_vals, key_ids) for `mask_tile`; it only
    runs on partial tiles."""
    def masked():
        row_vals, col_vals, ids = tile_vectors()
        ok = mask_tile(scores.shape, st=st, row_vals=row_vals, col_vals=col_vals, sinks=sinks,
                       key_ids=ids, row_axis=row_axis)
        return jnp.where(ok, scores, -jnp.inf)

    return lax.cond(is_partial, masked, lambda: scores)


# ----------------------------------------------------------------------------------------
# The query-stationary kernels (forward, dQ): persistent CTAs walk (batch, head, 128-query
# block) work items; two compute warpgroups of 64 rows each, one memory warpgroup.
# ----------------------------------------------------------------------------------------

def items_grid(st: StaticSpec, total: int) -> int:
    """CTAs of the forward and dQ kernels, which walk the same `total` (batch, head,
    128-query block) items. Persistent (one per SM; the next item's Q is prefetched) unless
    the items are long causal rows (128 key blocks or more: 16K keys at block_kv=128). There
    one CTA per item measured faster, as the hardware's block scheduler balances the uneven
    causal items better than the static snake deal; for shorter rows and for window and
    chunk masks it measured slower (docs/hopper_kernel_notes.md, session 6, run 42)."""
    if st.tuning.num_ctas:
        return max(1, min(total, st.tuning.num_ctas))
    long_causal = (st.causal and not (st.has_lo or st.has_seg)
                   and st.kv_pad >= 128 * st.tuning.block_kv)
    return total if long_causal else max(1, min(total, num_sms()))


def item_decoder(nq, hq, causal):
    """Work item index -> (batch, head, query block). Query blocks vary fastest, so CTAs
    running together share one head's K/V in L2; under a causal mask the heaviest (last)
    query blocks come first."""
    def decode(t):
        qb, bh = lax.rem(t, nq), lax.div(t, nq)
        if causal:
            qb = nq - 1 - qb
        return lax.div(bh, hq), lax.rem(bh, hq), qb
    return decode


def snake_deal(total, grid, cta):
    """A persistent grid's share of `total` work items: (item_index(n), number of items).
    Items are dealt out in rounds of `grid`, the order reversed every other round (a snake),
    so every CTA gets a mix of long and short items: plain round-robin aliases with periodic
    masks, some CTAs drawing only the longest items (docs/hopper_kernel_notes.md, run 5)."""
    full_rounds, rest = total // grid, total % grid

    def item_index(n):
        return n * grid + jnp.where(lax.rem(n, 2) == 1, grid - 1 - cta, cta)

    last_pos = (grid - 1 - cta) if full_rounds % 2 == 1 else cta
    return item_index, full_rounds + (last_pos < rest).astype(jnp.int32)


def start_compute_warpgroup(ins, st, stages, k_free, v_free):
    """A compute warpgroup of a query-stationary kernel takes its registers and marks every
    K/V slot free. Returns the sink count (a scalar) if the mask reads it."""
    _, plgpu = pallas_modules()
    plgpu.set_max_registers(232, action="increase")
    for s in range(stages):   # every K/V slot starts out free
        plgpu.barrier_arrive(k_free.at[s])
        plgpu.barrier_arrive(v_free.at[s])
    return ins["sinks"][0] if st.has_sinks else None


def begin_item(ins, vec_smem, q_ready, *, b, qb, qbuf, wg, row_names):
    """A compute warpgroup starts a work item: its block count and first list entry, then
    (once the item's Q buffer is loaded) its rows' mask vectors."""
    _, plgpu = pallas_modules()
    count = ins["counts"][b, qb]
    first_entry = ins["lists"][b, qb, 0]
    plgpu.barrier_wait(q_ready.at[qbuf])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    row_vals = {r: plgpu.load(vec_smem[f"row_{r}"].at[qbuf, wg], layout=row_layout)
                for r in row_names}
    return count, first_entry, row_vals


def release_previous_q(q_free, qbuf):
    """The previous item's stores (from its Q buffer, reused for the output) have left SMEM:
    hand that buffer back to the memory warpgroup. Called one step into the next item, so
    the store latency stays off the critical path."""
    _, plgpu = pallas_modules()
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.barrier_arrive(q_free.at[1 - qbuf])


def key_block_vectors(vec_smem, slot, *, col_names, row_vals, shape, entry, bk, st):
    """`mask_partial_tile`'s inputs for a (query rows x key block) tile of the query-stationary
    kernels: the key block of list entry `entry`, its key vectors in K/V ring slot `slot`."""
    def load():
        _, plgpu = pallas_modules()
        col_layout = plgpu.Layout.WGMMA.reduce(0)
        col_vals = {c: plgpu.load(vec_smem[f"col_{c}"].at[slot], layout=col_layout)
                    for c in col_names}
        return row_vals, col_vals, key_ids(plgpu, shape, 1, lax.div(entry, 2) * bk, st)
    return load


def memory_warpgroup(ins, *, my_items, item_index, decode, group, bk, stages, col_names, load_q,
                     k_smem, v_smem, vec_smem, k_ready, v_ready, k_free, v_free, q_free):
    """The memory warpgroup of the query-stationary kernels (forward, dQ). Per work item
    (batch, head, query block): wait until the item's query buffer (of two) is free, let
    `load_q(b, h, qb, qbuf)` issue its copies, then TMA-copy every listed key block's K (with
    its per-key mask vectors) and V into a ring of `stages` slots, each slot handed back by
    the compute warpgroups through k_free / v_free."""
    pl, plgpu = pallas_modules()
    plgpu.set_max_registers(40, action="decrease")
    lists_ref, counts_ref = ins["lists"], ins["counts"]

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


def query_stationary_scratch(plgpu, *, d, dtype, bk, stages, row_names, col_names, q_copies,
                             **per_item):
    """SMEM and barriers of the query-stationary kernels, as `memory_warpgroup` uses them: two
    buffers of per-item tiles (Q, plus `per_item`, e.g. dO), a K/V ring of `stages` slots
    with the per-key mask vectors, and the ping-pong barrier. `q_copies` is the number of TMA
    copies per warpgroup that fill one item's buffer besides the row vectors."""
    scratch = dict(
        q_smem=tiled_smem(plgpu, (2, 2, ROWS, d), dtype),
        k_smem=tiled_smem(plgpu, (stages, bk, d), dtype),
        v_smem=tiled_smem(plgpu, (stages, bk, d), dtype),
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
        scratch[f"row_{r}"] = plgpu.SMEM((2, 2, ROWS), jnp.int32)
    for c in col_names:
        scratch[f"col_{c}"] = plgpu.SMEM((stages, bk), jnp.int32)
    return scratch
