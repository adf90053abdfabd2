"""The Hopper flash attention API: input checks, padding and block lists, the custom VJP.

Layout contract: q [B, T, Hq, D], k/v [B, S, Hkv, D] (Hq a multiple of Hkv, K/V never
repeated in memory), lse [B, Hq, T] float32 natural log; fully masked rows give 0 and
lse = -inf. T and S are padded inside to the block sizes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.backward import dkdv_call, dq_call
from pallas_kernels.gpu.common import (
    BWD_BK, DQ_BK, FWD_BQ, LOG2E, ROWS, StaticSpec, Tuning, backward_lists, forward_lists, items_grid)
from pallas_kernels.gpu.forward import forward_call
from pallas_kernels.mask import MaskSpec
from pallas_kernels.operands import mask_operands


def check_inputs(q, k, v, tuning: Tuning):
    if not isinstance(tuning, Tuning):
        raise TypeError(f"flash_attention: tuning must be a pallas_kernels.gpu.Tuning, got "
                        f"{type(tuning).__name__}.")
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
    smem = (4 * ROWS + 2 * tuning.num_stages * tuning.block_kv) * d * 2   # forward Q and K/V ring
    if smem > 200 * 1024:
        raise ValueError(f"flash_attention: block_kv={tuning.block_kv} x num_stages="
                         f"{tuning.num_stages} needs {smem // 1024} KiB of shared memory for "
                         f"head_dim {d}; lower num_stages.")


def setup(q, k, mask, scale, tuning: Tuning, deterministic=True):
    """The static spec and the padded mask parts (padded MaskSpec for the block lists, rows,
    cols, sinks): rows / cols are dicts of int32 [B, q_pad] / [B, kv_pad] mask vectors, 'pos'
    (token_index), 'lo' (first key allowed), 'seg' (segment ids), as `operands` defines them."""
    mask = MaskSpec() if mask is None else mask
    batch, q_len, _, d = q.shape
    kv_len = k.shape[1]
    q_pad = -(-q_len // FWD_BQ) * FWD_BQ
    mult = max(tuning.block_kv, BWD_BK)
    kv_pad = -(-kv_len // mult) * mult
    ops = mask_operands(mask, batch, q_len, kv_len, q_pad, kv_pad)
    rows, cols = {"pos": ops.q_pos}, {"pos": ops.k_pos}
    if ops.q_lo is not None:
        rows["lo"] = ops.q_lo
    if ops.q_seg is not None:
        rows["seg"], cols["seg"] = ops.q_seg, ops.k_seg
    st = StaticSpec(q_len=q_len, kv_len=kv_len, q_pad=q_pad, kv_pad=kv_pad,
                    scale=float(d ** -0.5 if scale is None else scale), tuning=tuning,
                    deterministic=bool(deterministic), **ops.flags)
    return st, (ops.padded, rows, cols, ops.sinks)


def _pad_seq(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))) if length > x.shape[1] else x


def _forward(q, k, v, st, mask_parts):
    padded, rows, cols, sinks = mask_parts
    q_pad, kv_pad = st.q_pad, st.kv_pad
    lists, counts = forward_lists(padded, q.shape[0], q_pad, kv_pad, st.tuning.block_kv,
                                  st.kv_padded)
    out, lse = forward_call(_pad_seq(q, q_pad), _pad_seq(k, kv_pad), _pad_seq(v, kv_pad),
                            rows, cols, sinks, lists, counts, st)
    return out[:, :st.q_len], lse[:, :, :st.q_len]


def fused_backward(st: StaticSpec) -> bool:
    """The one-kernel backward runs if non-deterministic results are allowed and the mask has
    no window or chunk term: it measured faster for causal and non-causal masks, about even
    for documents, and slower with a window or chunk (docs/hopper_kernel_notes.md, session 6)."""
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
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf).astype(jnp.float32)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, q_pad - q_len)), constant_values=jnp.inf)
    qp, kp, vp = _pad_seq(q, q_pad), _pad_seq(k, kv_pad), _pad_seq(v, kv_pad)
    dop = _pad_seq(dout.astype(q.dtype), q_pad)
    lists, counts = backward_lists(padded, batch, q_pad, kv_pad, st.kv_padded)
    if not fused_backward(st):
        # dK/dV by key blocks and dQ by query blocks, in two kernels: no float32 atomics, and
        # the gradients are bit-reproducible. Seven matmuls per tile instead of five.
        dk, dv = dkdv_call(qp, kp, vp, dop, lse2, delta, rows, cols, sinks, lists, counts, st)
        dq_lists, dq_counts = forward_lists(padded, batch, q_pad, kv_pad, DQ_BK, st.kv_padded)
        dq = dq_call(qp, kp, vp, dop, lse2, delta, rows, cols, sinks, dq_lists, dq_counts, st)
    else:   # one kernel, five matmuls per tile, dQ reduce-added in float32
        dq_acc = jax.new_ref(jnp.zeros((batch, q_pad, hq, d), jnp.float32))
        dk, dv = dkdv_call(qp, kp, vp, dop, lse2, delta, rows, cols, sinks, lists, counts, st,
                           dq_ref=dq_acc)
        dq = (dq_acc[...] * st.scale).astype(q.dtype)
    return dq[:, :q_len], dk[:, :st.kv_len], dv[:, :st.kv_len]


def flash_attention_fwd(q, k, v, mask: MaskSpec | None = None, *, scale: float | None = None,
                        tuning: Tuning = Tuning()):
    """Forward only: (out [B,T,Hq,D], lse [B,Hq,T] float32 natural log). For ring attention."""
    check_inputs(q, k, v, tuning)
    st, mask_parts = setup(q, k, mask, scale, tuning)
    return _forward(q, k, v, st, mask_parts)


def flash_attention_bwd(q, k, v, mask: MaskSpec | None, out, lse, dout, *, scale: float | None = None,
                        dlse=None, deterministic: bool = True, tuning: Tuning = Tuning()):
    """Backward only: (dq, dk, dv) from out, lse (possibly merged over several K/V shards,
    as in ring attention), dout and optionally the cotangent of lse. Uses
    delta = rowsum(dout * out), so it is exact for merged out/lse. `deterministic` as in
    `flash_attention`; of `tuning`, the dQ kernel reads num_ctas and the hooks."""
    check_inputs(q, k, v, tuning)
    st, mask_parts = setup(q, k, mask, scale, tuning, deterministic)
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
                    return_lse: bool = False, deterministic: bool = True,
                    tuning: Tuning = Tuning()):
    """Flash attention on Hopper: q [B,T,Hq,D], k/v [B,S,Hkv,D] (bf16 or fp16, D in {64, 128}).

    `mask` is a `pallas_kernels.mask.MaskSpec` (None = causal). Returns out [B,T,Hq,D], and
    lse [B,Hq,T] float32 when `return_lse`. Differentiable in q, k, v (custom VJP, also
    through lse). `tuning` (a `Tuning`) sets the forward's key block and pipeline depth and
    the grid of the forward and dQ kernels; it never changes the result (except its
    development hooks, see `Tuning`).

    `deterministic` (default True) computes dQ in its own kernel: bit-reproducible
    gradients, seven matmuls per tile. False fuses dQ into the dK/dV kernel (five matmuls,
    dQ reduce-added in float32, so the result varies in the last bits from run to run) for
    masks without a window or chunk term; with a window or chunk the two-kernel backward runs
    either way, as it measured faster there (`fused_backward`).
    """
    check_inputs(q, k, v, tuning)
    st, mask_parts = setup(q, k, mask, scale, tuning, deterministic)
    out, lse = _attention(q, k, v, mask_parts, st)
    return (out, lse) if return_lse else out


def kernel_path(*, causal: bool, has_lo: bool, has_seg: bool, kv_len: int, deterministic: bool = True,
                tuning: Tuning = Tuning()) -> str:
    """Which forward grid and backward a mask of this kind takes (for start-up logs): the same
    rules the kernels apply (`items_grid`, `fused_backward`)."""
    mult = max(tuning.block_kv, BWD_BK)
    st = StaticSpec(causal=causal, has_lo=has_lo, has_seg=has_seg, has_sinks=False, q_len=kv_len, kv_len=kv_len,
                    q_pad=-(-kv_len // FWD_BQ) * FWD_BQ, kv_pad=-(-kv_len // mult) * mult, scale=1.0,
                    tuning=tuning, deterministic=deterministic)
    total = 1 << 30  # more items than SMs: the grid rule then depends on the mask alone
    grid = "one CTA per query block" if items_grid(st, total) == total else "persistent, one CTA per SM"
    backward = ("fused dK/dV+dQ (float32 reduce-add)" if fused_backward(st)
                else "two kernels, dK/dV then dQ (deterministic)")
    return f"pallas_gpu forward grid: {grid}; backward: {backward}"
