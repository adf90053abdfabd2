"""The attention backends against a direct float64 NumPy implementation of the mask algebra,
and the backends table's choices and refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.attention.backends import BACKENDS, attend, resolve
from pallas_kernels.mask import MaskSpec
from pallas_kernels.mask import EMPTY, FULL, classify_tiles


def numpy_mask(q_pos, k_pos, q_seg, k_seg, *, causal, window, chunk, sinks):
    """allowed(i, j) = causal and (k < sinks or (document and window and chunk)), spelled out."""
    b, t = q_pos.shape
    s = k_pos.shape[1]
    out = np.zeros((b, t, s), bool)
    for n in range(b):
        for i in range(t):
            for j in range(s):
                qi, kj = q_pos[n, i], k_pos[n, j]
                if causal and kj > qi:
                    continue
                doc = q_seg is None or (q_seg[n, i] == k_seg[n, j] and q_seg[n, i] != 0)
                win = window is None or qi - kj < window
                chk = chunk is None or kj >= (qi // chunk) * chunk
                out[n, i, j] = kj < sinks or (doc and win and chk)
    return out


def numpy_attention(q, k, v, allowed, g):
    """float64 forward and the gradients of sum(out * g)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    rep = hq // hkv
    kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scale = d ** -0.5
    s = np.einsum("bthd,bshd->bhts", q, kk) * scale
    mask = allowed[:, None]
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.where(mask, np.exp(s - m), 0)
    denom = p.sum(-1, keepdims=True)
    p = p / np.where(denom == 0, 1, denom)
    out = np.einsum("bhts,bshd->bthd", p, vv)
    dv = np.einsum("bhts,bthd->bshd", p, g)
    dp = np.einsum("bthd,bshd->bhts", g, vv)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", ds, kk) * scale
    dk = np.einsum("bhts,bthd->bshd", ds, q) * scale
    fold = lambda x: x.reshape(b, x.shape[1], hkv, rep, d).sum(3)
    return out, dq, fold(dk), fold(dv)


def random_problem(rng, *, b=2, t=48, s=48, hq=4, hkv=2, d=16, n_docs=3):
    q, k, v = (rng.standard_normal((b, n, h, d)) for n, h in ((t, hq), (s, hkv), (s, hkv)))
    seg_q = np.sort(rng.integers(0, n_docs + 1, (b, t)), axis=1)  # includes padding (0) at the front
    seg_k = seg_q if t == s else np.sort(rng.integers(0, n_docs + 1, (b, s)), axis=1)
    return q, k, v, seg_q, seg_k


MASKS = {
    "causal": dict(),
    "full": dict(causal=False),
    "documents": dict(documents=True),
    "window": dict(window=7),
    "chunk": dict(chunk=16),
    "sinks": dict(window=5, sinks=3),
    "skyladder_docs_sinks": dict(chunk=8, documents=True, sinks=2),
    "everything": dict(chunk=16, window=6, documents=True, sinks=2),
    "noncausal_docs_window": dict(causal=False, documents=True, window=9),
}


def _build(rng, case, *, t=48, s=48, hq=4, hkv=2, traced=False):
    opts = dict(MASKS[case])
    q, k, v, seg_q, seg_k = random_problem(rng, t=t, s=s, hq=hq, hkv=hkv)
    documents = opts.pop("documents", False)
    causal = opts.pop("causal", True)
    q_pos = np.tile(np.arange(t), (2, 1)) + (s - t if t < s else 0)  # queries at the end when T < S
    k_pos = np.tile(np.arange(s), (2, 1))
    allowed = numpy_mask(q_pos, k_pos, seg_q if documents else None, seg_k, causal=causal,
                         window=opts.get("window"), chunk=opts.get("chunk"), sinks=opts.get("sinks", 0))
    as_scalar = (lambda x: None if x is None else jnp.int32(x)) if traced else (lambda x: x)
    spec = MaskSpec(causal=causal, q_segment_ids=jnp.asarray(seg_q) if documents else None,
                    kv_segment_ids=jnp.asarray(seg_k) if documents else None,
                    q_token_index=jnp.asarray(q_pos, jnp.int32), kv_token_index=jnp.asarray(k_pos, jnp.int32),
                    window=as_scalar(opts.get("window")), chunk=as_scalar(opts.get("chunk")),
                    sinks=as_scalar(opts.get("sinks", 0)))
    return q, k, v, spec, allowed


def _check(implementation, q, k, v, spec, allowed, rng, atol):
    g = rng.standard_normal(q.shape)
    ref_out, ref_dq, ref_dk, ref_dv = numpy_attention(q, k, v, allowed, g)
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    def loss(q, k, v):
        return (attend(q, k, v, spec, backend=implementation) * f32(g)).sum()

    out = attend(f32(q), f32(k), f32(v), spec, backend=implementation)
    grads = jax.grad(loss, argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=atol)
    for got, want in zip(grads, (ref_dq, ref_dk, ref_dv)):
        assert not np.isnan(np.asarray(got)).any()
        np.testing.assert_allclose(got, want, atol=atol * 4, rtol=atol * 4)


@pytest.mark.parametrize("case", list(MASKS))
@pytest.mark.parametrize("implementation", ["xla", "xla_blockwise"])
def test_every_mask_term(case, implementation):
    rng = np.random.default_rng()
    q, k, v, spec, allowed = _build(rng, case)
    _check(implementation, q, k, v, spec, allowed, rng, atol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "xla_blockwise"])
def test_gqa_and_unequal_lengths_with_traced_terms(implementation):
    """T != S (queries at the end of the keys), 6 query heads on 2 KV heads, window/chunk/sinks
    passed as traced scalars through jit."""
    rng = np.random.default_rng()
    q, k, v, spec, allowed = _build(rng, "everything", t=24, s=56, hq=6, hkv=2, traced=True)
    g = rng.standard_normal(q.shape)
    ref_out, *ref_grads = numpy_attention(q, k, v, allowed, g)

    @jax.jit
    def run(q, k, v, spec):
        loss = lambda q, k, v: (attend(q, k, v, spec, backend=implementation) * g).sum()
        return attend(q, k, v, spec, backend=implementation), jax.grad(loss, (0, 1, 2))(q, k, v)

    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out, grads = run(f32(q), f32(k), f32(v), spec)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_fully_masked_rows_give_zero_and_minus_inf_lse():
    from pallas_kernels.blockwise import blockwise_attention
    from pallas_kernels.reference import attention_reference
    rng = np.random.default_rng()
    q, k, v, _, _ = random_problem(rng)
    seg = np.sort(rng.integers(1, 4, (2, 48)), axis=1)
    seg[:, :5] = 0  # padding rows: no allowed key at all
    spec = MaskSpec(q_segment_ids=jnp.asarray(seg))
    for fn in (attention_reference, lambda *a, **kw: blockwise_attention(*a, block_k=16, **kw)):
        out, lse = fn(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), spec, return_lse=True)
        assert np.all(np.asarray(out)[:, :5] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, :5]))
        assert np.isfinite(np.asarray(lse)[:, :, 5:]).all()
        grads = jax.grad(lambda q: fn(q, *(jnp.asarray(x, jnp.float32) for x in (k, v)), spec).sum())(
            jnp.asarray(q, jnp.float32))
        assert np.isfinite(np.asarray(grads)).all()


def test_blockwise_lse_matches_numpy():
    from pallas_kernels.blockwise import blockwise_attention
    rng = np.random.default_rng()
    q, k, v, spec, allowed = _build(rng, "skyladder_docs_sinks")
    _, lse = blockwise_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), spec, block_k=16,
                                 return_lse=True)
    s = np.einsum("bthd,bshd->bhts", q, np.repeat(k, 2, axis=2)) * q.shape[-1] ** -0.5
    s = np.where(allowed[:, None], s, -np.inf)
    with np.errstate(divide="ignore"):
        want = np.log(np.exp(s).sum(-1))
    np.testing.assert_allclose(lse, want, atol=1e-5)


def test_tile_classification_is_sound_and_tight_for_contiguous_masks():
    """EMPTY tiles have no allowed pair and FULL tiles only allowed pairs (soundness), and for
    row-contiguous documents the classifier finds every truly empty tile (tightness)."""
    rng = np.random.default_rng()
    t, block = 128, 16
    for case in MASKS:
        _, _, _, spec, allowed = _build(rng, case, t=t, s=t)
        tiles = np.asarray(classify_tiles(spec, 2, t, t, block, block))
        per_tile = allowed.reshape(2, t // block, block, t // block, block).transpose(0, 1, 3, 2, 4)
        any_allowed, all_allowed = per_tile.any((3, 4)), per_tile.all((3, 4))
        assert not np.any((tiles == EMPTY) & any_allowed), case
        assert not np.any((tiles == FULL) & ~all_allowed), case
        if case in ("causal", "window", "chunk", "documents"):
            assert np.array_equal(tiles == EMPTY, ~any_allowed), case


def test_cudnn_rejects_masks_it_cannot_express():
    q = jnp.ones((1, 8, 2, 8))
    with pytest.raises(ValueError, match="chunked"):
        attend(q, q, q, MaskSpec(chunk=4), backend="cudnn")
    with pytest.raises(ValueError, match="unknown attention backend 'flash9000'"):
        attend(q, q, q, MaskSpec(), backend="flash9000")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
def test_cudnn_window_matches_numpy():
    rng = np.random.default_rng()
    q, k, v, _, allowed = _build(rng, "window")
    spec = MaskSpec(window=7)
    to = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = attend(to(q), to(k), to(v), spec, backend="cudnn")
    ref, *_ = numpy_attention(q, k, v, allowed, np.zeros_like(q))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)


def test_dispatch_reaches_the_tpu_kernel_in_interpret_mode():
    """implementation='pallas_tpu' runs the Pallas TPU kernel (interpret mode on CPU) through
    the same op the model calls."""
    rng = np.random.default_rng()
    q, k, v, spec, allowed = _build(rng, "skyladder_docs_sinks", t=160, s=160, hq=2, hkv=1)
    _check("pallas_tpu", q, k, v, spec, allowed, rng, atol=2e-5)


def test_deterministic_flag_reaches_the_gpu_kernel(monkeypatch):
    """`deterministic` (parallel.deterministic) is passed to the Pallas GPU kernel and its
    backward half (what context parallelism calls). A stand-in module records the calls (the
    kernel itself needs a Hopper GPU; tests/test_gpu_kernel.py runs it)."""
    import types

    import pallas_kernels
    seen = []
    fake = types.SimpleNamespace(
        flash_attention=lambda q, k, v, mask, **kw: seen.append(("attention", kw)) or q,
        flash_attention_fwd=lambda *a, **kw: None,
        flash_attention_bwd=lambda *a, **kw: seen.append(("bwd", kw)))
    monkeypatch.setattr(pallas_kernels, "gpu", fake, raising=False)
    q = jnp.ones((1, 8, 2, 8))
    for deterministic in (False, True):
        functions = BACKENDS["pallas_gpu"].build("gpu", deterministic)
        functions.attention(q, q, q, MaskSpec(), scale=None)
    BACKENDS["pallas_gpu"].build("gpu", False).backward(q, q, q, MaskSpec(), q, None, q, scale=None)
    assert seen == [("attention", dict(scale=None, deterministic=False)),
                    ("attention", dict(scale=None, deterministic=True)),
                    ("bwd", dict(scale=None, deterministic=False))]


def test_auto_uses_the_hopper_kernel_only_for_inputs_it_takes():
    import types
    hopper = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
    ampere = types.SimpleNamespace(platform="gpu", compute_capability="8.0")
    choose = lambda device, dtype, head_dim, name="auto", **kw: resolve(name, device=device, dtype=dtype,
                                                                         head_dim=head_dim, **kw).name
    assert choose(hopper, jnp.bfloat16, 128) == "pallas_gpu"
    assert choose(hopper, jnp.float16, 64) == "pallas_gpu"
    assert choose(hopper, jnp.float32, 64) == "xla_blockwise"   # a float32 model
    assert choose(hopper, jnp.bfloat16, 96) == "xla_blockwise"
    assert choose(ampere, jnp.bfloat16, 128) == "xla_blockwise"
    assert choose(types.SimpleNamespace(platform="tpu"), jnp.bfloat16, 128) == "pallas_tpu"
    # an explicit choice that cannot run is refused, naming why and what can (never swapped silently)
    with pytest.raises(ValueError, match="takes bfloat16/float16 inputs, not float32.*'xla_blockwise'"):
        choose(hopper, jnp.float32, 64, "pallas_gpu")
    with pytest.raises(ValueError, match="no forward/backward halves for context parallelism"):
        choose(hopper, jnp.bfloat16, 64, "cudnn", halves=True)
    with pytest.raises(ValueError, match="cannot apply chunked windows"):
        choose(types.SimpleNamespace(platform="tpu"), jnp.bfloat16, 128, "splash", terms={"documents", "chunk"})
