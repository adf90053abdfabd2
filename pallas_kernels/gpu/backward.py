"""The backward kernels: dK/dV by key blocks, dQ by query blocks (or fused into dK/dV).

dK/dV (`dkdv_call`): one CTA per (batch, kv head, 128-key block); warpgroups 0 and 1 own 64
key rows each and keep dK, dV in registers while warpgroup 2 streams (Q, dO, lse, delta)
blocks of 64 queries for every query head of the GQA group. The tiles are transposed (S^T,
dP^T), so P^T and dS^T feed the dV and dK matmuls straight from registers.

dQ (`dq_call`): the forward's persistent, query-stationary structure with 64-key blocks;
dQ, S and dP stay in registers (three matmuls per tile) and dQ is written once.

Two kernels mean no float32 atomics and bit-reproducible gradients (seven matmuls per
tile). Passing `dq_ref` to `dkdv_call` instead fuses dQ into it (five matmuls per tile, dQ
TMA reduce-added in float32, FlashAttention-3 style): not reproducible in the last bits;
`api.fused_backward` says when it runs.

Both take lse in base 2 (lse * log2(e); +inf for rows that see no key, so their P is 0)
and delta = rowsum(dO * O).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gpu.common import (
    BWD_BK, BWD_BQ, DKDV_STAGES, DQ_BK, DQ_STAGES, FWD_BQ, LOG2E, ROWS, StaticSpec, begin_item,
    compiler_params, input_names, item_decoder, items_grid, kernel_inputs, key_block_vectors,
    key_ids, mask_partial_tile, memory_warpgroup, pallas_modules, query_stationary_scratch,
    release_previous_q, snake_deal, start_compute_warpgroup, tiled_smem, wgmma_group)


def dq_call(q, k, v, do, lse2, delta, rows, cols, sinks, lists, counts, st: StaticSpec):
    """dQ without atomics: per work item, three matmuls per tile (S = Q K^T, dP = dO V^T,
    dQ += dS K), the softmax scale applied once at the store. lists / counts:
    `common.forward_lists` with key blocks of DQ_BK."""
    pl, plgpu = pallas_modules()
    batch, q_pad, hq, d = q.shape
    group = hq // k.shape[2]
    bk, stages = DQ_BK, DQ_STAGES
    nq = q_pad // FWD_BQ
    dtype = q.dtype
    f32 = jnp.float32
    total = batch * hq * nq
    grid = items_grid(st, total)
    c2 = st.scale * LOG2E
    ROW, WGMMA = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA
    row_names, col_names = st.row_names, st.col_names
    in_names = input_names(st, ["q", "k", "v", "do", "lse", "delta"])
    decode = item_decoder(nq, hq, st.causal)

    def kernel(*refs, q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, q_ready, q_free,
               k_ready, v_ready, k_free, v_free, sched, **vec_smem):
        ins = dict(zip(in_names, refs))
        (dq_ref,) = refs[len(in_names):]
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        item_index, my_items = snake_deal(total, grid, cta)

        def rendezvous():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            sinks_val = start_compute_warpgroup(ins, st, stages, k_free, v_free)

            def item(n, step):
                b, h, qb = decode(item_index(n))
                qbuf = lax.rem(n, 2)
                count, first_entry, row_vals = begin_item(
                    ins, vec_smem, q_ready, b=b, qb=qb, qbuf=qbuf, wg=wg, row_names=row_names)
                lse = plgpu.load(lse_smem.at[qbuf, wg], layout=ROW)
                delta = plgpu.load(delta_smem.at[qbuf, wg], layout=ROW)
                dq0 = plgpu.layout_cast(jnp.zeros((ROWS, d), f32), WGMMA)
                pl.when(wg == 1)(rendezvous)  # offset the two warpgroups by half a step

                def kv_step(i, carry):
                    dq, entry = carry
                    next_entry = ins["lists"][b, qb, jnp.minimum(i + 1, count - 1)]
                    slot = lax.rem(step + i, stages)
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[slot])

                    def scores(s_ref, dp_ref):
                        plgpu.wgmma(s_ref, q_smem.at[qbuf, wg], k_smem.at[slot].T)
                        plgpu.wgmma(dp_ref, do_smem.at[qbuf, wg], v_smem.at[slot].T)
                        rendezvous()
                        return s_ref[...], dp_ref[...]

                    acc = plgpu.ACC((ROWS, bk), f32)
                    s, dp = pl.run_scoped(scores, acc, acc)
                    plgpu.barrier_arrive(v_free.at[slot])
                    if st.needs_mask:
                        tile_vectors = key_block_vectors(vec_smem, slot, col_names=col_names,
                                                         row_vals=row_vals, shape=s.shape,
                                                         entry=entry, bk=bk, st=st)
                        s = mask_partial_tile(s, lax.rem(entry, 2) == 1, tile_vectors, st=st,
                                              sinks=sinks_val, row_axis=0)
                    pl.when((i == 0) & (n > 0))(lambda: release_previous_q(q_free, qbuf))
                    p = jnp.exp2(s * c2 - lax.broadcast_in_dim(lse, s.shape, [0]))
                    ds = (p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))).astype(dtype)
                    dq, ds = lax.optimization_barrier((dq, ds))
                    plgpu.barrier_arrive(sched)   # elementwise done: let the other warpgroup in
                    plgpu.barrier_wait(sched)
                    (dq,) = wgmma_group((dq,), [(0, ds, k_smem.at[slot])])
                    plgpu.barrier_arrive(k_free.at[slot])
                    return dq, next_entry

                dq, _ = lax.fori_loop(0, count, kv_step, (dq0, first_entry))
                pl.when((count == 0) & (n > 0))(lambda: release_previous_q(q_free, qbuf))
                pl.when(wg == 0)(rendezvous)
                o_smem = q_smem.at[qbuf, wg]      # this item's Q is dead: stage dQ there
                o_smem[...] = (dq * st.scale).astype(dtype)
                plgpu.commit_smem()
                q0 = qb * FWD_BQ + wg * ROWS
                plgpu.copy_smem_to_gmem(o_smem, dq_ref.at[b, pl.ds(q0, ROWS), h])
                return step + count

            lax.fori_loop(0, my_items, item, jnp.int32(0))
            release_previous_q(q_free, lax.rem(my_items, 2))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            def load_q(b, h, qb, qbuf):
                ready = q_ready.at[qbuf]
                for w in range(2):
                    rs = pl.ds(qb * FWD_BQ + w * ROWS, ROWS)
                    plgpu.copy_gmem_to_smem(ins["q"].at[b, rs, h], q_smem.at[qbuf, w], ready)
                    plgpu.copy_gmem_to_smem(ins["do"].at[b, rs, h], do_smem.at[qbuf, w], ready)
                    plgpu.copy_gmem_to_smem(ins["lse"].at[b, h, rs], lse_smem.at[qbuf, w], ready)
                    plgpu.copy_gmem_to_smem(ins["delta"].at[b, h, rs], delta_smem.at[qbuf, w], ready)
                    for r in row_names:
                        plgpu.copy_gmem_to_smem(ins[f"row_{r}"].at[b, rs],
                                                vec_smem[f"row_{r}"].at[qbuf, w], ready)

            memory_warpgroup(ins, my_items=my_items, item_index=item_index, decode=decode,
                             group=group, bk=bk, stages=stages, col_names=col_names, load_q=load_q,
                             k_smem=k_smem, v_smem=v_smem, vec_smem=vec_smem, k_ready=k_ready,
                             v_ready=v_ready, k_free=k_free, v_free=v_free, q_free=q_free)

    scratch = query_stationary_scratch(
        plgpu, d=d, dtype=dtype, bk=bk, stages=stages, row_names=row_names, col_names=col_names,
        q_copies=4, do_smem=tiled_smem(plgpu, (2, 2, ROWS, d), dtype),
        lse_smem=plgpu.SMEM((2, 2, ROWS), f32), delta_smem=plgpu.SMEM((2, 2, ROWS), f32))
    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),),
        scratch_types=scratch,
        grid=(grid,), grid_names=("cta",),
        num_threads=3, thread_name="wg",
        compiler_params=compiler_params(plgpu, "dq", st.tuning),
    )
    (dq,) = call(*kernel_inputs(in_names, rows, cols, q=q, k=k, v=v, do=do, lse=lse2,
                                delta=delta, lists=lists, counts=counts, sinks=sinks))
    return dq


def _dkdv_scratch(plgpu, *, d, dtype, stages, q_names, fused, chunk):
    """SMEM and barriers of the dK/dV kernel: a ring of `stages` (Q, dO, lse, delta, query
    mask vectors) slots; each compute warpgroup's K and V rows (reused to stage dK, dV);
    fused, also dS^T (double-buffered) and the dQ staging tiles."""
    f32 = jnp.float32
    scratch = dict(
        q_smem=tiled_smem(plgpu, (stages, BWD_BQ, d), dtype),
        do_smem=tiled_smem(plgpu, (stages, BWD_BQ, d), dtype),
        k_smem=tiled_smem(plgpu, (2, ROWS, d), dtype),
        v_smem=tiled_smem(plgpu, (2, ROWS, d), dtype),
        kv_ready=plgpu.Barrier(num_arrivals=2, num_barriers=2),
        q_ready=plgpu.Barrier(num_arrivals=4 + len(q_names), num_barriers=stages),
        q_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    )
    if fused:
        # lse and delta share one buffer here: the fused kernel slows down with any SMEM
        # more (likely the L1 left for its register spills; docs/hopper_kernel_notes.md,
        # runs 27-28 and 46).
        scratch.update(stats_smem=plgpu.SMEM((stages, 2, BWD_BQ), f32),
                       ds_smem=tiled_smem(plgpu, (2, 2, ROWS, BWD_BQ), dtype),
                       dq_smem=tiled_smem(plgpu, (2, BWD_BQ, chunk), f32),
                       ds_ready=plgpu.Barrier(num_arrivals=2))
    else:
        scratch.update(lse_smem=plgpu.SMEM((stages, BWD_BQ), f32),
                       delta_smem=plgpu.SMEM((stages, BWD_BQ), f32))
    for r in q_names:
        scratch[f"row_{r}"] = plgpu.SMEM((stages, BWD_BQ), jnp.int32)
    return scratch


def dkdv_call(q, k, v, do, lse2, delta, rows, cols, sinks, lists, counts, st: StaticSpec,
              dq_ref=None):
    """dK, dV: one CTA per (batch, kv head, 128-key block); four matmuls per tile. With
    `dq_ref` (a float32 [B, T, Hq, D] ref) also dQ, unscaled: a fifth matmul per tile whose
    result is TMA reduce-added into dq_ref (fused; not bit-reproducible). lists / counts:
    `common.backward_lists`."""
    pl, plgpu = pallas_modules()
    batch, q_pad, hq, d = q.shape
    kv_pad, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    nk = kv_pad // BWD_BK
    fused = dq_ref is not None
    stages = 2 if fused else DKDV_STAGES   # fused: dS and dQ staging take the SMEM
    dtype = q.dtype
    f32 = jnp.float32
    c2 = st.scale * LOG2E
    ROW, COL = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    WGMMA = plgpu.Layout.WGMMA
    ablate = st.tuning.ablate
    exchange = d == 128   # fused dQ: see `add_dq` below
    chunk = 64            # fused dQ: columns each warpgroup reduce-adds per step
    # In the transposed tile (keys x queries) the kernel's per-row vectors are per key.
    q_names, k_names = st.row_names, st.col_names
    in_names = input_names(st, ["q", "k", "v", "do", "lse", "delta"], ["dq"] if fused else [])

    def kernel(*refs, q_smem, do_smem, k_smem, v_smem, kv_ready, q_ready, q_free,
               lse_smem=None, delta_smem=None, stats_smem=None, ds_smem=None, dq_smem=None,
               ds_ready=None, **vec_smem):
        ins = dict(zip(in_names, refs))
        dk_ref, dv_ref = refs[len(in_names):]
        lists_ref, counts_ref = ins["lists"], ins["counts"]
        kb, hk, b = lax.axis_index("kb"), lax.axis_index("hk"), lax.axis_index("b")
        wg = lax.axis_index("wg")
        count = counts_ref[b, kb]
        steps = 0 if "steps" in ablate else group * count   # (query head, query block) pairs

        def lse_at(slot):
            return stats_smem.at[slot, 0] if fused else lse_smem.at[slot]

        def delta_at(slot):
            return stats_smem.at[slot, 1] if fused else delta_smem.at[slot]

        def q_block_of(j):
            """Step j -> (query head, query block, is the tile PARTIAL)."""
            g = lax.div(j, jnp.maximum(count, 1))
            entry = lists_ref[b, kb, lax.rem(j, jnp.maximum(count, 1))]
            return hk * group + g, lax.div(entry, 2), lax.rem(entry, 2)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(240, action="increase")
            for s in range(stages):
                plgpu.barrier_arrive(q_free.at[s])
            k0 = kb * BWD_BK + wg * ROWS
            ks = pl.ds(k0, ROWS)
            plgpu.copy_gmem_to_smem(ins["k"].at[b, ks, hk], k_smem.at[wg], kv_ready.at[wg])
            plgpu.copy_gmem_to_smem(ins["v"].at[b, ks, hk], v_smem.at[wg], kv_ready.at[wg])
            key_vals = {c: plgpu.load(ins[f"col_{c}"].at[b, ks], layout=ROW, optimized=False)
                        for c in k_names}
            sinks_val = ins["sinks"][0] if st.has_sinks else None
            plgpu.barrier_wait(kv_ready.at[wg])
            zeros = plgpu.layout_cast(jnp.zeros((ROWS, d), f32), WGMMA)

            def add_dq(slot, parity, h, qb):
                """Fused: dQ[q block, head h] += dS @ K, TMA reduce-added in float32. dS^T
                went through SMEM (dQ needs it as a transposed wgmma operand). With D=128
                the warpgroups swap halves, and each adds dS[q, all 128 keys] @ K[:, its 64
                columns]; with D=64 each adds dS[q, its keys] @ K[its keys, :]."""
                def dq_ops():
                    if exchange:
                        plgpu.barrier_wait(ds_ready)
                        cols_ = pl.ds(wg * chunk, chunk)
                        return [(0, ds_smem.at[parity, w].T, k_smem.at[w, :, cols_]) for w in range(2)]
                    return [(0, ds_smem.at[parity, wg].T, k_smem.at[wg])]

                with jax.named_scope("mma_dq"):
                    dq0 = plgpu.layout_cast(jnp.zeros((BWD_BQ, chunk), f32), WGMMA)
                    (dq,) = wgmma_group((dq0,), [dq_ops])
                plgpu.barrier_arrive(q_free.at[slot])
                with jax.named_scope("dq_reduce"):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last reduce left dq_smem
                    dq_smem.at[wg][...] = dq
                    plgpu.commit_smem()
                    cols_ = pl.ds(wg * chunk, chunk) if exchange else pl.ds(0, d)
                    plgpu.copy_smem_to_gmem(
                        dq_smem.at[wg], ins["dq"].at[b, pl.ds(qb * BWD_BQ, BWD_BQ), h, cols_],
                        reduction_op="add")

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

                acc = plgpu.ACC((ROWS, BWD_BQ), f32)
                with jax.named_scope("mma_s_dp"):
                    s_t, dp_t = pl.run_scoped(scores, acc, acc)
                with jax.named_scope("softmax"):
                    if st.needs_mask:
                        def tile_vectors():
                            q_vals = {r: plgpu.load(vec_smem[f"row_{r}"].at[slot], layout=COL)
                                      for r in q_names}
                            return q_vals, key_vals, key_ids(plgpu, s_t.shape, 0, k0, st)
                        s_t = mask_partial_tile(s_t, partial == 1, tile_vectors, st=st,
                                                sinks=sinks_val, row_axis=1)
                    lse = plgpu.load(lse_at(slot), layout=COL)
                    x = s_t * c2 - lax.broadcast_in_dim(lse, s_t.shape, [1])
                    p_t = x if "exp" in ablate else jnp.exp2(x)
                    delta = plgpu.load(delta_at(slot), layout=COL)
                    ds_t = (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(dtype)
                    p_t = p_t.astype(dtype)
                if fused:   # dS^T to SMEM, for dK below and for `add_dq`
                    parity = lax.rem(j, 2)
                    ds_smem.at[parity, wg][...] = ds_t
                    plgpu.commit_smem()
                    if exchange:
                        plgpu.barrier_arrive(ds_ready)
                with jax.named_scope("mma_dk_dv"):
                    # Fused: dK reads dS^T from its SMEM copy, so the registers die at the
                    # store (fewer spills; docs/hopper_kernel_notes.md, session 6, run 41).
                    ds_op = ds_smem.at[parity, wg] if fused else ds_t
                    dv, dk = wgmma_group((dv, dk), [(0, p_t, do_smem.at[slot]), (1, ds_op, q_smem.at[slot])])
                if fused:
                    add_dq(slot, parity, h, qb)
                else:
                    plgpu.barrier_arrive(q_free.at[slot])
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
                qs = pl.ds(qb * BWD_BQ, BWD_BQ)
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

    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=_dkdv_scratch(plgpu, d=d, dtype=dtype, stages=stages, q_names=q_names,
                                    fused=fused, chunk=chunk),
        # Mosaic GPU launches the LAST grid axis fastest: with the key blocks last, the CTAs
        # resident together are one head's, sharing its Q/dO tiles and dQ rows through L2
        # (with batch last, the resident CTAs were one per head once B*H nears the SM count:
        # HBM-bound; docs/hopper_kernel_notes.md, session 6).
        grid=(batch, hkv, nk), grid_names=("b", "hk", "kb"),
        num_threads=3, thread_name="wg",
        compiler_params=compiler_params(plgpu, "dkdv", st.tuning),
    )
    return call(*kernel_inputs(in_names, rows, cols, q=q, k=k, v=v, do=do, lse=lse2, delta=delta,
                               lists=lists, counts=counts, sinks=sinks, dq=dq_ref))
