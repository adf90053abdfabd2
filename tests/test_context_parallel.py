"""Context parallelism (ring / all-gather, zigzag) against single-device reference attention."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType

from pallas_kernels.blockwise import blockwise_attention_bwd, blockwise_attention_fwd
from ctxjax.attention.context_parallel import (
    STRATEGIES, context_parallel_attention, unzigzag, zigzag, zigzag_order)
from pallas_kernels.mask import MaskSpec
from pallas_kernels.reference import attention_reference

AXES = ("data", "fsdp", "tensor", "context")
B, T, HQ, HKV, D = 2, 128, 4, 2, 16


def make_mesh(shape):
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def documents(rng, b, t):
    """Random document lengths (boundaries land anywhere, across shard boundaries too);
    row 0 ends in padding (segment 0), so some query rows have no key at all."""
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=4, replace=False))
        seg[row] = np.searchsorted(cuts, np.arange(t), side="right") + 1
    seg[0, -11:] = 0
    return seg


def assert_matches(got, want, what, atol=5e-5, rtol=1e-4):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{what}: NaN or inf"
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


def assert_lse_matches(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert not np.isnan(got).any(), f"{what}: NaN"
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"{what}: -inf rows differ")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=5e-5, rtol=1e-5, err_msg=what)


def inputs(rng, b=B, t=T, s=T, hq=HQ, hkv=HKV, d=D, dtype=jnp.float32):
    shapes = [(b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d), (b, t, hq, d)]
    return [jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes]  # q, k, v, loss weights


# The mask terms enter as traced values, so one compilation per (mesh, strategy, zigzag) covers
# every case: a window or chunk of T, segments all 1 and zero sinks are no-ops.
MASK_CASES = {
    "causal": dict(documents=False, window=T, chunk=T, sinks=0),
    "documents": dict(documents=True, window=T, chunk=T, sinks=0),
    "window": dict(documents=False, window=24, chunk=T, sinks=0),
    "chunk": dict(documents=False, window=T, chunk=48, sinks=0),
    "sinks+window": dict(documents=False, window=20, chunk=T, sinks=5),
    "all terms": dict(documents=True, window=40, chunk=64, sinks=3),
}


def _reference_loss(q, k, v, w, seg, window, chunk, sinks):
    mask = MaskSpec(causal=True, q_segment_ids=seg, window=window, chunk=chunk, sinks=sinks)
    out, lse = attention_reference(q, k, v, mask, return_lse=True)
    return jnp.sum(out * w), (out, lse)


# Single device, natural order; compiled once for every mesh / strategy / zigzag case.
reference_loss_and_grads = jax.jit(jax.value_and_grad(_reference_loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("use_zigzag", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh_shape", [(1, 1, 1, 8), (2, 1, 1, 4), (1, 1, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_matches_single_device_reference(mesh_shape, strategy, use_zigzag):
    rng = np.random.default_rng(zlib.crc32(repr((mesh_shape, strategy, use_zigzag)).encode()))
    mesh = make_mesh(mesh_shape)
    ring = mesh_shape[3]
    # The (2,1,1,4) case goes through the abstract mesh of `jax.set_mesh`, as the dispatcher does.
    mesh_arg = mesh.abstract_mesh if mesh_shape == (2, 1, 1, 4) else mesh
    reorder = (lambda x, axis=1: zigzag(x, axis, ring)) if use_zigzag else (lambda x, axis=1: x)
    restore = (lambda x, axis=1: unzigzag(x, axis, ring)) if use_zigzag else (lambda x, axis=1: x)
    position = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def cp_loss(q, k, v, w, seg, window, chunk, sinks):
        index = reorder(position)  # zigzag shards carry their true positions; the mask needs nothing else
        mask = MaskSpec(causal=True, q_segment_ids=reorder(seg), q_token_index=index, kv_token_index=index,
                        window=window, chunk=chunk, sinks=sinks)
        out, lse = context_parallel_attention(
            reorder(q), reorder(k), reorder(v), mask, mesh=mesh_arg, strategy=strategy,
            local_fwd=blockwise_attention_fwd, local_bwd=blockwise_attention_bwd, return_lse=True)
        return jnp.sum(out * reorder(w)), (restore(out), restore(lse, 2))

    cp = jax.jit(jax.value_and_grad(cp_loss, argnums=(0, 1, 2), has_aux=True))
    for name, case in MASK_CASES.items():
        q, k, v, w = inputs(rng)
        seg = documents(rng, B, T) if case["documents"] else np.ones((B, T), np.int32)
        args = (q, k, v, w, seg, *(np.int32(case[n]) for n in ("window", "chunk", "sinks")))
        with jax.set_mesh(mesh):
            (_, (out, lse)), grads = cp(*args)
        (_, (ref_out, ref_lse)), ref_grads = reference_loss_and_grads(*args)
        assert_matches(out, ref_out, f"{name}: out")
        assert_lse_matches(lse, ref_lse, f"{name}: lse")
        for grad_name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_matches(got, want, f"{name}: {grad_name}")
        if case["documents"] and not case["sinks"]:
            assert np.isneginf(np.asarray(lse)[0, :, -11:]).all()  # padding rows: no keys, lse = -inf


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_static_terms_cross_attention_bfloat16(strategy):
    """Python-int mask terms, no segments, queries at the end of a longer key sequence (T != S),
    bfloat16 inputs, heads replicated (head_axis=None)."""
    rng = np.random.default_rng(7)
    mesh = make_mesh((2, 1, 1, 4))
    t, s = 64, 128
    q, k, v, w = inputs(rng, t=t, s=s, hq=4, hkv=1, dtype=jnp.bfloat16)
    q_index = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (B, t))
    mask = MaskSpec(causal=True, q_token_index=q_index, window=50, sinks=4)

    def loss(attend):
        def f(q, k, v):
            out, lse = attend(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), (out, lse)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    cp = loss(lambda q, k, v: context_parallel_attention(
        q, k, v, mask, mesh=mesh, strategy=strategy, head_axis=None, local_fwd=blockwise_attention_fwd,
        local_bwd=blockwise_attention_bwd, return_lse=True))
    # The reference sees the same bfloat16-rounded numbers, in float32.
    ref = loss(lambda q, k, v: attention_reference(q, k, v, mask, return_lse=True))
    (_, (out, lse)), grads = cp(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    (_, (ref_out, ref_lse)), ref_grads = ref(f32(q), f32(k), f32(v))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert_matches(out, ref_out, "out", atol=2e-2, rtol=2e-2)
    assert_lse_matches(lse, ref_lse, "lse")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_matches(got, want, name, atol=3e-2 * float(jnp.abs(want).max()), rtol=2e-2)


def test_ring_skips_masked_steps():
    """Count the tile area each rank actually attends, forward and backward. Tiles are cut in
    quarters; causal zigzag does 3/4 + (R-1)/2 tiles on every rank (balanced, about half of R);
    contiguous shards leave rank r with r + 3/4 (the last rank does nearly all R)."""
    ring, t = 8, 128
    tile = (t // ring) ** 2
    mesh = make_mesh((1, 1, 1, ring))
    work = {}

    def counting(kind, local):
        def wrapped(q, k, *args, **kwargs):
            area = q.shape[1] * k.shape[1]
            record = lambda rank: work.setdefault((kind, int(rank)), []).append(area)
            jax.debug.callback(record, lax.axis_index("context"))  # runs only when the step runs
            return local(q, k, *args, **kwargs)
        return wrapped

    q, k, v, w = inputs(np.random.default_rng(3), b=1, t=t, s=t, hq=1, hkv=1, d=8)
    for use_zigzag in (True, False):
        order = zigzag_order(t, ring) if use_zigzag else np.arange(t)
        mask = MaskSpec(causal=True, q_token_index=order, kv_token_index=order)

        def loss(q, k, v):
            out = context_parallel_attention(
                q, k, v, mask, mesh=mesh, strategy="ring", head_axis=None,
                local_fwd=counting("fwd", blockwise_attention_fwd), local_bwd=counting("bwd", blockwise_attention_bwd))
            return jnp.sum(out * w)

        work.clear()
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        jax.block_until_ready(grads)
        jax.effects_barrier()
        tiles = {key: sum(areas) / tile for key, areas in work.items()}
        for kind in ("fwd", "bwd"):
            per_rank = [tiles.get((kind, r), 0.0) for r in range(ring)]
            expected = [0.75 + (ring - 1) / 2] * ring if use_zigzag else [r + 0.75 for r in range(ring)]
            assert per_rank == expected, (use_zigzag, kind, per_rank)


def test_zigzag_layout_and_inverse():
    rng = np.random.default_rng(0)
    for length, shards in ((16, 4), (96, 8), (10, 1), (12, 2)):
        order = zigzag_order(length, shards)
        chunk = length // (2 * shards)
        assert sorted(order) == list(range(length))
        per_shard = order.reshape(shards, -1)
        for r, positions in enumerate(per_shard):
            assert set(positions // chunk) == {r, 2 * shards - 1 - r}
            assert (np.diff(positions) > 0).all()
        # Causal work balance: every shard's queries see the same number of keys.
        assert len({int((positions + 1).sum()) for positions in per_shard}) == 1

    x = rng.standard_normal((3, 32, 5)).astype(np.float32)
    for xs in (x, jnp.asarray(x)):
        y = zigzag(xs, 1, 4)
        assert type(y) is type(xs)
        np.testing.assert_array_equal(np.asarray(unzigzag(y, 1, 4)), x)
    np.testing.assert_array_equal(zigzag(x, 1, 4), x[:, zigzag_order(32, 4)])
    np.testing.assert_array_equal(zigzag(x, 2, 1), x)  # one shard, any length: nothing moves
    with pytest.raises(ValueError, match="multiple of 2 x 3"):
        zigzag_order(20, 3)
    with pytest.raises(ValueError, match="positive int"):
        zigzag_order(16, 0)


def test_bad_inputs_name_the_fix():
    mesh = make_mesh((2, 1, 2, 2))
    rng = np.random.default_rng(1)
    q, k, v, _ = inputs(rng, t=64, s=64)
    call = lambda q, k, v, **kw: context_parallel_attention(
        q, k, v, MaskSpec(), mesh=mesh, local_fwd=blockwise_attention_fwd, local_bwd=blockwise_attention_bwd, **kw)
    with pytest.raises(ValueError, match="unknown strategy"):
        call(q, k, v, strategy="tree")
    with pytest.raises(ValueError, match="no 'seq' axis"):
        call(q, k, v, context_axis="seq")
    with pytest.raises(ValueError, match="pad the sequence to a multiple of 2"):
        call(q[:, :63], k[:, :63], v[:, :63])
    with pytest.raises(ValueError, match="batch 3 does not split"):
        q3, k3, v3, _ = inputs(rng, b=3, t=64, s=64)
        call(q3, k3, v3)
    with pytest.raises(ValueError, match="repeat K/V heads"):
        call(q, k[:, :, :1], v[:, :, :1])  # one K/V head cannot split over tensor=2
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        call(q[:, :, :3], k, v)
