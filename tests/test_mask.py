"""The mask algebra's other forms against `allowed_pair_count`: the host-side pair count
used for MFU."""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mask import MaskSpec, allowed_pair_count, count_allowed_pairs


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
