"""The forward kernel: out and lse over the listed key blocks of every query block.

A persistent grid (`common.items_grid`) walks (batch, head, 128-query block) work items,
dealt to the CTAs in snake order. Warpgroup 2 issues TMA copies (Q double-buffered across
items, K/V in a ring of `Tuning.num_stages` slots); warpgroups 0 and 1 each own 64 query
rows, run QK^T and PV on the tensor cores (wgmma) and the online softmax in base 2,
ping-ponging through a shared barrier so one warpgroup's softmax overlaps the other's
matmuls (FlashAttention-3). Tiles listed as FULL skip the elementwise mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gpu.common import (
    FWD_BQ, LN2, LOG2E, ROWS, StaticSpec, begin_item, compiler_params, input_names, item_decoder,
    items_grid, kernel_inputs, key_block_vectors, mask_partial_tile, memory_warpgroup,
    pallas_modules, query_stationary_scratch, release_previous_q, snake_deal,
    start_compute_warpgroup, wgmma_group)


def _online_softmax(s, acc, m_i, l_i, *, c2, dtype, ablate):
    """One key block of the online softmax, in base 2 (m is a running max of s * c2): the new
    (acc rescaled, l, m) and P in the input dtype for the PV matmul."""
    ex2 = (lambda x: x) if "fwd_exp" in ablate else jnp.exp2
    m_new = jnp.maximum(m_i, s.max(axis=1) * c2)
    alpha = ex2(m_i - m_new)
    p = ex2(s * c2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
    if "fwd_rescale" not in ablate:
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    l_i = l_i * alpha + p.sum(axis=1)
    p16 = p.astype(dtype)
    return lax.optimization_barrier((acc, l_i, m_new, p16))


def _store_item(out_ref, lse_ref, q_smem, lse_smem, *, b, h, qb, qbuf, wg, acc, m_i, l_i,
                dtype):
    """Normalise O, write O and lse (TMA stores, waited one item later). Rows that saw no key
    get O = 0 and lse = -inf."""
    pl, plgpu = pallas_modules()
    empty = l_i == 0.0
    safe_l = jnp.where(empty, 1.0, l_i)
    inv_l = jnp.where(empty, 0.0, 1.0 / safe_l)
    o_smem = q_smem.at[qbuf, wg]      # this item's Q is dead: reuse it for O
    o_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
    lse_smem.at[qbuf, wg][...] = jnp.where(empty, -jnp.inf, m_i * LN2 + jnp.log(safe_l))
    plgpu.commit_smem()
    q0 = qb * FWD_BQ + wg * ROWS
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(q0, ROWS), h], commit_group=False)
    plgpu.copy_smem_to_gmem(lse_smem.at[qbuf, wg], lse_ref.at[b, h, pl.ds(q0, ROWS)],
                            commit_group=False)
    plgpu.commit_smem_to_gmem_group()


def forward_call(q, k, v, rows, cols, sinks, lists, counts, st: StaticSpec):
    """Padded inputs -> (out [B, Tp, Hq, D], lse [B, Hq, Tp] float32 natural log).
    rows / cols: the mask vectors, lists / counts: `common.forward_lists`."""
    pl, plgpu = pallas_modules()
    batch, q_pad, hq, d = q.shape
    group = hq // k.shape[2]
    bk, stages = st.tuning.block_kv, st.tuning.num_stages
    nq = q_pad // FWD_BQ
    dtype = q.dtype
    f32 = jnp.float32
    total = batch * hq * nq
    grid = items_grid(st, total)
    c2 = st.scale * LOG2E
    ROW, WGMMA = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA
    row_names, col_names = st.row_names, st.col_names
    in_names = input_names(st, ["q", "k", "v"])
    decode = item_decoder(nq, hq, st.causal)
    pingpong = "fwd_pingpong" not in st.tuning.ablate

    def kernel(*refs, q_smem, k_smem, v_smem, lse_smem, q_ready, q_free, k_ready, v_ready,
               k_free, v_free, sched, **vec_smem):
        ins = dict(zip(in_names, refs))
        out_ref, lse_ref = refs[len(in_names):]
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        item_index, my_items = snake_deal(total, grid, cta)

        def rendezvous():
            if pingpong:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            sinks_val = start_compute_warpgroup(ins, st, stages, k_free, v_free)

            def item(n, step):
                b, h, qb = decode(item_index(n))
                qbuf = lax.rem(n, 2)
                with jax.named_scope("item_start"):
                    count, first_entry, row_vals = begin_item(
                        ins, vec_smem, q_ready, b=b, qb=qb, qbuf=qbuf, wg=wg, row_names=row_names)
                    m0 = plgpu.layout_cast(jnp.full((ROWS,), -1e30, f32), ROW)  # finite: no inf-inf
                    l0 = plgpu.layout_cast(jnp.zeros((ROWS,), f32), ROW)
                    acc0 = plgpu.layout_cast(jnp.zeros((ROWS, d), f32), WGMMA)
                    pl.when(wg == 1)(rendezvous)  # offset the two warpgroups by half a step

                def kv_step(i, carry):
                    acc, m_i, l_i, entry = carry
                    next_entry = ins["lists"][b, qb, jnp.minimum(i + 1, count - 1)]  # prefetch
                    slot = lax.rem(step + i, stages)
                    with jax.named_scope("wait_k"):
                        plgpu.barrier_wait(k_ready.at[slot])

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem.at[qbuf, wg], k_smem.at[slot].T)
                        rendezvous()
                        return acc_ref[...]

                    with jax.named_scope("qk"):
                        s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), f32))
                    if st.needs_mask:
                        tile_vectors = key_block_vectors(vec_smem, slot, col_names=col_names,
                                                         row_vals=row_vals, shape=s.shape,
                                                         entry=entry, bk=bk, st=st)
                        s = mask_partial_tile(s, lax.rem(entry, 2) == 1, tile_vectors, st=st,
                                              sinks=sinks_val, row_axis=0)
                    plgpu.barrier_arrive(k_free.at[slot])
                    pl.when((i == 0) & (n > 0))(lambda: release_previous_q(q_free, qbuf))

                    with jax.named_scope("softmax"):
                        acc, l_i, m_new, p16 = _online_softmax(s, acc, m_i, l_i, c2=c2, dtype=dtype,
                                                               ablate=st.tuning.ablate)
                    with jax.named_scope("wait_v"):
                        if pingpong:   # softmax done: let the other warpgroup's QK in
                            plgpu.barrier_arrive(sched)
                        plgpu.barrier_wait(v_ready.at[slot])
                        if pingpong:
                            plgpu.barrier_wait(sched)

                    with jax.named_scope("pv"):
                        (acc,) = wgmma_group((acc,), [(0, p16, v_smem.at[slot])])
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l_i, next_entry

                acc, m_i, l_i, _ = lax.fori_loop(0, count, kv_step, (acc0, m0, l0, first_entry))
                pl.when((count == 0) & (n > 0))(lambda: release_previous_q(q_free, qbuf))
                with jax.named_scope("item_sync"):
                    pl.when(wg == 0)(rendezvous)
                with jax.named_scope("epilogue"):
                    _store_item(out_ref, lse_ref, q_smem, lse_smem, b=b, h=h, qb=qb, qbuf=qbuf,
                                wg=wg, acc=acc, m_i=m_i, l_i=l_i, dtype=dtype)
                return step + count

            lax.fori_loop(0, my_items, item, jnp.int32(0))
            release_previous_q(q_free, lax.rem(my_items, 2))   # the last item's buffer
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            def load_q(b, h, qb, qbuf):
                for w in range(2):
                    rs = pl.ds(qb * FWD_BQ + w * ROWS, ROWS)
                    plgpu.copy_gmem_to_smem(ins["q"].at[b, rs, h], q_smem.at[qbuf, w],
                                            q_ready.at[qbuf])
                    for r in row_names:
                        plgpu.copy_gmem_to_smem(ins[f"row_{r}"].at[b, rs],
                                                vec_smem[f"row_{r}"].at[qbuf, w], q_ready.at[qbuf])

            memory_warpgroup(ins, my_items=my_items, item_index=item_index, decode=decode,
                             group=group, bk=bk, stages=stages, col_names=col_names, load_q=load_q,
                             k_smem=k_smem, v_smem=v_smem, vec_smem=vec_smem, k_ready=k_ready,
                             v_ready=v_ready, k_free=k_free, v_free=v_free, q_free=q_free)

    scratch = query_stationary_scratch(plgpu, d=d, dtype=dtype, bk=bk, stages=stages,
                                       row_names=row_names, col_names=col_names, q_copies=1,
                                       lse_smem=plgpu.SMEM((2, 2, ROWS), f32))
    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((batch, hq, q_pad), f32)),
        scratch_types=scratch,
        grid=(grid,), grid_names=("cta",),
        num_threads=3, thread_name="wg",
        compiler_params=compiler_params(plgpu, "fwd", st.tuning),
    )
    return call(*kernel_inputs(in_names, rows, cols, q=q, k=k, v=v, lists=lists, counts=counts,
                               sinks=sinks))
