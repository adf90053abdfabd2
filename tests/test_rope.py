"""RoPE family against Hugging Face transformers' own functions (float32, rotate-half layout).

float32 RoPE agrees to a few ulps: one ulp of a frequency moves the phase by position * ~1e-7
radians, so angle-scaled tolerances below allow 4 ulps of each frequency, nothing more.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax.model import rope as rope_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, Phi3Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

transformers.utils.logging.set_verbosity_error()  # HF warns about factor/length mismatches we set on purpose

FREQ_RTOL = 4 * 2.0**-23  # 4 ulps
_rng = np.random.default_rng(0)
_LONG = [float(x) for x in _rng.uniform(1.0, 20.0, 32)]   # head_dim 64
_SHORT = [float(x) for x in _rng.uniform(0.9, 1.3, 32)]
_LONG96 = [float(x) for x in _rng.uniform(1.0, 40.0, 48)]  # head_dim 96, Phi-3 style
_SHORT96 = [float(x) for x in _rng.uniform(1.0, 1.1, 48)]


def _hf_config(rope, head_dim, max_pos):
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=dict(rope))


def _hf_inv_freq(rope, head_dim, max_pos, seq_len=None):
    config = _hf_config(rope, head_dim, max_pos)
    if rope["rope_type"] == "default":
        inv_freq, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None, seq_len=seq_len)
    return inv_freq.numpy(), factor


# (rope, head_dim, max_position_embeddings, seq_len)
FREQ_CASES = [
    ({"rope_type": "default", "rope_theta": 10000.0}, 64, 2048, None),
    ({"rope_type": "default", "rope_theta": 1e6}, 96, 2048, None),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 64, 2048, None),
    ({"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.5}, 96, 2048, None),
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 64, 256, None),
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 64, 256, 200),   # below max_pos
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 96, 256, 777),   # above
    ({"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 3.3}, 128, 1000, 4321),
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.7}, 64, 777, 500),   # float32 scale != 1
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512},
     64, 2048, None),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
      "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0}, 96, 16384, None),
    ({"rope_type": "yarn", "rope_theta": 1e6, "factor": None, "original_max_position_embeddings": 512,
      "truncate": False}, 128, 2048, None),
    ({"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 512,
      "attention_factor": 1.3, "mscale": 1.0, "mscale_all_dim": 0.5}, 64, 4096, None),
    ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _SHORT, "long_factor": _LONG,
      "original_max_position_embeddings": 512}, 64, 4096, None),
    ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _SHORT, "long_factor": _LONG,
      "original_max_position_embeddings": 512}, 64, 4096, 512),   # last length on short factors
    ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _SHORT, "long_factor": _LONG,
      "original_max_position_embeddings": 512, "factor": 16.0, "attention_factor": 1.2}, 64, 4096, 513),
    ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 128, 131072, None),
    ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 32.0, "low_freq_factor": 2.0,
      "high_freq_factor": 8.0, "original_max_position_embeddings": 256}, 64, 8192, None),
]


@pytest.mark.parametrize("rope,head_dim,max_pos,seq_len", FREQ_CASES,
                         ids=[f"{c[0]['rope_type']}{i}" for i, c in enumerate(FREQ_CASES)])
def test_frequencies_match_transformers(rope, head_dim, max_pos, seq_len):
    want, want_factor = _hf_inv_freq(rope, head_dim, max_pos, seq_len)
    got, factor = rope_lib.rope_frequencies(rope, head_dim, max_pos, seq_len)
    assert got.dtype == jnp.float32 and got.shape == (head_dim // 2,)
    np.testing.assert_allclose(np.asarray(got), want, rtol=FREQ_RTOL, atol=0)
    np.testing.assert_allclose(factor, want_factor, rtol=1e-12)
    if seq_len is not None:  # the same from a traced length, as inside the model
        traced, traced_factor = jax.jit(lambda n: rope_lib.rope_frequencies(rope, head_dim, max_pos, n))(
            jnp.int32(seq_len))
        np.testing.assert_allclose(np.asarray(traced), want, rtol=FREQ_RTOL, atol=0)
        np.testing.assert_allclose(traced_factor, want_factor, rtol=1e-7)  # a float32 output of jit


def test_phi3_longrope_import():
    """Phi-3 keeps original_max_position_embeddings outside rope_parameters; HF moves it in."""
    config = Phi3Config(hidden_size=192, num_attention_heads=2, max_position_embeddings=4096,
                        original_max_position_embeddings=512,
                        rope_parameters={"rope_type": "longrope", "short_factor": _SHORT96,
                                         "long_factor": _LONG96})
    rope = rope_lib.from_hf_rope_parameters(config.rope_parameters)
    for seq_len in (None, 512, 513):
        want, want_factor = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=seq_len)
        got, factor = rope_lib.rope_frequencies(rope, 96, 4096, seq_len)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=FREQ_RTOL, atol=0)
        np.testing.assert_allclose(factor, want_factor, rtol=1e-12)


def _rotate_half(x):
    return np.concatenate([-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]], axis=-1)


# (rope, head_dim, max_position_embeddings, largest position)
E2E_CASES = [
    ({"rope_type": "default", "rope_theta": 10000.0}, 64, 2048, 40000),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 96, 2048, 8000),
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 64, 256, 200),
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 96, 256, 700),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512,
      "mscale": 0.707, "mscale_all_dim": 1.0}, 64, 2048, 2000),
    ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _SHORT, "long_factor": _LONG,
      "original_max_position_embeddings": 512}, 64, 4096, 511),   # max + 1 == 512: short factors
    ({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _SHORT, "long_factor": _LONG,
      "original_max_position_embeddings": 512}, 64, 4096, 512),   # max + 1 == 513: long factors
    ({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 256}, 64, 2048, 3000),
]


@pytest.mark.parametrize("rope,head_dim,max_pos,largest", E2E_CASES,
                         ids=[f"{c[0]['rope_type']}{i}" for i, c in enumerate(E2E_CASES)])
def test_cos_sin_and_apply_match_llama(rope, head_dim, max_pos, largest):
    rng = np.random.default_rng(largest)
    B, T, H = 2, 48, 3
    positions = rng.integers(0, largest + 1, (B, T))  # arbitrary ints, as packing / PoSE give
    positions[1, 5] = largest
    x = rng.standard_normal((B, T, H, head_dim)).astype(np.float32)

    hf_rope = LlamaRotaryEmbedding(_hf_config(rope, head_dim, max_pos))  # fresh: HF caches dynamic state
    cos_hf, sin_hf = hf_rope(torch.from_numpy(x), torch.from_numpy(positions))
    x_hf, _ = apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos_hf, sin_hf, unsqueeze_dim=2)
    cos_hf, sin_hf, x_hf = cos_hf.numpy(), sin_hf.numpy(), x_hf.numpy()

    @jax.jit
    def ours(positions, x):
        cos, sin = rope_lib.rope_cos_sin(positions, rope, head_dim, max_pos)
        return cos, sin, rope_lib.apply_rope(x, cos, sin)

    cos, sin, out = map(np.asarray, ours(jnp.asarray(positions, jnp.int32), jnp.asarray(x)))
    assert cos.dtype == sin.dtype == out.dtype == np.float32 and cos.shape == (B, T, head_dim)

    inv_freq, _ = _hf_inv_freq(rope, head_dim, max_pos, int(positions.max()) + 1)
    angle = positions[..., None] * np.concatenate([inv_freq, inv_freq])  # [B, T, D]
    scale = max(np.abs(cos_hf).max(), 1.0)  # attention factor
    tol = 1e-6 + scale * FREQ_RTOL * angle
    assert np.all(np.abs(cos - cos_hf) <= tol), np.abs(cos - cos_hf).max()
    assert np.all(np.abs(sin - sin_hf) <= tol), np.abs(sin - sin_hf).max()
    tol_x = 1e-6 + tol[:, :, None, :] * (np.abs(x) + np.abs(_rotate_half(x)))
    assert np.all(np.abs(out - x_hf) <= tol_x), np.abs(out - x_hf).max()

    # The layout alone, on HF's own cos/sin: same float32 operations, so ~exact.
    out_on_hf = rope_lib.apply_rope(jnp.asarray(x), jnp.asarray(cos_hf), jnp.asarray(sin_hf))
    np.testing.assert_allclose(np.asarray(out_on_hf), x_hf, rtol=1e-6, atol=1e-6)


def test_unbatched_positions():
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    positions = jnp.asarray(np.random.default_rng(1).integers(0, 300, 40))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 40, 2, 32)), jnp.float32)

    @jax.jit
    def both(positions, x):
        unbatched = rope_lib.rope_cos_sin(positions, rope, 32, 256)
        batched = rope_lib.rope_cos_sin(positions[None], rope, 32, 256)
        return unbatched, batched, rope_lib.apply_rope(x, *unbatched), rope_lib.apply_rope(x, *batched)

    (cos1, _), (cos2, _), out1, out2 = both(positions, x)
    assert cos1.shape == (40, 32) and cos2.shape == (1, 40, 32)
    np.testing.assert_array_equal(np.asarray(cos1), np.asarray(cos2)[0])
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))


@pytest.mark.parametrize("head_dim,factor", [(64, 4.0), (128, 8.0)])
def test_ntk_exports_as_default(head_dim, factor):
    rope = {"rope_type": "ntk", "rope_theta": 10000.0, "factor": factor}
    hf = rope_lib.to_hf_rope_parameters(rope, head_dim)
    assert hf["rope_type"] == "default" and set(hf) == {"rope_type", "rope_theta"}
    np.testing.assert_allclose(hf["rope_theta"], 10000.0 * factor ** (head_dim / (head_dim - 2)), rtol=1e-12)
    want, _ = _hf_inv_freq(hf, head_dim, 2048)
    got, factor_out = rope_lib.rope_frequencies(rope, head_dim, 2048)
    np.testing.assert_allclose(np.asarray(got), want, rtol=FREQ_RTOL, atol=0)
    assert factor_out == 1.0
    # NTK-aware: the highest frequency is kept, the lowest is interpolated by exactly `factor`.
    default, _ = rope_lib.rope_frequencies({"rope_type": "default", "rope_theta": 10000.0}, head_dim, 2048)
    np.testing.assert_allclose(got[0], default[0], rtol=1e-7)
    np.testing.assert_allclose(float(default[-1] / got[-1]), factor, rtol=1e-5)


@pytest.mark.parametrize("rope,head_dim,max_pos,_", [c for c in FREQ_CASES if c[3] is None],
                         ids=[c[0]["rope_type"] for c in FREQ_CASES if c[3] is None])
def test_hf_round_trip(rope, head_dim, max_pos, _):
    """to_hf -> a real HF config (which standardises it) -> from_hf gives back the same dict."""
    ours = rope_lib.validate_rope(rope, head_dim, max_pos)
    config = _hf_config(rope_lib.to_hf_rope_parameters(rope, head_dim), head_dim, max_pos)
    assert rope_lib.from_hf_rope_parameters(config.rope_parameters) == ours


def test_from_hf_old_style():
    old = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32768, "rope_theta": 1000000.0}
    assert rope_lib.from_hf_rope_parameters(old) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}


_OK_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}


@pytest.mark.parametrize("rope,head_dim,match", [
    ({"rope_type": "yarnn"}, 64, "unknown rope_type"),
    ({"rope_type": "linear"}, 64, r"missing key.*factor"),
    ({"rope_type": "linear", "factor": 2.0, "factr": 2.0}, 64, "factr"),
    ({"rope_type": "linear", "factor": 0.5}, 64, "factor=0.5 must be >= 1"),
    ({"rope_type": "default", "rope_theta": -5.0}, 64, "rope_theta"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, 64, "partial_rotary_factor"),
    ({"rope_type": "default"}, 63, "head_dim"),
    ({**_OK_YARN, "original_max_position_embeddings": "512"}, 64, "original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 4.0}, 64, r"missing key.*original_max_position_embeddings"),
    ({**_OK_YARN, "beta_fast": 1.0, "beta_slow": 32.0}, 64, "beta_fast"),
    ({**_OK_YARN, "truncate": "no"}, 64, "truncate"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 31, "long_factor": [1.0] * 32,
      "original_max_position_embeddings": 512}, 64, r"short_factor has 31 entries.*32"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8192}, 64, "high_freq_factor"),
])
def test_bad_configs_raise(rope, head_dim, match):
    with pytest.raises(ValueError, match=match):
        rope_lib.validate_rope(rope, head_dim, 2048)
    with pytest.raises(ValueError, match=match):
        rope_lib.rope_cos_sin(jnp.arange(8)[None], rope, head_dim, 2048)


def test_bad_inputs_raise():
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="integers"):
        rope_lib.rope_cos_sin(jnp.arange(8.0), rope, 16, 128)
    cos, sin = rope_lib.rope_cos_sin(jnp.arange(8)[None], rope, 16, 128)
    with pytest.raises(ValueError, match="D = 32"):
        rope_lib.apply_rope(jnp.ones((1, 8, 2, 32)), cos, sin)
    with pytest.raises(ValueError, match="HF has no rope_type"):
        rope_lib.from_hf_rope_parameters({"rope_type": "ntk", "factor": 2.0})


def test_bfloat16_input_rotates_in_float32():
    rng = np.random.default_rng(3)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    positions = jnp.asarray(rng.integers(0, 30000, (2, 64)), jnp.int32)
    x = jnp.asarray(rng.standard_normal((2, 64, 2, 64)), jnp.bfloat16)

    @jax.jit
    def run(positions, x):
        cos, sin = rope_lib.rope_cos_sin(positions, rope, 64, 2048)
        # the usual mistake, to show this test has teeth: rotating with bf16 cos/sin
        cos16, sin16 = (a.astype(jnp.bfloat16)[:, :, None] for a in (cos, sin))
        naive = x * cos16 + jnp.concatenate([-x[..., 32:], x[..., :32]], axis=-1) * sin16
        return cos, sin, rope_lib.apply_rope(x, cos, sin), naive

    cos, sin, out, naive = run(positions, x)
    assert out.dtype == jnp.bfloat16
    # Float64 reference from the same bf16 input and float32 cos/sin, rounded once to bf16.
    x64, c64, s64 = (np.asarray(a, np.float64) for a in (x, cos[:, :, None], sin[:, :, None]))
    want = (x64 * c64 + _rotate_half(x64) * s64).astype(jnp.bfloat16)
    mismatch = np.mean(np.asarray(out) != want)
    assert mismatch < 1e-3, mismatch  # only float32 double-rounding ties may differ
    assert np.mean(np.asarray(naive) != want) > 0.05
