"""Context parallelism (ring, window-aware ring, all-gather, Ulysses, hybrid; zigzag) against
single-device reference attention, the ring's traffic in compiled HLO, and TPU compiles."""
import functools
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import ctxjax.attention.context_parallel as cp_module
from pallas_kernels.blockwise import blockwise_attention_bwd, blockwise_attention_fwd
from ctxjax.attention.context_parallel import (
    STRATEGIES, context_parallel_attention, unzigzag, zigzag, zigzag_order)
from ctxjax.metrics import collective_permutes, permute_traffic
from pallas_kernels.mask import MaskSpec
from pallas_kernels.reference import attention_reference
from tpu_topology import tpu_mesh, tpu_topology  # noqa: F401  (a fixture)

AXES = ("data", "fsdp", "tensor", "context")
HYBRID_AXES = AXES + ("ulysses",)
B, T, HQ, HKV, D = 2, 128, 8, 2, 16
HALVES = dict(local_fwd=blockwise_attention_fwd, local_bwd=blockwise_attention_bwd)
AXIS_NAMES = dict(batch_axes=("data", "fsdp"), head_axis="tensor", context_axis="context")


def make_mesh(shape, names=AXES):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


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


def check_against_reference(cp, arrays, order, scalars, name, case):
    """Run the context-parallel loss-and-grads `cp` on (q, k, v, w, seg) laid out in `order`
    and the reference in natural order, with (window, chunk, sinks); compare out, lse, dq, dk, dv."""
    (_, (out, lse)), grads = cp(*arrays, order, *scalars)
    (_, (ref_out, ref_lse)), ref_grads = reference_loss_and_grads(*arrays, *scalars)
    assert_matches(out, ref_out, f"{name}: out")
    assert_lse_matches(lse, ref_lse, f"{name}: lse")
    for grad_name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_matches(got, want, f"{name}: {grad_name}")
    if case["documents"] and not case["sinks"]:
        assert np.isneginf(np.asarray(lse)[0, :, -11:]).all()  # padding rows: no keys, lse = -inf


def cp_loss_fn(mesh, strategy, **axes):
    """Loss of context-parallel attention on natural-order inputs, laid out in `order` (a traced
    permutation: zigzag and contiguous layouts share one compilation), returning natural-order
    out and lse."""
    # On Explicit axes the output keeps its sharding; replicate it before restoring the order.
    explicit = AxisType.Explicit in tuple(mesh.axis_types)
    whole = (lambda x: jax.reshard(x, NamedSharding(mesh, P()))) if explicit else (lambda x: x)

    def loss(q, k, v, w, seg, order, window, chunk, sinks):
        reorder = lambda x, axis=1: jnp.take(x, order, axis=axis)
        restore = lambda x, axis=1: jnp.take(whole(x), jnp.argsort(order), axis=axis)
        index = reorder(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))  # shards carry true positions
        mask = MaskSpec(causal=True, q_segment_ids=reorder(seg), q_token_index=index, kv_token_index=index,
                        window=window, chunk=chunk, sinks=sinks)
        out, lse = context_parallel_attention(reorder(q), reorder(k), reorder(v), mask, mesh=mesh,
                                              strategy=strategy, return_lse=True, **HALVES, **axes)
        return jnp.sum(out * reorder(w)), (restore(out), restore(lse, 2))

    return loss


def layouts(ring):
    """The zigzag order over `ring` shards, and the natural (contiguous) one."""
    return {"zigzag": zigzag_order(T, ring), "contiguous": np.arange(T)}


# (strategy, mesh shape), each run on zigzag and contiguous layouts. Meshes over AXES, plus
# `ulysses` for hybrid. HQ=8, HKV=2: ulysses over context 4 with tensor 2 has 1 local kv head
# for 4 devices (repeated 4x); hybrid with ulysses 2 splits the 2 kv heads without copies (the
# static-terms test repeats 1 kv head). Hybrid's zigzag is over its ring (context) size.
REFERENCE_CASES = [  # the ring of 8: test_window_aware_ring_traced_window
    ("ring", (2, 1, 1, 4)),  # through the abstract mesh of `jax.set_mesh`, as the dispatcher does
    ("all_gather", (1, 1, 2, 4)),
    ("ulysses", (1, 1, 2, 4)),
    ("hybrid", (2, 1, 1, 2, 2)),
]


@pytest.mark.parametrize("strategy, mesh_shape", REFERENCE_CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_matches_single_device_reference(strategy, mesh_shape):
    rng = np.random.default_rng(zlib.crc32(repr((mesh_shape, strategy)).encode()))
    mesh = make_mesh(mesh_shape, HYBRID_AXES if strategy == "hybrid" else AXES)
    mesh_arg = mesh.abstract_mesh if mesh_shape == (2, 1, 1, 4) else mesh
    axes = dict(AXIS_NAMES, ulysses_axis="ulysses" if strategy == "hybrid" else None)
    cp = jax.jit(jax.value_and_grad(cp_loss_fn(mesh_arg, strategy, **axes), argnums=(0, 1, 2), has_aux=True))
    for layout, order in layouts(mesh.shape["context"]).items():
        for name, case in MASK_CASES.items():
            q, k, v, w = inputs(rng)
            seg = documents(rng, B, T) if case["documents"] else np.ones((B, T), np.int32)
            scalars = tuple(np.int32(case[n]) for n in ("window", "chunk", "sinks"))
            with jax.set_mesh(mesh):
                check_against_reference(cp, (q, k, v, w, seg), order, scalars, f"{layout}, {name}", case)


# Python-int mask terms, queries at the end of a longer key sequence (T != S).
STATIC_T, STATIC_S = 64, 128
STATIC_MASK = MaskSpec(causal=True, q_token_index=np.broadcast_to(np.arange(STATIC_S - STATIC_T, STATIC_S), (B, STATIC_T)),
                       window=50, sinks=4)
STATIC_TERMS_MESHES = {"ring": ((2, 1, 1, 4), AXES), "all_gather": ((2, 1, 1, 4), AXES),
                       "ulysses": ((2, 1, 1, 4), AXES), "hybrid": ((2, 1, 1, 2, 2), HYBRID_AXES)}


def loss_and_grads(attend):
    def f(q, k, v, w):
        out, lse = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), (out, lse)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


@functools.lru_cache(maxsize=None)
def static_terms_reference():
    """The float32 reference of the static-terms test: one program for every strategy."""
    return loss_and_grads(lambda q, k, v: attention_reference(q, k, v, STATIC_MASK, return_lse=True))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_static_terms_cross_attention_bfloat16(strategy):
    """Python-int mask terms, no segments, queries at the end of a longer key sequence (T != S),
    bfloat16 inputs, heads replicated (head_axis=None), one kv head (Ulysses repeats it)."""
    rng = np.random.default_rng(7)
    shape, names = STATIC_TERMS_MESHES[strategy]
    mesh = make_mesh(shape, names)
    q, k, v, w = inputs(rng, t=STATIC_T, s=STATIC_S, hq=4, hkv=1, dtype=jnp.bfloat16)
    cp = loss_and_grads(lambda q, k, v: context_parallel_attention(
        q, k, v, STATIC_MASK, mesh=mesh, strategy=strategy, return_lse=True, **HALVES,
        **dict(AXIS_NAMES, head_axis=None), ulysses_axis="ulysses" if strategy == "hybrid" else None))
    (_, (out, lse)), grads = cp(q, k, v, w)
    f32 = lambda x: x.astype(jnp.float32)
    # The reference sees the same bfloat16-rounded numbers, in float32.
    (_, (ref_out, ref_lse)), ref_grads = static_terms_reference()(f32(q), f32(k), f32(v), f32(w))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert_matches(out, ref_out, "out", atol=2e-2, rtol=2e-2)
    assert_lse_matches(lse, ref_lse, "lse")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_matches(got, want, name, atol=3e-2 * float(jnp.abs(want).max()), rtol=2e-2)


# ---------------------------------------------------------------------------- window-aware ring

@pytest.fixture
def ring_branches(monkeypatch):
    """Record which ring branch each rank runs, forward and backward: ("halo", plan slots) or
    ("full", 0)."""
    runs = []

    def recording(kind, function, with_plan):
        def wrapped(setup, *args):
            slots = len(args[0].slots) if with_plan else 0
            jax.debug.callback(lambda rank: runs.append((kind, slots, int(rank))), lax.axis_index(setup.ring_axis))
            return function(setup, *args)
        return wrapped

    for name, kind, with_plan in (("_halo_fwd", "halo", True), ("_halo_bwd", "halo", True),
                                  ("_full_ring_fwd", "full", False), ("_full_ring_bwd", "full", False)):
        monkeypatch.setattr(cp_module, name, recording(kind, getattr(cp_module, name), with_plan))

    def taken():
        jax.effects_barrier()
        branches = {(kind, slots) for kind, slots, _ in runs}
        assert len(runs) == 2 * 8 and len(branches) == 1, runs  # fwd and bwd, every rank, one branch
        runs.clear()
        return branches.pop()

    return taken


# Ring of 8 over T=128 in zigzag order: pieces (half shards) of 8 tokens. (name, mask case,
# the branch the window-aware ring must take: halo plan slots, or the full ring).
TRACED_WINDOW_CASES = [
    ("window 5: one piece back", dict(documents=False, window=5, chunk=T, sinks=0), ("halo", 2)),
    ("window 9: exactly one piece back", dict(documents=True, window=9, chunk=T, sinks=0), ("halo", 2)),
    ("window 12: two pieces back", dict(documents=False, window=12, chunk=T, sinks=0), ("halo", 5)),
    ("chunk 16: aligned to pieces", dict(documents=False, window=T, chunk=16, sinks=0), ("halo", 2)),
    ("chunk 12 and window 20", dict(documents=True, window=20, chunk=12, sinks=0), ("halo", 2)),
    ("window 40: wider than the ladder", dict(documents=False, window=40, chunk=T, sinks=0), ("full", 0)),
    ("traced sinks: full ring", dict(documents=False, window=5, chunk=T, sinks=2), ("full", 0)),
    ("global", dict(documents=True, window=T, chunk=T, sinks=0), ("full", 0)),
] + [(name, case, ("full", 0)) for name, case in MASK_CASES.items()]  # all wider than the ladder at R = 8
# On contiguous shards (16 tokens) only these look-backs stay inside what a zigzag plan delivers.
CONTIGUOUS_BRANCH = {"chunk 16: aligned to pieces": ("halo", 2)}


def test_window_aware_ring_traced_window(ring_branches):
    """The ring of 8, one compilation, traced window / chunk / sinks (a SkyLadder schedule):
    each value picks the smallest compiled halo plan that covers it, or the full ring, and
    matches the reference; the contiguous layout takes the full ring whenever a key outside
    the zigzag plan is visible."""
    rng = np.random.default_rng(11)
    mesh = make_mesh((1, 1, 1, 8))
    loss = cp_loss_fn(mesh, "ring", **AXIS_NAMES)
    cp = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    for layout, order in layouts(8).items():
        for name, case, branch in TRACED_WINDOW_CASES:
            q, k, v, w = inputs(rng)
            seg = documents(rng, B, T) if case["documents"] else np.ones((B, T), np.int32)
            scalars = tuple(np.int32(case[n]) for n in ("window", "chunk", "sinks"))
            check_against_reference(cp, (q, k, v, w, seg), order, scalars, f"{layout}, {name}", case)
            expected = branch if layout == "zigzag" else CONTIGUOUS_BRANCH.get(name, ("full", 0))
            assert ring_branches() == expected, (layout, name)


def test_window_aware_ring_static_window(ring_branches):
    """Python-int window 12, chunk 16 and 3 sinks, with documents (a local layer): the plan is
    made at trace time, the sinks travel as an extra piece. Contiguous shards of 16 tokens are
    the chunks themselves, so there too only the sinks come from outside and the plan covers
    them. The mesh has Explicit axes (jax.make_mesh's default)."""
    window, chunk, sinks = 12, 16, 3
    rng = np.random.default_rng(5)
    mesh = jax.make_mesh((1, 8), ("data", "context"))
    loss = cp_loss_fn(mesh, "ring", batch_axes=("data",), head_axis=None, context_axis="context")
    cp = jax.jit(jax.value_and_grad(lambda q, k, v, w, seg, order, *_: loss(q, k, v, w, seg, order, window, chunk, sinks),
                                    argnums=(0, 1, 2), has_aux=True))
    scalars = (np.int32(window), np.int32(chunk), np.int32(sinks))  # the same terms, for the reference
    for layout, order in layouts(8).items():
        q, k, v, w = inputs(rng)
        check_against_reference(cp, (q, k, v, w, documents(rng, B, T)), order, scalars, layout,
                                dict(documents=True, sinks=sinks))
        assert ring_branches() == ("halo", 2), layout


def test_halo_plan_is_exact():
    """Static plans (no compile): every rank gets exactly the pieces that hold a key one of its
    queries sees, found by brute force over the zigzag layout, for windows and chunks."""
    for ring, piece in ((2, 4), (4, 4), (8, 3)):
        order = zigzag_order(2 * ring * piece, ring)
        positions = order.reshape(ring, 2, piece)
        for window, chunk in ((1, None), (3, None), (4, None), (7, None), (None, 5), (None, 8), (6, 4)):
            plan = cp_module._halo_plan(ring, piece, window, chunk, 0)
            q, k = positions.reshape(ring, -1)[:, :, None, None, None], positions[None, None, :, :, :]
            sees = (k <= q) & ((q - k < window) if window else True) & ((k >= q // chunk * chunk) if chunk else True)
            needed = sees.any(axis=(1, 4))  # [dst rank, src rank, piece]
            needed[np.arange(ring), np.arange(ring)] = False  # own pieces
            got = np.zeros_like(needed)
            for i, (p, pairs) in enumerate(plan.slots):
                for src, dst in pairs:
                    assert plan.receives[dst][i]
                    got[dst, src, p] = True
            np.testing.assert_array_equal(got, needed, err_msg=f"ring {ring}, window {window}, chunk {chunk}")


# ---------------------------------------------------------------------------- traffic

def test_window_aware_ring_traffic():
    """Bytes the compiled ring sends, forward + backward, for a local layer (static window W)
    on a context axis of 8: exactly the halo pieces that hold a visible key, against the full
    ring's R-1 hops of the whole K/V shard; a global layer keeps the full ring."""
    ring, t, h, d, window = 8, 256, 2, 8, 8
    mesh = jax.make_mesh((ring,), ("context",))
    order = zigzag_order(t, ring)
    piece = t // (2 * ring)

    def compiled_permutes(window, window_aware=True):
        mask = MaskSpec(q_token_index=order, kv_token_index=order, window=window)
        loss = lambda q, k, v, w: jnp.sum(w * context_parallel_attention(
            q, k, v, mask, mesh=mesh, strategy="ring", batch_axes=(), head_axis=None, context_axis="context",
            window_aware=window_aware, **HALVES))
        x = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, x).compile().as_text()
        traffic[window, window_aware] = permute_traffic(text)
        return collective_permutes(text)

    traffic = {}

    # What the design needs, found by brute force: (destination rank, source piece) pairs with a
    # visible key. Each moves k, v and token_index forward; k, v again and f32 dK, dV backward.
    positions = order.reshape(ring, 2, piece)
    visible = lambda qs, ks: ((ks[None, :] <= qs[:, None]) & (qs[:, None] - ks[None, :] < window)).any()
    needed = sum(visible(positions[dst].ravel(), positions[src, p]) for dst in range(ring)
                 for src in range(ring) if src != dst for p in (0, 1))
    piece_kv = 2 * piece * h * d * 4  # k and v of one piece, f32
    piece_index = piece * 4
    halo_bytes = needed * (2 * (piece_kv + piece_index) + piece_kv)
    full_ring_bytes = (ring - 1) * ring * (2 * (2 * piece_kv + 2 * piece_index) + 2 * piece_kv)

    windowed = compiled_permutes(window)
    halo_sent = sum(n for n, op_name in windowed if "while" not in op_name)  # outside the ring's scan
    assert needed == 2 * (ring - 1)  # each chunk needs its natural-order predecessor only
    assert halo_sent == halo_bytes, (halo_sent, halo_bytes)
    assert halo_sent * 7 < full_ring_bytes  # 14 pieces moved instead of 112
    assert any("while" in op_name for _, op_name in windowed)  # the full ring is compiled as the fallback

    global_layer = compiled_permutes(None)
    assert global_layer and all("while" in op_name for _, op_name in global_layer)  # no halo: the full ring
    per_hop = sum(n for n, _ in global_layer)  # one hop's permutes each, in the scan bodies (fwd, bwd)
    assert per_hop * (ring - 1) >= full_ring_bytes
    # window_aware=False (a benchmark's baseline): the bounded mask compiles the full ring alone.
    assert sorted(compiled_permutes(window, window_aware=False)) == sorted(global_layer)
    # What runs (ctxjax.metrics.permute_traffic): the halo plan's branch sends the halo bytes, the
    # fallback branch and the global layer the full ring as compiled (R hops, the last one spare).
    halo = traffic[window, True]
    assert halo.fixed == 0 and [len(sizes) for sizes in halo.branches] == [2, 2]  # fwd and bwd: plan, full ring
    assert halo.total(0) == halo_bytes
    full_compiled = full_ring_bytes * ring // (ring - 1)
    for run in (halo.total(-1), traffic[None, True].total(0), traffic[window, False].total(0)):
        assert run == full_compiled, (run, full_compiled)
    assert traffic[None, True].branches == [] and traffic[window, False].unknown_trip_counts == 0
    print(f"\nring of {ring}, window {window}, fwd+bwd: halo {halo_sent} B, "
          f"full ring ({ring - 1} hops) {full_ring_bytes} B, global layer per hop {per_hop} B")


def test_permute_traffic_reads_gpu_async_form():
    """The GPU form of a permute (async start/done, u32 context scalars in the result tuple),
    inside a loop with a known trip count and a conditional's branches."""
    text = """HloModule m

%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]{1,0}) parameter(0)
  %x = bf16[4,8]{1,0} get-tuple-element(%p), index=1
  %cp = (bf16[4,8]{1,0}, bf16[4,8]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}, metadata={op_name="jit(f)/while/body/ppermute"}
  %d = bf16[4,8]{1,0} collective-permute-done(%cp)
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%i, %d)
}

%branch_0 (a: f32[2]) -> f32[2] {
  %a = f32[2]{0} parameter(0)
  ROOT %q = f32[2]{0} collective-permute(%a), channel_id=2, source_target_pairs={{0,1}}
}

%branch_1 (a: f32[2]) -> f32[2] {
  ROOT %a = f32[2]{0} parameter(0)
}

ENTRY %main (x: bf16[4,8], i: s32[]) -> bf16[4,8] {
  %w = (s32[], bf16[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %c = f32[2]{0} conditional(%i, %y, %y), branch_computations={%branch_0, %branch_1}
  ROOT %r = bf16[4,8]{1,0} get-tuple-element(%w), index=1
}
"""
    assert collective_permutes(text) == [(4 * 8 * 2 * 4, "jit(f)/while/body/ppermute"), (8, "")]
    traffic = permute_traffic(text)
    assert (traffic.fixed, traffic.branches, traffic.unknown_trip_counts) == (3 * 256, [[8, 0]], 0)
    assert (traffic.total(0), traffic.total(1), traffic.total(-1)) == (776, 768, 768)


# ---------------------------------------------------------------------------- work balance, layout

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
                q, k, v, mask, mesh=mesh, strategy="ring", **dict(AXIS_NAMES, head_axis=None),
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
    hybrid_mesh = make_mesh((1, 1, 2, 2, 2), HYBRID_AXES)
    rng = np.random.default_rng(1)
    q, k, v, _ = inputs(rng, t=64, s=64)
    call = lambda q, k, v, **kw: context_parallel_attention(
        q, k, v, MaskSpec(), **HALVES, **{"mesh": mesh, "strategy": "ring", **AXIS_NAMES, **kw})
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
    with pytest.raises(TypeError, match="context_axis"):  # no default axis names: callers pass them
        context_parallel_attention(q, k, v, mesh=mesh, strategy="ring", batch_axes=(), head_axis=None, **HALVES)
    # Ulysses: the local query heads (6 / tensor 2 = 3) must split over the context axis (2).
    with pytest.raises(ValueError, match="use a multiple of 4 query heads"):
        call(q[:, :, :6], k, v, strategy="ulysses")
    # Hybrid: needs its second axis, present and distinct; other strategies take none.
    with pytest.raises(ValueError, match="needs ulysses_axis="):
        call(q, k, v, strategy="hybrid", mesh=hybrid_mesh)
    with pytest.raises(ValueError, match="no 'ulysses' axis"):
        call(q, k, v, strategy="hybrid", ulysses_axis="ulysses")
    with pytest.raises(ValueError, match="two different axes"):
        call(q, k, v, strategy="hybrid", mesh=hybrid_mesh, ulysses_axis="context")
    with pytest.raises(ValueError, match="used by strategy='hybrid' only"):
        call(q, k, v, strategy="ring", mesh=hybrid_mesh, ulysses_axis="ulysses")
    with pytest.raises(ValueError, match="pad the sequence to a multiple of 4"):  # context 2 x ulysses 2 
        call(q[:, :62], k[:, :62], v[:, :62], strategy="hybrid", mesh=hybrid_mesh, ulysses_axis="ulysses")


# ---------------------------------------------------------------------------- TPU compile

# (strategy, mesh shape, axis names, static window): tiny widths on v5e 2x2 (4 chips). The
# windowed ring compiles both the halo plan and the full ring (its fallback).
TPU_CASES = {
    "ring window 16": ("ring", (1, 4), ("data", "context"), 16),
    "all_gather": ("all_gather", (1, 4), ("data", "context"), None),
    "ulysses": ("ulysses", (1, 4), ("data", "context"), None),
    "hybrid 2x2": ("hybrid", (1, 2, 2), ("data", "context", "ulysses"), None),
}


@pytest.mark.parametrize("case", TPU_CASES)
def test_compiles_for_tpu(tpu_topology, case):
    """Forward + backward with the XLA blockwise halves through the real XLA TPU compiler
    (bfloat16, GQA, zigzag token_index)."""
    strategy, shape, names, window = TPU_CASES[case]
    mesh = tpu_mesh(tpu_topology, shape, names)
    ulysses = "ulysses" if strategy == "hybrid" else None
    t = 256
    order = zigzag_order(t, mesh.shape["context"])
    mask = MaskSpec(q_token_index=order, kv_token_index=order, window=window)

    def loss(q, k, v, w):
        out = context_parallel_attention(q, k, v, mask, mesh=mesh, strategy=strategy, batch_axes=("data",),
                                         head_axis=None, context_axis="context", ulysses_axis=ulysses, **HALVES)
        return jnp.sum(out.astype(jnp.float32) * w)

    seq = NamedSharding(mesh, P("data", ("context", ulysses) if ulysses else "context"))
    q_like = jax.ShapeDtypeStruct((2, t, 4, 128), jnp.bfloat16, sharding=seq)
    kv_like = jax.ShapeDtypeStruct((2, t, 2, 128), jnp.bfloat16, sharding=seq)
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(seq,) * 4, out_shardings=(seq,) * 3
                       ).lower(q_like, kv_like, kv_like, q_like).compile()
    seconds = time.perf_counter() - start
    assert "collective-permute" in compiled.as_text() or strategy != "ring"
    print(f"\nTPU v5e:2x2 compile, {case}: {seconds:.1f} s")
