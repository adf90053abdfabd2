"""Rotary position embeddings (RoPE) with every scaling Hugging Face transformers 5.x implements.

Layout: rotate-half, as in HF Llama (dimension i pairs with i + D/2), so checkpoints export
without a q/k permutation. Everything is computed in float32 (bf16 RoPE drifts at long range).

The configuration is a plain dict in exactly the form of transformers 5.x
`config.rope_parameters`, so HF export/import is a copy:

    {"rope_type": "default",  "rope_theta": 10000.0}
    {"rope_type": "linear",   "rope_theta": ..., "factor": 4.0}                      # PI
    {"rope_type": "dynamic",  "rope_theta": ..., "factor": 2.0}                      # dynamic NTK
    {"rope_type": "yarn",     "rope_theta": ..., "factor": 4.0, "original_max_position_embeddings": 4096,
                              optional "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                              "attention_factor", "truncate"}
    {"rope_type": "longrope", "rope_theta": ..., "short_factor": [...], "long_factor": [...],
                              "original_max_position_embeddings": 4096, optional "factor", "attention_factor"}
    {"rope_type": "llama3",   "rope_theta": ..., "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    {"rope_type": "ntk",      "rope_theta": ..., "factor": 4.0}   # ours: static NTK-aware,
        theta * factor^(d/(d-2)); exported to HF as "default" with that theta.

`max_position_embeddings` is passed separately, as in HF where it lives on the model config:
dynamic NTK scales relative to it, and yarn/longrope derive a missing `factor` from it.

Numerics. Frequencies that depend only on the config are computed on the host in NumPy,
following HF's float32 operation order with float64 powers rounded once, so they agree with
transformers to about one ulp on every device (XLA's float32 pow can be ~10 ulps off, and
one ulp of a frequency shifts the phase by ~1e-7 * position * frequency). Only what depends on
the current sequence length is computed in the graph: dynamic NTK's base and longrope's switch.

The current sequence length is HF's `max(position_ids) + 1` over the whole batch. HF's
modules cache dynamic frequencies across calls; here every call uses its own length, which
equals HF on a fresh module.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "ntk")

DEFAULT_THETA = 10000.0  # HF's `default_theta` when a config has no rope_theta

# Keys each type needs, and may have, besides "rope_type" and "rope_theta" (HF's validators).
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "ntk": ("factor",),
}
_OPTIONAL = {
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("factor", "attention_factor"),
}
_FIX = 'e.g. {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096}'


# ----------------------------------------------------------------------------------------------
# Configuration: validation, HF export / import
# ----------------------------------------------------------------------------------------------

def _as_dict(rope) -> dict:
    if hasattr(rope, "to_dict"):  # ml_collections.ConfigDict
        rope = rope.to_dict()
    if not isinstance(rope, Mapping):
        raise ValueError(f"rope config must be a dict like HF `rope_parameters` ({_FIX}); "
                         f"got {type(rope).__name__}.")
    return dict(rope)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _normalise(rope, head_dim: int | None, max_position_embeddings: int | None) -> dict:
    """Checks `rope` and returns a normalised copy; head_dim / max_position_embeddings checks run when given."""
    rope = _as_dict(rope)
    rope_type = rope.setdefault("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope: unknown rope_type {rope_type!r}; use one of {ROPE_TYPES}.")
    where = f"rope (rope_type={rope_type!r})"

    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported; "
                         "remove it (RoPE covers the whole head_dim).")
    rope.pop("partial_rotary_factor", None)

    allowed = {"rope_type", "rope_theta", *_REQUIRED[rope_type], *_OPTIONAL.get(rope_type, ())}
    unknown = sorted(set(rope) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; this type takes {sorted(allowed)}.")
    missing = [k for k in _REQUIRED[rope_type] if k not in rope]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; add them ({_FIX}).")

    def number(key, *, minimum=None, strictly=False, optional=False):
        v = rope.get(key)
        if v is None and optional:
            return
        if not _is_number(v):
            raise ValueError(f"{where}: {key} must be a number, got {v!r}.")
        v = float(v)
        if minimum is not None and (v < minimum or (strictly and v == minimum)):
            raise ValueError(f"{where}: {key}={v} must be {'>' if strictly else '>='} {minimum}.")
        rope[key] = v

    rope["rope_theta"] = rope.get("rope_theta", DEFAULT_THETA)
    number("rope_theta", minimum=1.0, strictly=True)
    if "factor" in rope:
        # yarn and longrope accept factor=None: then max_position_embeddings / original (as HF).
        number("factor", minimum=1.0, optional=rope_type in ("yarn", "longrope"))
    if "original_max_position_embeddings" in rope:
        v = rope["original_max_position_embeddings"]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where}: original_max_position_embeddings must be a positive int "
                             f"(the pretraining context length), got {v!r}.")
        rope["original_max_position_embeddings"] = int(v)

    if rope_type == "yarn":
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            number(key, optional=True)
        number("attention_factor", minimum=0.0, strictly=True, optional=True)
        if (rope.get("beta_fast") or 32) < (rope.get("beta_slow") or 1):
            raise ValueError(f"{where}: beta_fast={rope.get('beta_fast')} must be >= "
                             f"beta_slow={rope.get('beta_slow')} (defaults 32 and 1).")
        if rope.get("truncate") not in (None, True, False):
            raise ValueError(f"{where}: truncate must be true or false, got {rope['truncate']!r}.")
    if rope_type == "longrope":
        number("attention_factor", minimum=0.0, strictly=True, optional=True)
        for key in ("short_factor", "long_factor"):
            v = rope[key]
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or not all(_is_number(x) for x in v):
                raise ValueError(f"{where}: {key} must be a list of numbers, got {v!r}.")
            if head_dim is not None and len(v) != head_dim // 2:
                raise ValueError(f"{where}: {key} has {len(v)} entries; it needs head_dim // 2 = {head_dim // 2}.")
            if any(x <= 0 for x in v):
                raise ValueError(f"{where}: {key} entries must be > 0 (they divide the frequencies).")
            rope[key] = [float(x) for x in v]
    if rope_type == "llama3":
        number("low_freq_factor", minimum=0.0, strictly=True)
        number("high_freq_factor", minimum=0.0, strictly=True)
        if rope["high_freq_factor"] <= rope["low_freq_factor"]:
            raise ValueError(f"{where}: high_freq_factor={rope['high_freq_factor']} must be > "
                             f"low_freq_factor={rope['low_freq_factor']} (Llama 3.1 uses 4.0 and 1.0).")

    if head_dim is not None:
        if not isinstance(head_dim, (int, np.integer)) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"rope: head_dim={head_dim!r} must be a positive even int (RoPE rotates pairs).")
        if rope_type in ("dynamic", "ntk") and head_dim == 2:
            raise ValueError(f"{where}: needs head_dim > 2 (the base is scaled by factor^(d/(d-2))).")
    if max_position_embeddings is not None:
        if not isinstance(max_position_embeddings, (int, np.integer)) or max_position_embeddings < 1:
            raise ValueError(f"rope: max_position_embeddings={max_position_embeddings!r} must be a positive int.")
    return rope


def validate_rope(rope: Mapping, head_dim: int, max_position_embeddings: int) -> dict:
    """A normalised copy of `rope` (numbers as float/int, rope_type and rope_theta filled in).

    Raises ValueError naming the bad or missing key and how to fix it.
    """
    return _normalise(rope, head_dim, max_position_embeddings)


def _ntk_theta(rope: dict, head_dim: int) -> float:
    """Static NTK-aware base: theta * s^(d/(d-2)), so the lowest frequency is interpolated by s."""
    return rope["rope_theta"] * rope["factor"] ** (head_dim / (head_dim - 2))


def to_hf_rope_parameters(rope: Mapping, head_dim: int) -> dict:
    """What goes into HF config.json "rope_parameters". "ntk" becomes "default" with the adjusted theta."""
    rope = _normalise(rope, head_dim, None)
    if rope["rope_type"] == "ntk":
        return {"rope_type": "default", "rope_theta": _ntk_theta(rope, head_dim)}
    return rope


def from_hf_rope_parameters(hf_rope: Mapping) -> dict:
    """Our rope dict from HF `config.rope_parameters` (5.x) or an old-style `rope_scaling` dict."""
    rope = _as_dict(hf_rope)
    old = rope.pop("type", None)  # pre-4.45 name of rope_type; HF standardisation keeps both
    if old is not None:
        if rope.setdefault("rope_type", old) != old:
            raise ValueError(f"HF rope parameters name two types: rope_type={rope['rope_type']!r}, type={old!r}.")
    if rope.get("rope_type") == "ntk":
        raise ValueError('HF has no rope_type "ntk" (we export it as "default"); check the source of this config.')
    return _normalise(rope, None, None)


# ----------------------------------------------------------------------------------------------
# Frequencies
# ----------------------------------------------------------------------------------------------

def _exponents(dim: int) -> np.ndarray:
    """torch.arange(0, dim, 2).float() / dim, in float32 as HF has it."""
    return np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)


def _pow(base, exponent: np.ndarray) -> np.ndarray:
    """float32(base) ** exponent, rounded once from float64 (torch's float32 pow is within ~1 ulp of this)."""
    return (np.float64(np.float32(base)) ** exponent.astype(np.float64)).astype(np.float32)


def _inv_freq_default(theta: float, dim: int) -> np.ndarray:
    return np.float32(1.0) / _pow(theta, _exponents(dim))


def _inv_freq_yarn(rope: dict, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    base, original = rope["rope_theta"], rope["original_max_position_embeddings"]
    factor = rope["factor"]
    if factor is None:  # DeepSeek-V3 style: the ratio of the two context lengths
        factor = max_position_embeddings / original

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    # Dimensions that rotate more than beta_fast times over the original context keep their
    # frequency (extrapolate); fewer than beta_slow times are interpolated by `factor`; a linear ramp between.
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 (as HF)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)

    pos_freqs = _pow(base, _exponents(dim))
    inv_freq_extrapolation = np.float32(1.0) / pos_freqs
    inv_freq_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    extrapolation = np.float32(1.0) - ramp
    inv_freq = (inv_freq_interpolation * (np.float32(1.0) - extrapolation)
                + inv_freq_extrapolation * extrapolation)
    return inv_freq, float(attention_factor)


def _inv_freq_llama3(rope: dict, dim: int) -> np.ndarray:
    inv_freq = _inv_freq_default(rope["rope_theta"], dim)
    factor = np.float32(rope["factor"])
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    # Wavelengths longer than original/low are interpolated by `factor`, shorter than original/high
    # kept, and those between blended smoothly.
    wavelen = np.float32(2 * math.pi) / inv_freq
    long_wave = wavelen > np.float32(original / low)
    short_wave = wavelen < np.float32(original / high)
    scaled = np.where(long_wave, inv_freq / factor, inv_freq)
    smooth = (np.float32(original) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (np.float32(1.0) - smooth) * scaled / factor + smooth * scaled
    return np.where(~short_wave & ~long_wave, smoothed, scaled).astype(np.float32)


def _longrope_attention_factor(rope: dict, max_position_embeddings: int) -> float:
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:  # Phi-3 style: the ratio of the two context lengths
        factor = max_position_embeddings / original
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _is_static(seq_len) -> bool:
    return seq_len is None or isinstance(seq_len, (int, np.integer))


def rope_frequencies(rope: Mapping, head_dim: int, max_position_embeddings: int,
                     seq_len=None) -> tuple[jax.Array, float | jax.Array]:
    """(inv_freq float32 [head_dim // 2], attention_factor) as HF's ROPE_INIT_FUNCTIONS give them.

    `seq_len` (the current sequence length, HF's max position + 1) matters only for "dynamic"
    and "longrope"; it may be a Python int, None (HF's init-time value) or a traced int.
    """
    rope = _normalise(rope, head_dim, max_position_embeddings)
    rope_type, theta, dim = rope["rope_type"], rope["rope_theta"], head_dim

    if rope_type == "default":
        return jnp.asarray(_inv_freq_default(theta, dim)), 1.0
    if rope_type == "linear":  # position interpolation: positions / factor == inv_freq / factor
        return jnp.asarray(_inv_freq_default(theta, dim) / np.float32(rope["factor"])), 1.0
    if rope_type == "ntk":
        return jnp.asarray(_inv_freq_default(_ntk_theta(rope, dim), dim)), 1.0
    if rope_type == "yarn":
        inv_freq, attention_factor = _inv_freq_yarn(rope, dim, max_position_embeddings)
        return jnp.asarray(inv_freq), attention_factor
    if rope_type == "llama3":
        return jnp.asarray(_inv_freq_llama3(rope, dim)), 1.0

    if rope_type == "longrope":
        original = rope["original_max_position_embeddings"]
        shape = _pow(theta, _exponents(dim))
        short = np.float32(1.0) / (np.asarray(rope["short_factor"], np.float32) * shape)
        long = np.float32(1.0) / (np.asarray(rope["long_factor"], np.float32) * shape)
        attention_factor = _longrope_attention_factor(rope, max_position_embeddings)
        if _is_static(seq_len):
            return jnp.asarray(long if seq_len and seq_len > original else short), attention_factor
        return jnp.where(jnp.asarray(seq_len) > original, long, short), attention_factor

    # dynamic NTK: theta * (factor * L / max_pos - (factor - 1))^(d/(d-2)) with L = max(seq_len, max_pos).
    factor, mpe, power = rope["factor"], max_position_embeddings, dim / (dim - 2)
    if _is_static(seq_len):  # HF computes the base in float64 here
        length = mpe if seq_len is None else max(int(seq_len), mpe)
        return jnp.asarray(_inv_freq_default(theta * ((factor * length / mpe) - (factor - 1)) ** power, dim)), 1.0
    # Traced length: float32 like HF's module. Only the length-dependent part is computed in the graph,
    # theta^-e * scale^(-e * power), so it is exact (scale = 1) up to max_position_embeddings.
    length = jnp.maximum(jnp.asarray(seq_len), mpe).astype(jnp.float32)
    scale = (np.float32(factor) * length / np.float32(mpe)) - np.float32(factor - 1)
    scale = jnp.where(length > mpe, scale, 1.0)  # HF keeps the original frequencies up to max_position_embeddings
    exponents = jnp.asarray((_exponents(dim).astype(np.float64) * power).astype(np.float32))
    inv_freq = _inv_freq_default(theta, dim) * jnp.exp(-exponents * jnp.log(scale))
    return inv_freq, 1.0


def rope_cos_sin(positions, rope: Mapping, head_dim: int, max_position_embeddings: int, *,
                 seq_len=None) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 [..., head_dim] for int positions [B, T] (or [T]), attention factor folded in.

    For "dynamic" and "longrope" the current length is HF's max(positions) + 1 over the whole
    array; under shard_map (context parallelism) pass `seq_len` = the global max + 1 instead.
    """
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"rope_cos_sin: positions must be integers, got {positions.dtype}.")
    rope = _as_dict(rope)
    if seq_len is None and rope.get("rope_type") in ("dynamic", "longrope"):
        seq_len = jnp.max(positions) + 1
    inv_freq, attention_factor = rope_frequencies(rope, head_dim, max_position_embeddings, seq_len)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if not (isinstance(attention_factor, float) and attention_factor == 1.0):
        cos, sin = cos * attention_factor, sin * attention_factor
    # rotate-half layout: both halves of the head see the same angles
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x, cos, sin) -> jax.Array:
    """Rotates x [B, T, H, D] by cos/sin [B, T, D] (or [T, D]); float32 inside, x.dtype out."""
    if x.ndim != 4:
        raise ValueError(f"apply_rope: x must be [B, T, H, D], got shape {x.shape}.")
    if cos.shape != sin.shape or cos.shape[-1] != x.shape[-1] or cos.ndim not in (2, 3):
        raise ValueError(f"apply_rope: cos/sin must be [B, T, D] or [T, D] with D = {x.shape[-1]}; "
                         f"got {cos.shape} and {sin.shape}.")
    cos = cos.astype(jnp.float32)[..., None, :]  # broadcast over heads
    sin = sin.astype(jnp.float32)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
