"""Context parallelism: attention over a sequence sharded along the `context` mesh axis.

Runs inside `jax.shard_map`; each device holds a contiguous slice of q, k and v (and of the
mask's token_index / segment ids). Two strategies:

- ring: K/V, with their token_index and segment ids, travel round the ring with
  `lax.ppermute` (the next block is in flight while the current one is attended). Partial
  (out, lse) merge by logsumexp. The backward rotates K/V again, recomputes each step's
  gradients from the globally merged out/lse, keeps dq local and sends dK/dV round with
  their block, so they arrive home after the last step.
- all_gather: gather K/V (and their index/segment arrays) once, attend locally; the
  backward reduce-scatters dK/dV. Cheap when K/V are small (GQA) or the ring is short.

Ring steps skip what the mask empties: each (q shard, visiting K/V shard) tile is cut in
halves both ways and a quarter runs only if `classify_tiles` (min/max of token_index and
segment ids) finds an allowed pair in it. With causal masks, contiguous shards leave the
last rank with all the work; reorder the sequence once at the input with `zigzag` (rank r
holds chunks r and 2R-1-r of 2R) and every rank does the same 3/4 + (R-1)/2 tiles of work,
about half of the dense R. Masks use explicit token_index, so zigzag shards need no special
case here, only zigzagged token_index (and segment ids, tokens, RoPE positions).

Knows meshes, not models: the attention dispatcher calls it when the `context` axis is > 1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels.mask import EMPTY, MaskSpec, classify_tiles

STRATEGIES = ("ring", "all_gather")
_SCALARS = ("window", "chunk", "sinks")


# ---------------------------------------------------------------------------- load balance

def zigzag_order(seq_len: int, num_shards: int) -> np.ndarray:
    """The permutation that load-balances causal attention over `num_shards` contiguous shards.

    The sequence is cut into 2R chunks; shard r gets chunks r and 2R-1-r, so every shard
    holds one early and one late chunk. `x_zigzag = x[..., zigzag_order(L, R), ...]`.
    """
    if not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ValueError(f"zigzag: num_shards={num_shards!r} must be a positive int (the context axis size).")
    if num_shards == 1:
        return np.arange(seq_len)  # one shard: nothing to balance
    if seq_len % (2 * num_shards):
        raise ValueError(f"zigzag: sequence length {seq_len} is not a multiple of 2 x {num_shards} shards "
                         f"= {2 * num_shards}; pad the sequence to a multiple of {2 * num_shards}.")
    chunks = np.arange(seq_len).reshape(2 * num_shards, -1)
    ranks = np.arange(num_shards)
    return chunks[np.stack([ranks, 2 * num_shards - 1 - ranks], axis=1).reshape(-1)].reshape(-1)


def _take(x, indices, axis):
    xp = np if isinstance(x, np.ndarray) else jnp  # NumPy in the data pipeline stays NumPy
    return xp.take(x, indices, axis=axis)


def zigzag(x, axis: int, num_shards: int):
    """Reorder `axis` of x into zigzag order. Do it once at the input (tokens, segment_ids,
    token_index, rope_positions), never per layer."""
    return _take(x, zigzag_order(x.shape[axis], num_shards), axis)


def unzigzag(x, axis: int, num_shards: int):
    """Inverse of `zigzag`: back to the natural order (e.g. for per-position outputs)."""
    return _take(x, np.argsort(zigzag_order(x.shape[axis], num_shards)), axis)


# ---------------------------------------------------------------------------- the wrapper

@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every device-local function needs besides arrays (all static)."""
    local_fwd: Callable
    local_bwd: Callable
    scale: float
    causal: bool
    static_scalars: tuple  # (name, value) of window/chunk/sinks given as Python ints or None
    axis: str
    size: int

    def mask(self, q_rows, kv_rows, traced) -> MaskSpec:
        return MaskSpec(causal=self.causal, q_token_index=q_rows["index"], kv_token_index=kv_rows["index"],
                        q_segment_ids=q_rows.get("segment"), kv_segment_ids=kv_rows.get("segment"),
                        **dict(self.static_scalars), **traced)


def context_parallel_attention(q, k, v, mask: MaskSpec | None = None, *, mesh, strategy: str = "ring",
                               local_fwd, local_bwd, scale=None, batch_axes=("data", "fsdp"),
                               head_axis: str | None = "tensor", context_axis: str = "context",
                               return_lse: bool = False):
    """Attention of q [B,T,Hq,D] over k/v [B,S,Hkv,D], sequences sharded over `context_axis`.

    q, k, v are global arrays: sequence dims sharded over `context_axis`, batch over
    `batch_axes`, heads over `head_axis` (axes the mesh lacks are ignored; None = replicated).
    `mask` arrays are sharded likewise; window / chunk / sinks may be traced scalars.

    local_fwd(q, k, v, mask, *, scale) -> (out, lse [B,Hq,T] f32) and
    local_bwd(q, k, v, mask, out, lse, dout, *, scale) -> (dq, dk, dv) attend one device's
    tile; local_bwd gets the globally merged out/lse and recomputes p = exp(s - lse).

    Returns out [B,T,Hq,D] (q.dtype), and lse [B,Hq,T] float32 when `return_lse`. The lse is
    returned for inspection and merging only: no gradient flows through it.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"context parallelism: unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    if context_axis not in mesh.shape:
        raise ValueError(f"context parallelism: the mesh has axes {tuple(mesh.shape)} but no "
                         f"{context_axis!r} axis; build the mesh with one or pass context_axis=.")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"context parallelism expects q [B,T,Hq,D] and k = v [B,S,Hkv,D] with the same B "
                         f"and D; got q {q.shape}, k {k.shape}, v {v.shape}.")
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")

    batch_axes = tuple(a for a in (batch_axes or ()) if a in mesh.shape)
    head_axis = head_axis if head_axis in mesh.shape else None
    ring_size = mesh.shape[context_axis]
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    head_shards = mesh.shape[head_axis] if head_axis else 1
    for what, n, shards, fix in (
            ("batch", b, batch_shards, f"use a batch that is a multiple of {batch_shards} (the {batch_axes} axes)"),
            ("query length", t, ring_size, f"pad the sequence to a multiple of {ring_size}"),
            ("key length", s, ring_size, f"pad the sequence to a multiple of {ring_size}"),
            ("query heads", hq, head_shards, f"shrink the {head_axis!r} axis or pass head_axis=None"),
            ("key/value heads", hkv, head_shards,
             f"repeat K/V heads to a multiple of {head_shards}, shrink the {head_axis!r} axis or pass head_axis=None")):
        if n % shards:
            raise ValueError(f"context parallelism: {what} {n} does not split over {shards} devices; {fix}.")

    mask = (MaskSpec() if mask is None else mask).resolved(b, t, s)
    q_rows = {"index": mask.q_token_index}
    kv_rows = {"index": mask.kv_token_index}
    if mask.has_segments:
        q_rows["segment"], kv_rows["segment"] = mask.q_segment_ids, mask.kv_segment_ids
    is_static = lambda x: x is None or isinstance(x, (int, np.integer))
    static = tuple((n, getattr(mask, n)) for n in _SCALARS if is_static(getattr(mask, n)))
    traced = {n: jnp.asarray(getattr(mask, n), jnp.int32) for n in _SCALARS if not is_static(getattr(mask, n))}
    setup = _Setup(local_fwd, local_bwd, d ** -0.5 if scale is None else scale, mask.causal, static,
                   context_axis, ring_size)

    batch_spec = batch_axes or None
    seq_spec = P(batch_spec, context_axis, head_axis, None)
    lse_spec = P(batch_spec, head_axis, context_axis)
    row_spec = P(batch_spec, context_axis)
    in_specs = (seq_spec, seq_spec, seq_spec, {n: row_spec for n in q_rows}, {n: row_spec for n in kv_rows},
                {n: P() for n in traced})
    fwd_local, bwd_local = (_ring_fwd, _ring_bwd) if strategy == "ring" else (_gather_fwd, _gather_bwd)
    # check_vma=False: the ring's accumulators start as replicated zeros and turn per-device,
    # which the varying-axes check would want cast explicitly (an API that moved between JAX
    # versions). Nothing is differentiated through these shard_maps: the custom VJP is outside.
    sharded_fwd = jax.shard_map(lambda *a: fwd_local(setup, *a), mesh=mesh, in_specs=in_specs,
                                out_specs=(seq_spec, lse_spec), check_vma=False)
    sharded_bwd = jax.shard_map(lambda *a: bwd_local(setup, *a), mesh=mesh,
                                in_specs=in_specs + (seq_spec, lse_spec, seq_spec),
                                out_specs=(seq_spec, seq_spec, seq_spec), check_vma=False)

    @jax.custom_vjp
    def attend(q, k, v, q_rows, kv_rows, traced):
        return sharded_fwd(q, k, v, q_rows, kv_rows, traced)

    def attend_fwd(*args):
        out, lse = sharded_fwd(*args)
        return (out, lse), (*args, out, lse)

    def attend_bwd(residuals, cotangents):
        dout, _ = cotangents  # lse is stop_gradient-ed below, so its cotangent is zero
        dq, dk, dv = sharded_bwd(*residuals, dout)
        no_grad = lambda tree: jax.tree.map(lambda x: np.zeros(np.shape(x), jax.dtypes.float0), tree)
        return dq, dk, dv, no_grad(residuals[3]), no_grad(residuals[4]), no_grad(residuals[5])

    attend.defvjp(attend_fwd, attend_bwd)
    out, lse = attend(q, k, v, q_rows, kv_rows, traced)
    return (out, lax.stop_gradient(lse)) if return_lse else out


# ---------------------------------------------------------------------------- all-gather

def _gather(setup: _Setup, tree):
    return jax.tree.map(lambda x: lax.all_gather(x, setup.axis, axis=1, tiled=True), tree)


def _gather_fwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced):
    k, v, kv_rows = _gather(setup, (k, v, kv_rows))
    out, lse = setup.local_fwd(q, k, v, setup.mask(q_rows, kv_rows, traced), scale=setup.scale)
    return out.astype(q.dtype), lse.astype(jnp.float32)


def _gather_bwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced, out, lse, dout):
    k_all, v_all, kv_rows = _gather(setup, (k, v, kv_rows))  # gather again rather than keep S-long K/V
    dq, dk, dv = setup.local_bwd(q, k_all, v_all, setup.mask(q_rows, kv_rows, traced), out, lse, dout,
                                 scale=setup.scale)
    # Sum the R partial dK/dV in float32, each device keeping its own sequence slice.
    scatter = lambda x, like: lax.psum_scatter(x.astype(jnp.float32), setup.axis, scatter_dimension=1,
                                               tiled=True).astype(like.dtype)
    return dq.astype(q.dtype), scatter(dk, k), scatter(dv, v)


# ---------------------------------------------------------------------------- ring

def _rotate(setup: _Setup, tree):
    """Send to the next rank: after step i, rank r holds the K/V block of rank r - i."""
    perm = [(i, (i + 1) % setup.size) for i in range(setup.size)]
    return jax.tree.map(lambda x: lax.ppermute(x, setup.axis, perm), tree)


def _rows(tree, start, size):
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis=1), tree)


def _parts(length: int) -> int:
    return 2 if length % 2 == 0 else 1


def _for_each_live_part(setup: _Setup, q_rows, kv_rows, traced, visit, carry):
    """Cut the (q shard x K/V shard) tile in halves both ways and fold `visit(carry, q_start,
    q_size, kv_start, kv_size)` over the parts that hold an allowed pair, skipping the rest.

    Halves because zigzag shards are two chunks: under a causal mask, every step but the
    diagonal one leaves exactly two of the four parts empty. The test is conservative
    (`classify_tiles`, from min/max of token_index and segment ids), so it never drops an
    allowed pair. One scan over the parts keeps a single copy of the local kernel.
    """
    b, tl = q_rows["index"].shape
    sl = kv_rows["index"].shape[1]
    q_parts, kv_parts = _parts(tl), _parts(sl)
    q_size, kv_size = tl // q_parts, sl // kv_parts
    tiles = classify_tiles(setup.mask(q_rows, kv_rows, traced), b, tl, sl, q_size, kv_size)
    live = (tiles != EMPTY).any(axis=0).reshape(-1)  # any allowed pair in the local batch

    def part(carry, i):
        q_start, kv_start = (i // kv_parts) * q_size, (i % kv_parts) * kv_size
        run = lambda c: visit(c, q_start, q_size, kv_start, kv_size)
        return lax.cond(live[i], run, lambda c: c, carry), None

    return lax.scan(part, carry, jnp.arange(q_parts * kv_parts))[0]


def _merge(out, lse, part_out, part_lse):
    """Combine two softmax-normalised partials by their logsumexp; -inf (no keys) weighs 0."""
    new_lse = jnp.logaddexp(lse, part_lse)
    safe = jnp.where(jnp.isfinite(new_lse), new_lse, 0.0)
    weight = lambda x: jnp.exp(x - safe).transpose(0, 2, 1)[..., None]  # [B,H,T] -> [B,T,H,1]
    return out * weight(lse) + part_out.astype(jnp.float32) * weight(part_lse), new_lse


def _ring_fwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced):
    b, tl, h, _ = q.shape

    def attend_part(kv, carry, q_start, q_size, kv_start, kv_size):
        k, v, kv_rows = kv
        out, lse = carry
        qs = lambda x: _rows(x, q_start, q_size)
        ks = lambda x: _rows(x, kv_start, kv_size)
        part_out, part_lse = setup.local_fwd(qs(q), ks(k), ks(v), setup.mask(qs(q_rows), ks(kv_rows), traced),
                                             scale=setup.scale)
        new_out, new_lse = _merge(qs(out), lax.dynamic_slice_in_dim(lse, q_start, q_size, axis=2),
                                  part_out, part_lse)
        return (lax.dynamic_update_slice_in_dim(out, new_out, q_start, axis=1),
                lax.dynamic_update_slice_in_dim(lse, new_lse, q_start, axis=2))

    def step(carry, _):
        out, lse, kv = carry
        # The next block is in flight while this one is attended. The last hop is spare (it
        # brings K/V home); keeping it makes every step alike, so the step compiles once.
        next_kv = _rotate(setup, kv)
        visit = lambda c, *where: attend_part(kv, c, *where)
        out, lse = _for_each_live_part(setup, q_rows, kv[2], traced, visit, (out, lse))
        return (out, lse, next_kv), None

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, h, tl), -jnp.inf, jnp.float32), (k, v, kv_rows))
    (out, lse, _), _ = lax.scan(step, init, length=setup.size)
    return out.astype(q.dtype), lse


def _ring_bwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced, out, lse, dout):
    def grad_part(kv, carry, q_start, q_size, kv_start, kv_size):
        k, v, kv_rows = kv
        dq, dk, dv = carry
        qs = lambda x: _rows(x, q_start, q_size)
        ks = lambda x: _rows(x, kv_start, kv_size)
        part_dq, part_dk, part_dv = setup.local_bwd(
            qs(q), ks(k), ks(v), setup.mask(qs(q_rows), ks(kv_rows), traced), qs(out),
            lax.dynamic_slice_in_dim(lse, q_start, q_size, axis=2), qs(dout), scale=setup.scale)
        add = lambda total, part, start, size: lax.dynamic_update_slice_in_dim(
            total, _rows(total, start, size) + part.astype(jnp.float32), start, axis=1)
        return (add(dq, part_dq, q_start, q_size), add(dk, part_dk, kv_start, kv_size),
                add(dv, part_dv, kv_start, kv_size))

    def step(carry, _):
        dq, kv, (dk, dv) = carry
        next_kv = _rotate(setup, kv)
        visit = lambda c, *where: grad_part(kv, c, *where)
        dq, dk, dv = _for_each_live_part(setup, q_rows, kv[2], traced, visit, (dq, dk, dv))
        # dK/dV travel with their block, picking up every rank's share; after R hops they are home.
        return (dq, next_kv, _rotate(setup, (dk, dv))), None

    f32_zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    init = (f32_zeros(q), (k, v, kv_rows), (f32_zeros(k), f32_zeros(v)))
    (dq, _, (dk, dv)), _ = lax.scan(step, init, length=setup.size)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
