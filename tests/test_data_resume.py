"""Exact resume: consume n batches, save the iterator with Orbax (grain.checkpoint.CheckpointSave
inside a CheckpointManager Composite, as the train loop does), restore it in a fresh process,
and compare the next k batches element for element. Cases cross a curriculum boundary, mix
sources, use PoSE positions, both packings, a background prefetch thread, and a pre-tokenized
ArrayRecord corpus."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ctxjax.config import get_config
from ctxjax.data import BATCH_KEYS, build_corpus, make_tokenizer, make_train_iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = np.random.SeedSequence().entropy

# The fresh process: rebuild each iterator from its config, restore it through Orbax, and save
# the next k batches.
RESTORE = r"""
import json, sys
import grain, ml_collections, numpy as np, orbax.checkpoint as ocp
from ctxjax.data import make_train_iterator

def main():
    for case in json.load(open(sys.argv[1])):
        cfg = ml_collections.ConfigDict(json.loads(case["config"]))
        it = make_train_iterator(cfg, seq_len=case["seq_len"], global_batch_size=case["batch"],
                                 seed=case["seed"], process_index=0, process_count=1)
        mngr = ocp.CheckpointManager(case["dir"])
        it = mngr.restore(case["n"], args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it))).data
        batches = [next(it) for _ in range(case["k"])]
        np.savez(case["out"], **{f"{i}_{key}": b[key] for i, b in enumerate(batches) for key in b})
        it.close()

if __name__ == "__main__":
    main()
"""


def _save(it, directory, step):
    import grain
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(directory)
    mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()


def test_restore_in_a_fresh_process_continues_exactly(tmp_path):
    rng = np.random.default_rng(SEED % 2**63)
    docs = ["".join(rng.choice(list("xyz \n\t"), int(n))) for n in rng.integers(1, 300, 200)]
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    # Documents that exactly fill rows of 20 tokens: concat packing then saves states with no
    # remainder, which Grain cannot restore from JSON without ctxjax's fix-up.
    (tmp_path / "exact.jsonl").write_text("\n".join(json.dumps({"text": f"{i:018d}"}) for i in range(300)))
    build_corpus(iter(docs), make_tokenizer(get_config().data), str(tmp_path / "records"),
                 shard_mb=0.01, progress=False)

    def config(**overrides):
        cfg = get_config().data
        cfg.validation_fraction = 0.1
        cfg.update(overrides)
        return cfg

    seed = int(rng.integers(1 << 30))
    cases = [  # (config, seq_len, global batch, n consumed before saving, k compared after)
        (config(sources=[dict(kind="stdlib", weight=0.6), dict(kind="jsonl", path=str(tmp_path / "short.jsonl"),
                                                               weight=0.4)],
                curriculum=((0, 256, 8), (3, 512, 4), (5, 1024, 2)), rope_positions="pose",
                pose_target_length=8192, prefetch=2), 1024, 2, 3, 4),  # saved exactly at a boundary
        (config(sources=[dict(kind="jsonl", path=str(tmp_path / "exact.jsonl"))], packing="concat",
                curriculum=((0, 20, 8), (2, 40, 4)), prefetch=0), 40, 4, 3, 3),
        (config(sources=[dict(kind="arrayrecord", path=str(tmp_path / "records"))], rope_positions="continuous",
                long_documents="split_drop", prefetch=0), 128, 4, 5, 3),
    ]
    spec, expected = [], []
    for i, (cfg, seq_len, batch, n, k) in enumerate(cases):
        it = make_train_iterator(cfg, seq_len=seq_len, global_batch_size=batch, seed=seed,
                                 process_index=0, process_count=1)
        for _ in range(n):
            next(it)
        _save(it, str(tmp_path / f"ckpt{i}"), n)
        expected.append([next(it) for _ in range(k)])
        it.close()
        spec.append(dict(config=cfg.to_json(), seq_len=seq_len, batch=batch, seed=seed, n=n, k=k,
                         dir=str(tmp_path / f"ckpt{i}"), out=str(tmp_path / f"restored{i}.npz")))
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    (tmp_path / "restore.py").write_text(RESTORE)
    result = subprocess.run([sys.executable, str(tmp_path / "restore.py"), str(tmp_path / "cases.json")],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]

    for i, batches in enumerate(expected):
        restored = np.load(tmp_path / f"restored{i}.npz")
        for j, batch in enumerate(batches):
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(restored[f"{j}_{key}"], batch[key], err_msg=f"case {i} batch {j} {key}")
    shapes = [b["tokens"].shape for b in expected[0]]
    assert shapes == [(4, 512), (4, 512), (2, 1024), (2, 1024)]  # the restore crossed the next boundary too


def test_restoring_another_runs_state_fails_loudly():
    cfg = get_config().data
    cfg.prefetch = 0
    it = make_train_iterator(cfg, seq_len=256, global_batch_size=2, seed=0, process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    cfg.curriculum = ((0, 128, 4), (10, 256, 2))
    other = make_train_iterator(cfg, seq_len=256, global_batch_size=2, seed=0, process_index=0, process_count=1)
    state["stage"] = 5
    with pytest.raises(ValueError, match="stage 5"):
        other.set_state(state)
