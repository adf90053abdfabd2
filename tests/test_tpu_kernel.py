"""TPU flash attention (and the splash wrapper) in TPU interpret mode on CPU, against the
float32 reference: outputs, lse and gradients for every mask kind, GQA, T != S, bf16 / f32,
fully masked rows, race detection, and a count of the tiles the kernels really visit.

Interpret-mode programs are big, so each test compiles one program (kernel + reference,
forward + backward) at XLA -O0, and shapes stay tiny (T <= 384, blocks of 128).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mask import EMPTY, FULL, PARTIAL, MaskSpec, dense_mask
from pallas_kernels.reference import attention_reference
from pallas_kernels.tpu import (BlockSizes, flash_attention, flash_attention_bwd, flash_attention_fwd,
                                splash_attention, tile_schedule_stats)
from pallas_kernels.tpu.flash_attention import build_schedule

BLOCKS = BlockSizes(128, 128)
OFF = 1 << 30  # a window / chunk this large changes nothing


def _compile(fn, *args):
    # -O0 halves XLA's compile time for interpret-mode programs; they run for milliseconds.
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def _inputs(seed, b, t, s, hq, hkv, d, dtype):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype)
               for kk, shape in zip(ks, [(b, t, hq, d), (b, s, hkv, d), (b, s, hkv, d)]))
    dout = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(dtype)
    dlse = jax.random.normal(ks[4], (b, hq, t), jnp.float32)
    return q, k, v, dout, dlse


def _documents(rng, batch, length, max_docs, pad):
    """Random packed rows: documents 1..n of random lengths, then `pad` tokens of padding (0)."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length - pad), size=max_docs - 1, replace=False))
        ids = np.zeros(length, np.int32)
        for doc, (lo, hi) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, length - pad]), start=1):
            ids[lo:hi] = doc
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def _value_and_grads(attn, q, k, v, dout, dlse, mask):
    (out, lse), vjp = jax.vjp(lambda q, k, v: attn(q, k, v, mask, return_lse=True), q, k, v)
    return out, lse, vjp((dout, dlse))


def _check(got, want, dtype, what=""):
    """Max error relative to the reference's largest entry: 2e-5 for float32, 3e-2 for bf16."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol}"


def _check_lse(got, want, dtype):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-4 if dtype == jnp.float32 else 2e-3)


def _compare(mask_args, make_mask, shapes, dtype, seed, interpret=None):
    """Compile kernel + reference (forward and backward) once; check every given mask."""
    q, k, v, dout, dlse = _inputs(seed, *shapes, dtype)

    def both(q, k, v, dout, dlse, args):
        mask = make_mask(*args)
        kernel = lambda *a, **kw: flash_attention(*a, **kw, block_sizes=BLOCKS, interpret=interpret)
        return (_value_and_grads(kernel, q, k, v, dout, dlse, mask),
                _value_and_grads(attention_reference, q, k, v, dout, dlse, mask))

    run = _compile(both, q, k, v, dout, dlse, mask_args[0])
    results = []
    for args in mask_args:
        (out, lse, grads), (ref_out, ref_lse, ref_grads) = run(q, k, v, dout, dlse, args)
        _check(out, ref_out, dtype, "out")
        _check_lse(lse, ref_lse, dtype)
        for name, g, r in zip("qkv", grads, ref_grads):
            _check(g, r, dtype, f"d{name}")
        results.append((out, lse, grads, ref_lse))
    return results


def test_causal_gqa_float32():
    _compare([()], lambda: MaskSpec(), (2, 256, 256, 2, 1, 64), jnp.float32, seed=0)


def test_window_chunk_sinks_are_traced():
    """window / chunk / sinks are runtime values: one compiled program serves them all."""
    settings = [(64, OFF, 0), (OFF, 128, 0), (100, OFF, 16), (1, 96, 8)]
    _compare([tuple(jnp.int32(x) for x in s) for s in settings],
             lambda w, c, n: MaskSpec(window=w, chunk=c, sinks=n),
             (1, 256, 256, 2, 1, 64), jnp.float32, seed=1)


def test_documents_bf16_query_suffix():
    """Causal documents with T != S: 128 queries at the end of a 384-token packed row."""
    seg = _documents(np.random.default_rng(2), 2, 384, max_docs=3, pad=20)
    mask_args = (seg[:, 256:], seg, jnp.arange(256, 384, dtype=jnp.int32))
    [(out, lse, grads, ref_lse)] = _compare(
        [mask_args], lambda qs, ks, qi: MaskSpec(q_segment_ids=qs, kv_segment_ids=ks, q_token_index=qi),
        (2, 128, 384, 2, 1, 128), jnp.bfloat16, seed=2)
    # Padding queries (segment 0) see nothing: output 0, lse -inf, zero gradient, never NaN.
    blind = np.isneginf(np.asarray(ref_lse)).transpose(0, 2, 1)  # [B, T, Hq]
    assert blind.any() and np.array_equal(blind.all(-1), np.asarray(seg[:, 256:]) == 0)
    assert np.all(np.asarray(out, np.float32)[blind] == 0) and np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[blind]))
    assert np.all(np.asarray(grads[0], np.float32)[blind] == 0)


def test_non_causal_unaligned_lengths():
    """T and S not multiples of the block: the kernel pads and masks the padding."""
    _compare([()], lambda: MaskSpec(causal=False), (1, 200, 300, 2, 2, 128), jnp.float32, seed=3)


# Race detection, NaN-filled fresh memory, two simulated cores, and every grid point recorded.
_VISITED = []


def _record(token, grid_point, core):
    _VISITED.append(tuple(int(i) for i in np.asarray(grid_point)))
    return token


def _races_found():
    """The interpreter's race flag (private; None where this JAX keeps it elsewhere)."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    except ImportError:
        return None
    races = getattr(ipc, "races", None)
    return None if races is None else bool(races.races_found)


STRICT = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2,
                               grid_point_recorder=_record)


def test_race_detector_reports_a_race(capsys):
    """The detector used below does fire: two cores writing one output block."""
    def racy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    call = pl.pallas_call(racy, grid=(2,), in_specs=[pl.BlockSpec((None, 8, 128), lambda h: (h, 0, 0))],
                          out_specs=pl.BlockSpec((8, 128), lambda h: (0, 0)),
                          out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                          compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
                          interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2))
    try:  # JAX <= 0.11 prints the race; JAX 0.12 raises it
        call(jnp.ones((2, 8, 128))).block_until_ready()
        reported = capsys.readouterr().out
    except jax.errors.JaxRuntimeError as e:
        reported = str(e)
    assert "RACE DETECTED" in reported
    assert _races_found() in (True, None)


def test_skyladder_strict_interpret(capsys):
    """Chunk + documents + sinks (SkyLadder), bf16, GQA, padding rows, under race detection with
    NaN-initialised memory; the kernels visit exactly the scheduled tiles, far fewer than all."""
    batch, length, hq, hkv = 1, 384, 2, 1
    seg = _documents(np.random.default_rng(4), batch, length, max_docs=4, pad=40)
    chunk, sinks = jnp.int32(128), jnp.int32(8)
    _VISITED.clear()
    _compare(
        [(seg, chunk, sinks)], lambda s, c, n: MaskSpec(q_segment_ids=s, chunk=c, sinks=n),
        (batch, length, length, hq, hkv, 64), jnp.bfloat16, seed=4, interpret=STRICT)
    assert "RACE DETECTED" not in capsys.readouterr().out
    assert _races_found() in (False, None)

    # Grid points: forward and dq walk the q-block lists, dk/dv the k-block lists (x GQA group).
    mask = MaskSpec(q_segment_ids=seg, chunk=chunk, sinks=sinks)
    stats = tile_schedule_stats(mask, batch, length, length, BLOCKS)
    assert len(_VISITED) == hq * (2 * stats["fwd_steps"] + stats["dkv_steps"])
    # From the dense mask alone: the tiles holding an allowed pair (a block row or column with
    # none still takes one write-only step). Here that is 5 of 9 tiles, so 30 of 54 grid points.
    allowed = np.asarray(dense_mask(mask, batch, length, length)).reshape(batch, 3, 128, 3, 128).any((2, 4))
    per_q_block, per_k_block = np.maximum(allowed.sum(2), 1).sum(), np.maximum(allowed.sum(1), 1).sum()
    assert len(_VISITED) == hq * (2 * per_q_block + per_k_block) < 3 * hq * allowed.size


def test_ring_halves_with_merged_lse():
    """Two K/V shards: per-shard forward, logsumexp merge, per-shard backward with the merged
    out / lse must give the gradients of attention over the whole sequence."""
    q, k, v, dout, _ = _inputs(5, 1, 256, 512, 2, 1, 64, jnp.float32)
    q_index = jnp.arange(256, 512, dtype=jnp.int32)  # the queries are the second half of the row

    def ring(q, k, v, dout):
        # Shards stacked on a leading axis and mapped over, as a ring loop would call the kernels.
        shards = (k.reshape(1, 2, 256, 1, 64).swapaxes(0, 1), v.reshape(1, 2, 256, 1, 64).swapaxes(0, 1),
                  jnp.arange(512, dtype=jnp.int32).reshape(2, 256))
        shard_mask = lambda kv_index: MaskSpec(q_token_index=q_index, kv_token_index=kv_index)
        outs, lses = jax.lax.map(lambda s: flash_attention_fwd(q, s[0], s[1], shard_mask(s[2]), block_sizes=BLOCKS),
                                 shards)
        lse = jax.nn.logsumexp(lses, axis=0)
        out = (outs * jnp.exp(lses - lse).transpose(0, 1, 3, 2)[..., None]).sum(0)
        dqs, dks, dvs = jax.lax.map(
            lambda s: flash_attention_bwd(q, s[0], s[1], shard_mask(s[2]), out, lse, dout, block_sizes=BLOCKS), shards)
        dk, dv = (x.swapaxes(0, 1).reshape(k.shape) for x in (dks, dvs))
        ref_out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, MaskSpec(q_token_index=q_index)), q, k, v)
        return (out, dqs.sum(0), dk, dv), (ref_out, *vjp(dout))

    got, want = _compile(ring, q, k, v, dout)(q, k, v, dout)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        _check(g, w, jnp.float32, name)


def test_build_schedule_matches_numpy():
    rng = np.random.default_rng(6)
    tiles = rng.choice([EMPTY, PARTIAL, FULL], size=(5, 7), p=[0.5, 0.3, 0.2]).astype(np.int32)
    tiles[2] = EMPTY  # a row with nothing visible still gets one (write-only) entry
    rows, infos, steps = (np.asarray(x) for x in build_schedule(jnp.asarray(tiles)))
    want = []
    for r in range(5):
        cols = [c for c in range(7) if tiles[r, c] != EMPTY] or [0]
        for n, c in enumerate(cols):
            want.append((r, c, tiles[r, c], n == 0, n == len(cols) - 1))
    got = [(rows[t], infos[t] >> 4, infos[t] & 3, bool(infos[t] & 4), bool(infos[t] & 8)) for t in range(int(steps))]
    assert got == want


def test_splash_matches_reference():
    q, k, v, dout, _ = _inputs(7, 2, 256, 256, 2, 1, 64, jnp.float32)
    seg = _documents(np.random.default_rng(7), 2, 256, max_docs=2, pad=16)
    mask = MaskSpec(window=96, q_segment_ids=seg)

    def both(q, k, v, dout):
        outs = []
        for attn in (lambda *a: splash_attention(*a, block_sizes=BLOCKS), attention_reference):
            out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, mask), q, k, v)
            outs.append((out, *vjp(dout)))
        return outs

    got, want = _compile(both, q, k, v, dout)(q, k, v, dout)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want):
        _check(g, w, jnp.float32, name)


def test_bad_inputs_name_the_fix():
    q = jnp.ones((1, 256, 2, 64))
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_attention(q, q, q, block_sizes=BlockSizes(block_q=100))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(jnp.ones((1, 256, 3, 64)), q, q)
    with pytest.raises(ValueError, match="cast to bfloat16 or float32"):
        flash_attention(q.astype(jnp.int32), q, q)
    with pytest.raises(ValueError, match="flash_attention"):
        splash_attention(q, q, q, MaskSpec(window=jnp.int32(8)))
    with pytest.raises(ValueError, match="flash_attention"):
        splash_attention(q, q, q, MaskSpec(chunk=64))
