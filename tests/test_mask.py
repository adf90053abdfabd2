"""The mask algebra's other forms against `dense_mask` / `allowed_pair_count`: the host-side
pair count used for MFU, and the padded operands the Pallas kernels read."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mask import MaskSpec, allowed_pair_count, count_allowed_pairs, dense_mask
from pallas_kernels.operands import INT_MIN, mask_operands


def _packed_rows(rng, batch, length):
    """Contiguous documents with increasing ids and runs of padding (segment 0) anywhere."""
    rows = np.zeros((batch, length), np.int32)
    for row in rows:
        cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(0, 6), replace=False))
        next_id = 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, length]):
            if rng.random() < 0.25:
                continue                      # a padding run
            row[lo:hi] = next_id
            next_id += 1
    return rows


def test_count_allowed_pairs_matches_the_mask_algebra():
    """The O(B*L) NumPy count equals `allowed_pair_count` (the algebra on the device)."""
    seed = int(np.random.SeedSequence().entropy % 2 ** 32)   # fresh inputs, reproducible by seed
    rng = np.random.default_rng(seed)
    b, t = 3, int(rng.integers(40, 130))
    seg = _packed_rows(rng, b, t)
    idx = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    settings = [(None, None, 0), (int(rng.integers(1, 20)), None, 0), (None, int(rng.integers(1, 40)), 2),
                (int(rng.integers(1, 30)), int(rng.integers(1, 50)), int(rng.integers(0, 6))),
                (1, None, 1), (None, 1, 0), (t + 5, t + 5, t + 5)]
    count = jax.jit(lambda spec: allowed_pair_count(spec, b, t, t, rows=32))
    for window, chunk, sinks in settings:
        for documents in (True, False):
            got = count_allowed_pairs(idx, seg, window=window, chunk=chunk, sinks=sinks, documents=documents)
            spec = MaskSpec(q_segment_ids=jnp.asarray(seg) if documents else None, window=window,
                            chunk=chunk, sinks=sinks)
            want = float(count(spec))
            assert got == want, dict(seed=seed, window=window, chunk=chunk, sinks=sinks, documents=documents)


def _zigzag(length, shards, rank):
    chunk = length // (2 * shards)
    idx = np.arange(length).reshape(2 * shards, chunk)
    return np.concatenate([idx[rank], idx[2 * shards - 1 - rank]])


def _random_mask(rng, batch, q_len, kv_len):
    """Any subset of the terms, static or traced. Queries are a zigzag shard of the keys' row
    (q_len = kv_len / 2) or its last q_len tokens."""
    docs = _packed_rows(rng, batch, kv_len)
    if q_len == kv_len // 2:
        q_index = np.stack([_zigzag(kv_len, 2, rng.integers(0, 2)) for _ in range(batch)])
    else:
        q_index = np.tile(np.arange(kv_len - q_len, kv_len), (batch, 1))
    traced = rng.random() < 0.5
    value = lambda lo, hi: (jnp.int32 if traced else int)(rng.integers(lo, hi))
    documents = rng.random() < 0.6
    return MaskSpec(
        causal=bool(rng.random() < 0.8),
        q_token_index=jnp.asarray(q_index, jnp.int32),
        q_segment_ids=jnp.asarray(np.take_along_axis(docs, q_index, 1)) if documents else None,
        kv_segment_ids=jnp.asarray(docs) if documents else None,
        window=value(1, 80) if rng.random() < 0.5 else None,
        chunk=value(1, 100) if rng.random() < 0.5 else None,
        sinks=value(0, 6) if rng.random() < 0.7 else 0)


def _rule(ops):
    """The elementwise rule of `pallas_kernels.operands`, rebuilt from the operands alone."""
    q_pos, k_pos = ops.q_pos[:, :, None], ops.k_pos[:, None, :]
    ok = k_pos <= q_pos if ops.flags["causal"] else jnp.ones((q_pos.shape[0], q_pos.shape[1], k_pos.shape[2]), bool)
    body = jnp.ones_like(ok)
    if ops.q_lo is not None:
        body &= k_pos >= ops.q_lo[:, :, None]
    if ops.q_seg is not None:
        body &= ops.k_seg[:, None, :] == ops.q_seg[:, :, None]
    if ops.sinks is not None:
        body |= k_pos < ops.sinks[0]
    return ok & body


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_mask_operands_rebuild_the_dense_mask(seed):
    """For random masks, the kernels' reduced rule on the padded operands equals `dense_mask`
    on the real part; padding keeps the tile classes' inputs (edge padding) and padding
    queries match no key."""
    seed = int(np.random.SeedSequence().entropy % 2 ** 32) if seed is None else seed
    rng = np.random.default_rng(seed)
    for _ in range(6):
        batch, kv_len = 2, 4 * int(rng.integers(10, 50))
        q_len = kv_len // 2 if rng.random() < 0.5 else int(rng.integers(kv_len // 2 + 1, kv_len + 1))
        q_pad, kv_pad = q_len + int(rng.integers(0, 40)), kv_len + int(rng.integers(0, 40))
        mask = _random_mask(rng, batch, q_len, kv_len)
        ops = mask_operands(mask, batch, q_len, kv_len, q_pad, kv_pad)
        assert ops.q_pos.shape == (batch, q_pad) and ops.k_pos.shape == (batch, kv_pad)
        got = np.asarray(_rule(ops))[:, :q_len, :kv_len]
        want = np.asarray(dense_mask(mask, batch, q_len, kv_len))
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}, {mask}")

        flags = ops.flags
        assert flags["has_seg"] == mask.has_segments
        assert flags["has_lo"] == (mask.window is not None or mask.chunk is not None)
        static_zero = isinstance(mask.sinks, int) and mask.sinks == 0
        assert flags["has_sinks"] == (not static_zero and (flags["has_lo"] or flags["has_seg"]))
        # Edge padding repeats the last real entry; the padded MaskSpec carries the same arrays.
        last_real = np.asarray(ops.q_pos)[:, q_len - 1:q_len]
        assert (np.asarray(ops.q_pos)[:, q_len:] == last_real).all()
        np.testing.assert_array_equal(ops.padded.kv_token_index, ops.k_pos)
        if ops.q_seg is not None:
            padding = np.asarray(ops.padded.q_segment_ids) == 0
            assert (np.asarray(ops.q_seg)[padding] == INT_MIN).all()
            assert not np.isin(INT_MIN, np.asarray(ops.k_seg))


def test_mask_operands_drop_unconfigured_terms():
    ops = mask_operands(MaskSpec(sinks=4), 1, 8, 8, 16, 16)        # causal only: sinks cannot matter
    assert ops.flags == dict(causal=True, has_lo=False, has_seg=False, has_sinks=False)
    assert ops.q_lo is ops.q_seg is ops.k_seg is ops.sinks is None
    ops = mask_operands(MaskSpec(causal=False, window=2 ** 40), 1, 8, 8, 8, 8)   # a huge static window
    assert ops.flags["has_lo"] and int(ops.q_lo.min()) < 0
