"""Context parallelism: attention over a sequence sharded across devices.

Runs inside `jax.shard_map`; each device holds a slice of q, k and v (and of the mask's
token_index / segment ids); the custom VJP sits outside. Four strategies (`STRATEGIES`):

- ring (over `context_axis`): K/V, with their token_index and segment ids, travel round the
  ring with `lax.ppermute` (the next block is in flight while the current one is attended).
  Partial (out, lse) merge by logsumexp. The backward rotates K/V again, recomputes each
  step's gradients from the globally merged out/lse, keeps dq local and sends dK/dV round
  with their block, so they arrive home after the last step. A mask whose window or chunk
  bounds the look-back moves only the K/V pieces that can be visible (the window-aware
  ring, below); global layers keep the full ring.
- all_gather (over `context_axis`): gather K/V (and their index/segment arrays) once, attend
  locally; the backward reduce-scatters dK/dV. Cheap when K/V are small (GQA) or the ring
  is short.
- ulysses (over `context_axis`): all-to-all from sequence-sharded to head-sharded q/k/v, so
  each device attends the whole sequence for Hq/N of the heads, then all-to-all back. The
  mask rows (token_index, segment ids; [B, L] ints) are all-gathered, so the local backend
  sees the exact global mask. Needs Hq divisible by N.
- hybrid (USP): Ulysses over `ulysses_axis` inside each ring shard, the ring over
  `context_axis` between shards. The sequence is sharded jointly over (context_axis,
  ulysses_axis), context major: device (c, u) holds piece c*U + u, so the all-to-all hands
  each Ulysses group its contiguous ring shard c.

Load balance. Ring steps skip what the mask empties: each (q shard, visiting K/V shard) tile
is cut in halves both ways and a quarter runs only if `classify_tiles` (min/max of
token_index and segment ids) finds an allowed pair in it. With causal masks, contiguous
shards leave the last rank with all the work; reorder the sequence once at the input with
`zigzag(x, axis, num_shards=ring size)` (rank r holds chunks r and 2R-1-r of 2R) and every
rank does the same 3/4 + (R-1)/2 tiles of work, about half of the dense R. Masks use explicit
token_index, so zigzag shards need no special case here, only zigzagged token_index (and
segment ids, tokens, RoPE positions). Ulysses needs no balancing (every device sees every
row); hybrid balances its ring: zigzag over the context axis size.

The window-aware ring. With zigzag, rank r's two chunks (pieces of L/2R tokens) see, under
a look-back bound b (window w: b = w-1; chunk c: b = c-1), only the pieces within b tokens
before them in natural order: first pieces of ranks r-1, r-2, ... and second pieces of
ranks r+1, r+2, ... (and near the middle rank a few first pieces from above). A *halo plan*
lists exactly those (source rank, piece) -> destination transfers, one `ppermute` per
(piece, rank shift); all are issued at once while the rank attends its own shard, and the
backward sends each halo piece's dK/dV home by the inverse permutation. Sinks (static
`sinks` > 0: the first `sinks` keys, on rank 0's first piece) travel as one small extra
piece (a psum of `sinks` rows) to the ranks whose plan lacks that piece; traced sinks get
no extra piece, so a nonzero traced sinks value takes the full ring.
- A static window/chunk (Python int) gets one plan, made at trace time.
- A traced window/chunk (SkyLadder changes it every few steps, which must not recompile) gets
  a ladder of compiled plans, for look-backs of 1, 2, 4, ... pieces, and `lax.switch` picks
  the smallest that covers the current mask. Why not a `while_loop` over ring hops with a
  traced trip count: dK/dV that travel with their K/V end H hops from home and need H more
  hops back (or the rest of the circle), and the hops run one after another; the plans
  instead send every halo piece in one round of independent ppermutes and return dK/dV by
  the inverse permutation, at the cost of at most 2x the needed halo bytes and
  log2(R) + 1 compiled branches.
The plans assume the zigzag layout, but correctness never depends on it: before attending,
every rank checks from the gathered per-piece min/max of token_index (and segment ids) that
no key outside its plan is visible, the ranks agree (pmin over the mesh), and a failing
check (contiguous or any other layout, windows wider than the ladder, traced sinks) takes
the full ring. So a bounded mask simply moves less; the result never changes.

Knows meshes, not models: callers pass the mesh axis names (the mesh module owns them).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from ctxjax.attention.backends import RESIDUAL_NAMES
from pallas_kernels.mask import EMPTY, MaskSpec, classify_tiles

STRATEGIES = ("ring", "all_gather", "ulysses", "hybrid")
_SCALARS = ("window", "chunk", "sinks")
_NO_KEY = np.iinfo(np.int32).max // 2  # token_index of filler keys: after every query, never a sink


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
    traced_names: tuple  # names of window/chunk/sinks given as traced scalars
    ring_axis: str | None  # the axis the ring / all-gather runs over (None for plain Ulysses)
    ring_size: int
    ulysses_axis: str | None  # the axis Ulysses all-to-alls over (None for ring / all-gather)
    ulysses_size: int
    kv_repeat: int  # K/V heads repeated this many times before Ulysses' all-to-all (GQA)
    mesh_axes: tuple  # every mesh axis: the window-aware ring's plan choice is agreed over all
    window_aware: bool = True  # False: the ring always runs the full circle (benchmarks' baseline)

    def mask(self, q_rows, kv_rows, traced) -> MaskSpec:
        return MaskSpec(causal=self.causal, q_token_index=q_rows["index"], kv_token_index=kv_rows["index"],
                        q_segment_ids=q_rows.get("segment"), kv_segment_ids=kv_rows.get("segment"),
                        **dict(self.static_scalars), **traced)


def _check_axes(mesh, strategy, context_axis, ulysses_axis):
    if strategy not in STRATEGIES:
        raise ValueError(f"context parallelism: unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    if context_axis not in mesh.shape:
        raise ValueError(f"context parallelism: the mesh has axes {tuple(mesh.shape)} but no "
                         f"{context_axis!r} axis; build the mesh with one or pass context_axis=.")
    if strategy == "hybrid":
        if ulysses_axis is None:
            raise ValueError("context parallelism: strategy='hybrid' needs ulysses_axis= (the mesh axis the "
                             "all-to-all runs over; the ring runs over context_axis).")
        if ulysses_axis not in mesh.shape:
            raise ValueError(f"context parallelism: the mesh has axes {tuple(mesh.shape)} but no "
                             f"{ulysses_axis!r} axis; build the mesh with one or pass another ulysses_axis=.")
        if ulysses_axis == context_axis:
            raise ValueError(f"context parallelism: strategy='hybrid' needs two different axes; ulysses_axis "
                             f"and context_axis are both {context_axis!r} (for Ulysses alone use "
                             f"strategy='ulysses').")
    elif ulysses_axis is not None:
        raise ValueError(f"context parallelism: ulysses_axis={ulysses_axis!r} is used by strategy='hybrid' "
                         f"only; strategy={strategy!r} runs over context_axis. Pass ulysses_axis=None "
                         f"or strategy='hybrid'.")


def context_parallel_attention(q, k, v, mask: MaskSpec | None = None, *, mesh, strategy: str, local_fwd,
                               local_bwd, scale=None, batch_axes, head_axis: str | None, context_axis: str,
                               ulysses_axis: str | None = None, return_lse: bool = False,
                               window_aware: bool = True):
    """Attention of q [B,T,Hq,D] over k/v [B,S,Hkv,D], sequences sharded across devices.

    q, k, v are global arrays: batch sharded over `batch_axes`, heads over `head_axis`
    (axes the mesh lacks are ignored; None = replicated), and the sequence dims over
    `context_axis` (strategies ring, all_gather, ulysses) or over (`context_axis`,
    `ulysses_axis`) jointly, context major (strategy hybrid). The caller names every axis:
    this module knows no mesh axis names. `mask` arrays are sharded likewise; window / chunk /
    sinks may be traced scalars.

    local_fwd(q, k, v, mask, *, scale) -> (out, lse [B,Hq,T] f32) and
    local_bwd(q, k, v, mask, out, lse, dout, *, scale) -> (dq, dk, dv) attend one device's
    tile (any backend); local_bwd gets the globally merged out/lse and recomputes
    p = exp(s - lse).

    Ulysses (and hybrid) split the local query heads over the all-to-all axis (N devices), so
    Hq / head shards must be a multiple of N. K/V heads: when the local kv heads divide by N
    they are split without copies; otherwise (GQA with fewer kv heads than N, e.g. 2 kv heads
    over 4 devices) each kv head is repeated r = N / gcd(Hkv_local, N) times before the
    all-to-all, so every device gets the whole kv heads its query heads use. The repeat costs
    r x the local K/V shard in memory and r x the K/V bytes of the all-to-all (each device
    then holds Hkv_local*r/N full-length kv heads, at least one); dK/dV of the copies are
    summed in float32 on the way back.

    `window_aware=False` makes the ring (and hybrid's ring) run the full circle even when the
    mask bounds the look-back: the same result, more traffic. For benchmarks that compare the
    window-aware ring against the full one (tools/bench_context_parallel.py); runs keep True.

    Returns out [B,T,Hq,D] (q.dtype), and lse [B,Hq,T] float32 when `return_lse`. The lse is
    returned for inspection and merging only: no gradient flows through it.
    """
    _check_axes(mesh, strategy, context_axis, ulysses_axis)
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"context parallelism expects q [B,T,Hq,D] and k = v [B,S,Hkv,D] with the same B "
                         f"and D; got q {q.shape}, k {k.shape}, v {v.shape}.")
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}).")

    batch_axes = tuple(a for a in (batch_axes or ()) if a in mesh.shape)
    head_axis = head_axis if head_axis in mesh.shape else None
    context_size = mesh.shape[context_axis]
    a2a_axis = {"ulysses": context_axis, "hybrid": ulysses_axis}.get(strategy)
    a2a_size = mesh.shape[a2a_axis] if a2a_axis else 1
    seq_axes = (context_axis, ulysses_axis) if strategy == "hybrid" else context_axis
    seq_shards = context_size * (a2a_size if strategy == "hybrid" else 1)
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    head_shards = mesh.shape[head_axis] if head_axis else 1
    for what, n, shards, fix in (
            ("batch", b, batch_shards, f"use a batch that is a multiple of {batch_shards} (the {batch_axes} axes)"),
            ("query length", t, seq_shards, f"pad the sequence to a multiple of {seq_shards}"),
            ("key length", s, seq_shards, f"pad the sequence to a multiple of {seq_shards}"),
            ("query heads", hq, head_shards, f"shrink the {head_axis!r} axis or pass head_axis=None"),
            ("key/value heads", hkv, head_shards,
             f"repeat K/V heads to a multiple of {head_shards}, shrink the {head_axis!r} axis or pass head_axis=None")):
        if n % shards:
            raise ValueError(f"context parallelism: {what} {n} does not split over {shards} devices; {fix}.")
    local_hq, local_hkv = hq // head_shards, hkv // head_shards
    if local_hq % a2a_size:
        raise ValueError(
            f"context parallelism: strategy={strategy!r} splits the {local_hq} query heads of each device "
            f"(Hq={hq} over {head_shards} {head_axis!r} shards) over the {a2a_size} devices of the {a2a_axis!r} "
            f"all-to-all; use a multiple of {a2a_size * head_shards} query heads, a smaller {a2a_axis!r} axis, "
            f"or strategy='ring' / 'all_gather'.")
    kv_repeat = a2a_size // math.gcd(local_hkv, a2a_size)

    mask = (MaskSpec() if mask is None else mask).resolved(b, t, s)
    q_rows = {"index": mask.q_token_index}
    kv_rows = {"index": mask.kv_token_index}
    if mask.has_segments:
        q_rows["segment"], kv_rows["segment"] = mask.q_segment_ids, mask.kv_segment_ids
    is_static = lambda x: x is None or isinstance(x, (int, np.integer))
    static = tuple((n, getattr(mask, n)) for n in _SCALARS if is_static(getattr(mask, n)))
    traced = {n: jnp.asarray(getattr(mask, n), jnp.int32) for n in _SCALARS if not is_static(getattr(mask, n))}
    ring_axis = None if strategy == "ulysses" else context_axis
    setup = _Setup(local_fwd, local_bwd, d ** -0.5 if scale is None else scale, mask.causal, static,
                   tuple(traced), ring_axis, context_size if ring_axis else 1, a2a_axis, a2a_size, kv_repeat,
                   tuple(mesh.axis_names), bool(window_aware))

    batch_spec = batch_axes or None
    seq_spec = P(batch_spec, seq_axes, head_axis, None)
    lse_spec = P(batch_spec, head_axis, seq_axes)
    row_spec = P(batch_spec, seq_axes)
    in_specs = (seq_spec, seq_spec, seq_spec, {n: row_spec for n in q_rows}, {n: row_spec for n in kv_rows},
                {n: P() for n in traced})
    fwd_local, bwd_local = _strategy_halves(strategy)
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
        saved = tuple(checkpoint_name(x, name) for x, name in zip((out, lse), RESIDUAL_NAMES))
        return (out, lse), (*args, *saved)

    def attend_bwd(residuals, cotangents):
        dout, _ = cotangents  # lse is stop_gradient-ed below, so its cotangent is zero
        dout = _match_specs(mesh, dout, seq_spec)
        dq, dk, dv = sharded_bwd(*residuals, dout)
        no_grad = lambda tree: jax.tree.map(lambda x: np.zeros(np.shape(x), jax.dtypes.float0), tree)
        return dq, dk, dv, no_grad(residuals[3]), no_grad(residuals[4]), no_grad(residuals[5])

    attend.defvjp(attend_fwd, attend_bwd)
    args = _match_specs(mesh, (q, k, v, q_rows, kv_rows, traced), in_specs)
    out, lse = attend(*args)
    return (out, lax.stop_gradient(lse)) if return_lse else out


def _match_specs(mesh, tree, specs):
    """On a mesh with Explicit axes, shard_map takes only inputs already sharded as its specs:
    reshard them (a no-op for inputs that are). Auto axes need nothing."""
    if jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
        return tree
    return jax.tree.map(lambda x, spec: jax.reshard(x, jax.sharding.NamedSharding(mesh, spec)), tree, specs)


def _strategy_halves(strategy: str):
    """(fwd, bwd) device-local functions of a strategy, each f(setup, q, k, v, q_rows, kv_rows,
    traced[, out, lse, dout]). Hybrid is Ulysses around the ring."""
    if strategy == "ring":
        return _ring_fwd, _ring_bwd
    if strategy == "all_gather":
        return _gather_fwd, _gather_bwd
    inner_fwd, inner_bwd = (_local_fwd, _local_bwd) if strategy == "ulysses" else (_ring_fwd, _ring_bwd)
    return (lambda setup, *a: _ulysses_fwd(setup, inner_fwd, *a),
            lambda setup, *a: _ulysses_bwd(setup, inner_bwd, *a))


# ---------------------------------------------------------------------------- local attention

def _local_fwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced):
    """The whole (q, k, v) on this device: Ulysses' inner step."""
    out, lse = setup.local_fwd(q, k, v, setup.mask(q_rows, kv_rows, traced), scale=setup.scale)
    return out.astype(q.dtype), lse.astype(jnp.float32)


def _local_bwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced, out, lse, dout):
    dq, dk, dv = setup.local_bwd(q, k, v, setup.mask(q_rows, kv_rows, traced), out, lse, dout,
                                 scale=setup.scale)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ---------------------------------------------------------------------------- all-gather

def _gather(setup: _Setup, tree):
    return jax.tree.map(lambda x: lax.all_gather(x, setup.ring_axis, axis=1, tiled=True), tree)


def _gather_fwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced):
    k, v, kv_rows = _gather(setup, (k, v, kv_rows))
    return _local_fwd(setup, q, k, v, q_rows, kv_rows, traced)


def _gather_bwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced, out, lse, dout):
    k_all, v_all, kv_rows = _gather(setup, (k, v, kv_rows))  # gather again rather than keep S-long K/V
    dq, dk, dv = setup.local_bwd(q, k_all, v_all, setup.mask(q_rows, kv_rows, traced), out, lse, dout,
                                 scale=setup.scale)
    # Sum the R partial dK/dV in float32, each device keeping its own sequence slice.
    scatter = lambda x, like: lax.psum_scatter(x.astype(jnp.float32), setup.ring_axis, scatter_dimension=1,
                                               tiled=True).astype(like.dtype)
    return dq.astype(q.dtype), scatter(dk, k), scatter(dv, v)


# ---------------------------------------------------------------------------- Ulysses

def _to_heads(setup: _Setup, x):
    """[B, L/N, H, D] sequence-sharded -> [B, L, H/N, D] head-sharded (shards concatenated in
    axis order: the global sequence order, zigzagged or not)."""
    return lax.all_to_all(x, setup.ulysses_axis, split_axis=2, concat_axis=1, tiled=True)


def _to_sequence(setup: _Setup, x):
    """Inverse of `_to_heads`."""
    return lax.all_to_all(x, setup.ulysses_axis, split_axis=1, concat_axis=2, tiled=True)


def _lse_to_heads(setup: _Setup, lse):  # [B, H, L/N] -> [B, H/N, L]
    return lax.all_to_all(lse, setup.ulysses_axis, split_axis=1, concat_axis=2, tiled=True)


def _lse_to_sequence(setup: _Setup, lse):  # [B, H/N, L] -> [B, H, L/N]
    return lax.all_to_all(lse, setup.ulysses_axis, split_axis=2, concat_axis=1, tiled=True)


def _gather_rows(setup: _Setup, rows):
    """token_index / segment ids of the whole (Ulysses-group) sequence, in the all-to-all's order."""
    return jax.tree.map(lambda x: lax.all_gather(x, setup.ulysses_axis, axis=1, tiled=True), rows)


def _repeat_kv(setup: _Setup, x):
    """Repeat each kv head `kv_repeat` times (adjacent copies), so the all-to-all hands every
    device whole kv heads for its query heads: query head i uses copy i // (G / kv_repeat)."""
    return x if setup.kv_repeat == 1 else jnp.repeat(x, setup.kv_repeat, axis=2)


def _sum_repeats(setup: _Setup, dx, like):
    if setup.kv_repeat == 1:
        return dx.astype(like.dtype)
    b, length, heads, d = dx.shape
    summed = dx.astype(jnp.float32).reshape(b, length, heads // setup.kv_repeat, setup.kv_repeat, d).sum(3)
    return summed.astype(like.dtype)


def _ulysses_fwd(setup: _Setup, inner_fwd, q, k, v, q_rows, kv_rows, traced):
    """All-to-all to head shards, `inner_fwd` on whole sequences (or ring shards, for hybrid),
    all-to-all back."""
    q, k, v = (_to_heads(setup, x) for x in (q, _repeat_kv(setup, k), _repeat_kv(setup, v)))
    out, lse = inner_fwd(setup, q, k, v, _gather_rows(setup, q_rows), _gather_rows(setup, kv_rows), traced)
    return _to_sequence(setup, out), _lse_to_sequence(setup, lse)


def _ulysses_bwd(setup: _Setup, inner_bwd, q, k, v, q_rows, kv_rows, traced, out, lse, dout):
    """The mirror: the residuals go to head shards again (rather than keeping L-long copies
    between the passes), the gradients come back to sequence shards."""
    heads = lambda x: _to_heads(setup, x)
    dq, dk, dv = inner_bwd(setup, heads(q), heads(_repeat_kv(setup, k)), heads(_repeat_kv(setup, v)),
                           _gather_rows(setup, q_rows), _gather_rows(setup, kv_rows), traced, heads(out),
                           _lse_to_heads(setup, lse), heads(dout))
    return (_to_sequence(setup, dq), _sum_repeats(setup, _to_sequence(setup, dk), k),
            _sum_repeats(setup, _to_sequence(setup, dv), v))


# ---------------------------------------------------------------------------- ring: shared parts

def _rotate(setup: _Setup, tree):
    """Send to the next rank: after step i, rank r holds the K/V block of rank r - i."""
    perm = [(i, (i + 1) % setup.ring_size) for i in range(setup.ring_size)]
    return jax.tree.map(lambda x: lax.ppermute(x, setup.ring_axis, perm), tree)


def _rows(tree, start, size):
    return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, size, axis=1), tree)


def _parts(length: int) -> int:
    return 2 if length % 2 == 0 else 1


def _for_each_live_part(setup: _Setup, q_rows, kv_rows, traced, visit, carry, kv_size=None, kv_live=None):
    """Cut the (q shard x K/V block) tile into parts and fold `visit(carry, q_start, q_size,
    kv_start, kv_size)` over the parts that hold an allowed pair, skipping the rest.

    The q shard is cut in halves, the K/V block in halves too or, given `kv_size`, in pieces
    of that length (`kv_live` [pieces] then marks pieces that hold real keys). Halves because
    zigzag shards are two chunks: under a causal mask, every step but the diagonal one leaves
    exactly two of the four parts empty. The test is conservative (`classify_tiles`, from
    min/max of token_index and segment ids), so it never drops an allowed pair. One scan over
    the parts keeps a single copy of the local kernel.
    """
    b, tl = q_rows["index"].shape
    sl = kv_rows["index"].shape[1]
    q_parts = _parts(tl)
    q_size, kv_size = tl // q_parts, kv_size or sl // _parts(sl)
    kv_parts = sl // kv_size
    tiles = classify_tiles(setup.mask(q_rows, kv_rows, traced), b, tl, sl, q_size, kv_size)
    live = (tiles != EMPTY).any(axis=0)  # any allowed pair in the local batch: [q parts, kv parts]
    if kv_live is not None:
        live &= kv_live[None, :]
    live = live.reshape(-1)

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


def _attend_block(setup: _Setup, q, q_rows, kv, traced, carry, **pieces):
    """Fold one K/V block (k, v, rows) into the running (out, lse) f32 accumulators."""
    k, v, kv_rows = kv

    def attend_part(carry, q_start, q_size, kv_start, kv_size):
        out, lse = carry
        qs = lambda x: _rows(x, q_start, q_size)
        ks = lambda x: _rows(x, kv_start, kv_size)
        part_out, part_lse = setup.local_fwd(qs(q), ks(k), ks(v), setup.mask(qs(q_rows), ks(kv_rows), traced),
                                             scale=setup.scale)
        new_out, new_lse = _merge(qs(out), lax.dynamic_slice_in_dim(lse, q_start, q_size, axis=2),
                                  part_out, part_lse)
        return (lax.dynamic_update_slice_in_dim(out, new_out, q_start, axis=1),
                lax.dynamic_update_slice_in_dim(lse, new_lse, q_start, axis=2))

    return _for_each_live_part(setup, q_rows, kv_rows, traced, attend_part, carry, **pieces)


def _grad_block(setup: _Setup, q, q_rows, kv, traced, out, lse, dout, carry, **pieces):
    """Add one K/V block's gradients into the (dq, dk, dv) f32 accumulators (dk/dv: the block's)."""
    k, v, kv_rows = kv

    def grad_part(carry, q_start, q_size, kv_start, kv_size):
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

    return _for_each_live_part(setup, q_rows, kv_rows, traced, grad_part, carry, **pieces)


def _empty_out(q):
    b, tl, h, _ = q.shape
    return jnp.zeros(q.shape, jnp.float32), jnp.full((b, h, tl), -jnp.inf, jnp.float32)


def _f32_zeros(x):
    return jnp.zeros(x.shape, jnp.float32)


# ---------------------------------------------------------------------------- ring: the full circle

def _full_ring_fwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced):
    def step(carry, _):
        out, lse, kv = carry
        # The next block is in flight while this one is attended. The last hop is spare (it
        # brings K/V home); keeping it makes every step alike, so the step compiles once.
        next_kv = _rotate(setup, kv)
        out, lse = _attend_block(setup, q, q_rows, kv, traced, (out, lse))
        return (out, lse, next_kv), None

    (out, lse, _), _ = lax.scan(step, (*_empty_out(q), (k, v, kv_rows)), length=setup.ring_size)
    return out.astype(q.dtype), lse


def _full_ring_bwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced, out, lse, dout):
    def step(carry, _):
        dq, kv, (dk, dv) = carry
        next_kv = _rotate(setup, kv)
        dq, dk, dv = _grad_block(setup, q, q_rows, kv, traced, out, lse, dout, (dq, dk, dv))
        # dK/dV travel with their block, picking up every rank's share; after R hops they are home.
        return (dq, next_kv, _rotate(setup, (dk, dv))), None

    init = (_f32_zeros(q), (k, v, kv_rows), (_f32_zeros(k), _f32_zeros(v)))
    (dq, _, (dk, dv)), _ = lax.scan(step, init, length=setup.ring_size)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ---------------------------------------------------------------------------- ring: halo plans

@dataclasses.dataclass(frozen=True)
class _HaloPlan:
    """The K/V pieces (halves of a ring shard, zigzag layout) each rank attends besides its
    own under a bounded look-back, as static transfers."""
    slots: tuple  # ((piece, ((src, dst), ...)), ...): one ppermute each, a piece per pair
    receives: tuple  # [R][slots] bool: rank r gets a real piece in slot i (others get zeros)
    sink_rows: int  # rows of rank 0's first piece shared as sinks (0: none)
    sink_users: tuple  # [R] bool: ranks that attend the sink rows (those not otherwise given them)
    unseen: tuple  # [R][2R] bool: pieces (rank-major) rank r attends in no way; they must be invisible

    @property
    def num_pieces(self) -> int:
        """Halo pieces every rank holds (slots, received or not, and the sinks)."""
        return len(self.slots) + bool(self.sink_rows)

    @property
    def most_pieces(self) -> int:
        """Most pieces any rank receives (the sinks count as one)."""
        return max(sum(got) + user for got, user in zip(self.receives, self.sink_users))


def _may_see(q_span, k_span, window, chunk) -> bool:
    """Could a query in [q_lo, q_hi] see a key in [k_lo, k_hi] (causal, window, chunk; not sinks)?
    Conservative in the same way as `classify_tiles`."""
    (q_lo, q_hi), (k_lo, k_hi) = q_span, k_span
    seen = k_lo <= q_hi
    if window is not None:
        seen &= q_lo - k_hi < window
    if chunk is not None:
        seen &= k_hi >= (q_lo // chunk) * chunk
    return bool(seen)


@functools.lru_cache(maxsize=None)
def _halo_plan(ring_size: int, piece_len: int, window, chunk, sink_rows: int) -> _HaloPlan:
    """Plan for a causal self-attention whose keys are in zigzag order: rank r holds natural
    chunks r and 2R-1-r, each one piece."""
    def span(rank, piece):  # first and last position of a piece
        chunk_index = rank if piece == 0 else 2 * ring_size - 1 - rank
        return chunk_index * piece_len, (chunk_index + 1) * piece_len - 1

    needs = lambda dst, src, piece: src != dst and any(
        _may_see(span(dst, q_piece), span(src, piece), window, chunk) for q_piece in (0, 1))
    groups = {}  # (piece, dst - src) -> pairs: one source and one destination per rank, a valid ppermute
    for dst in range(ring_size):
        for src in range(ring_size):
            for piece in (0, 1):
                if needs(dst, src, piece):
                    groups.setdefault((piece, dst - src), []).append((src, dst))
    slots = tuple((piece, tuple(pairs)) for (piece, _), pairs in sorted(groups.items()))
    receives = tuple(tuple(any(d == r for _, d in pairs) for _, pairs in slots) for r in range(ring_size))
    delivered = [[src == r or needs(r, src, piece) for src in range(ring_size) for piece in (0, 1)]
                 for r in range(ring_size)]
    sink_users = tuple(bool(sink_rows) and r != 0 and not delivered[r][0] for r in range(ring_size))
    unseen = tuple(tuple(not seen for seen in row) for row in delivered)
    return _HaloPlan(slots, receives, sink_rows, sink_users, unseen)


def _halo_plans(setup: _Setup, q_len: int, kv_len: int) -> tuple:
    """The halo plans worth compiling for this mask: each moves fewer pieces to every rank than
    the full ring's 2(R-1) and holds at most R halo pieces (L/2 tokens of K/V, half of what
    all-gather holds). () keeps the plain full ring (global layers, non-causal masks,
    cross-attention, or `window_aware=False`)."""
    ring = setup.ring_size
    if not setup.window_aware or ring == 1 or not setup.causal or q_len != kv_len or kv_len % 2:
        return ()
    static = dict(setup.static_scalars)
    piece_len = kv_len // 2
    sink_rows = min(static.get("sinks") or 0, piece_len)  # traced sinks: no sink piece
    if static.get("window") is not None or static.get("chunk") is not None:
        bounds = [(static.get("window"), static.get("chunk"))]  # a traced term can only shrink the mask
    elif {"window", "chunk"} & set(setup.traced_names):
        # The ladder for traced look-backs: 1, 2, 4, ... pieces back.
        bounds = [(2 ** i * piece_len + 1, None) for i in range(int(math.log2(2 * ring)) + 1)]
    else:
        return ()
    plans = []
    for window, chunk in bounds:
        plan = _halo_plan(ring, piece_len, window, chunk, sink_rows)
        if plan.most_pieces < 2 * (ring - 1) and plan.num_pieces <= ring and plan not in plans:
            plans.append(plan)
    return tuple(plans)


def _piece_bounds(rows, hidden):
    """(min, max) of each row array over each half of the shard, skipping `hidden` [2, L/2]
    positions: [B, 4] per array, laid out as rows that `classify_tiles` reads in blocks of 2."""
    def bounds(x):
        b, length = x.shape
        halves = x.reshape(b, 2, length // 2)
        lo = jnp.where(hidden, _NO_KEY, halves).min(-1)
        hi = jnp.where(hidden, -_NO_KEY, halves).max(-1)
        return jnp.stack([lo, hi], axis=-1).reshape(b, 4)
    return jax.tree.map(bounds, rows)


def _choose_plan(setup: _Setup, plans, q_rows, kv_rows, traced):
    """Index of the first plan under which no key outside the plan is visible, or len(plans)
    (the full ring); decided from per-piece min/max, the same on every device."""
    rank = lax.axis_index(setup.ring_axis)
    piece_len = kv_rows["index"].shape[1] // 2
    sink_rows = plans[0].sink_rows  # the same for every plan of one mask
    # Rank 0's sink rows reach every rank that needs them as the sink piece: check the rest.
    sink_hidden = (jnp.arange(2)[:, None] == 0) & (jnp.arange(piece_len)[None] < sink_rows) & (rank == 0)
    q_bounds = _piece_bounds(q_rows, jnp.zeros((2, q_rows["index"].shape[1] // 2), bool))
    kv_bounds = jax.tree.map(lambda x: lax.all_gather(x, setup.ring_axis, axis=1, tiled=True),
                             _piece_bounds(kv_rows, sink_hidden))
    b = q_bounds["index"].shape[0]
    tiles = classify_tiles(setup.mask(q_bounds, kv_bounds, traced), b, 4, 4 * setup.ring_size, 2, 2)
    visible = (tiles != EMPTY).any(axis=(0, 1))  # [2R] pieces, rank-major
    covers = jnp.stack([~(visible & jnp.asarray(plan.unseen)[rank]).any() for plan in plans])
    covers = lax.pmin(covers.astype(jnp.int32), setup.mesh_axes)  # every device takes the same branch
    choice = jnp.int32(len(plans))
    for i in reversed(range(len(plans))):
        choice = jnp.where(covers[i] > 0, i, choice)
    return choice


# ---------------------------------------------------------------------------- ring: the halo

def _sink_piece(setup: _Setup, kv, rank, sink_rows: int, piece_len: int):
    """Rank 0's first `sink_rows` keys on every rank (a psum of rank 0's copy), padded to a
    piece with filler keys no query sees (token_index after every query, segment 0)."""
    shared = jax.tree.map(lambda x: lax.psum(jnp.where(rank == 0, x, jnp.zeros_like(x)), setup.ring_axis),
                          _rows(kv, 0, sink_rows))
    k, v, rows = shared
    pad = piece_len - sink_rows
    pad_keys = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    fill = {"index": _NO_KEY, "segment": 0}
    rows = {n: jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill[n]) for n, x in rows.items()}
    return pad_keys(k), pad_keys(v), rows


def _fetch_halo(setup: _Setup, plan: _HaloPlan, kv, rank):
    """Every halo piece at once -> ((k, v, rows) of [B, pieces * L/2, ...], live [pieces]), or
    None when the plan needs nothing beyond the own shard."""
    piece_len = kv[0].shape[1] // 2
    pieces = [jax.tree.map(lambda x: lax.ppermute(x, setup.ring_axis, pairs), _rows(kv, piece * piece_len, piece_len))
              for piece, pairs in plan.slots]
    live = [jnp.asarray(plan.receives, bool).reshape(setup.ring_size, -1)[rank]]
    if plan.sink_rows:
        pieces.append(_sink_piece(setup, kv, rank, plan.sink_rows, piece_len))
        live.append(jnp.asarray(plan.sink_users)[rank][None])
    if not pieces:
        return None
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *pieces), jnp.concatenate(live)


def _send_halo_grads_home(setup: _Setup, plan: _HaloPlan, grads, halo_grads, rank):
    """Add each halo piece's dK/dV into its owner's (the inverse permutation; sinks by psum)."""
    piece_len = grads[0].shape[1] // 2
    add_rows = lambda x, part, start: lax.dynamic_update_slice_in_dim(
        x, _rows(x, start, part.shape[1]) + part, start, axis=1)
    for i, (piece, pairs) in enumerate(plan.slots):
        back = tuple((dst, src) for src, dst in pairs)
        home = [lax.ppermute(_rows(g, i * piece_len, piece_len), setup.ring_axis, back) for g in halo_grads]
        grads = [add_rows(g, h, piece * piece_len) for g, h in zip(grads, home)]
    if plan.sink_rows:
        start = len(plan.slots) * piece_len
        sinks = [lax.psum(_rows(g, start, plan.sink_rows), setup.ring_axis) for g in halo_grads]
        grads = [add_rows(g, jnp.where(rank == 0, s, 0.0), 0) for g, s in zip(grads, sinks)]
    return grads


def _halo_fwd(setup: _Setup, plan: _HaloPlan, q, k, v, q_rows, kv_rows, traced):
    rank = lax.axis_index(setup.ring_axis)
    kv = (k, v, kv_rows)
    halo = _fetch_halo(setup, plan, kv, rank)
    # The own shard needs no transfer: it is attended while the halo pieces are in flight.
    out, lse = _attend_block(setup, q, q_rows, kv, traced, _empty_out(q))
    if halo is not None:
        halo_kv, live = halo
        out, lse = _attend_block(setup, q, q_rows, halo_kv, traced, (out, lse), kv_size=k.shape[1] // 2,
                                 kv_live=live)
    return out.astype(q.dtype), lse


def _halo_bwd(setup: _Setup, plan: _HaloPlan, q, k, v, q_rows, kv_rows, traced, out, lse, dout):
    rank = lax.axis_index(setup.ring_axis)
    kv = (k, v, kv_rows)
    halo = _fetch_halo(setup, plan, kv, rank)
    grads = (_f32_zeros(q), _f32_zeros(k), _f32_zeros(v))
    dq, dk, dv = _grad_block(setup, q, q_rows, kv, traced, out, lse, dout, grads)
    if halo is not None:
        halo_kv, live = halo
        halo_zeros = _f32_zeros(halo_kv[0])
        dq, halo_dk, halo_dv = _grad_block(setup, q, q_rows, halo_kv, traced, out, lse, dout,
                                           (dq, halo_zeros, halo_zeros), kv_size=k.shape[1] // 2, kv_live=live)
        dk, dv = _send_halo_grads_home(setup, plan, (dk, dv), (halo_dk, halo_dv), rank)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ---------------------------------------------------------------------------- ring: dispatch

def _ring_fwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced):
    """The halo plans when the mask bounds the look-back, else (or when no plan covers the
    mask at run time) the full ring."""
    plans = _halo_plans(setup, q.shape[1], k.shape[1])
    if not plans:
        return _full_ring_fwd(setup, q, k, v, q_rows, kv_rows, traced)
    branches = [functools.partial(_halo_fwd, setup, plan) for plan in plans] + [functools.partial(_full_ring_fwd, setup)]
    return lax.switch(_choose_plan(setup, plans, q_rows, kv_rows, traced), branches,
                      q, k, v, q_rows, kv_rows, traced)


def _ring_bwd(setup: _Setup, q, k, v, q_rows, kv_rows, traced, out, lse, dout):
    plans = _halo_plans(setup, q.shape[1], k.shape[1])
    if not plans:
        return _full_ring_bwd(setup, q, k, v, q_rows, kv_rows, traced, out, lse, dout)
    branches = [functools.partial(_halo_bwd, setup, plan) for plan in plans] + [functools.partial(_full_ring_bwd, setup)]
    return lax.switch(_choose_plan(setup, plans, q_rows, kv_rows, traced), branches,
                      q, k, v, q_rows, kv_rows, traced, out, lse, dout)
