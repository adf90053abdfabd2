"""ctxjax.data pipeline: packed batches checked against the documents they came from (an
independent byte-level reference stream), BOS/EOS, long-document splitting, RoPE positions
(reset, continuous, PoSE), weighted mixtures, the length curriculum, host sharding, evaluation
batches, worker processes, and configuration errors."""
import json
import random
import re

import numpy as np
import pytest

from ctxjax.config import get_config
from ctxjax.data import (BATCH_KEYS, build_corpus, curriculum_stages, make_eval_batches,
                         make_tokenizer, make_train_iterator, pose_positions)
from ctxjax.data.sources import open_source

SEED = np.random.SeedSequence().entropy
BOS, EOS, PAD = 256, 257, 258
ID = re.compile(rb"^<(\d{4})>")


def _rng(*salt):
    return np.random.default_rng([SEED % 2**63, *salt])


def _cfg(path, **overrides):
    cfg = get_config().data
    cfg.sources = [dict(kind="jsonl", path=str(path), text_field="text", weight=1.0)]
    cfg.prefetch = 0
    cfg.validation_fraction = 0.0
    cfg.update(overrides)
    return cfg


def _take(cfg, n, *, seq_len, batch, seed=0, process_index=0, process_count=1):
    it = make_train_iterator(cfg, seq_len=seq_len, global_batch_size=batch, seed=seed,
                             process_index=process_index, process_count=process_count)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def _segments(batch):
    """(tokens, rope_positions) of every segment of every row."""
    for row in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment not contiguous"
            yield batch["tokens"][row, idx], batch["rope_positions"][row, idx]


def _doc_ids(batches):
    ids = []
    for b in batches:
        for tokens, _ in _segments(b):
            if tokens[0] == BOS and (m := ID.match(bytes(tokens[1:7].astype(np.uint8)))):
                ids.append(int(m.group(1)))
    return ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 JSONL documents '<iiii>' + random code-ish text of 1..600 bytes; returns (path, texts)."""
    rng = _rng(0)
    alphabet = np.array(list("abcdefghij klmnop\n\t    ()=:"))
    texts = [f"<{i:04d}>" + "".join(rng.choice(alphabet, int(rng.integers(1, 600)))) for i in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return path, texts


def _reference_stream(texts, *, bos=True, eos=True, epochs=2):
    one = np.concatenate([np.r_[[BOS] * bos, np.frombuffer(t.encode(), np.uint8), [EOS] * eos] for t in texts])
    return np.tile(one.astype(np.int32), epochs)


def test_first_fit_batches_are_pieces_of_the_documents(corpus):
    path, texts = corpus
    raw = [t.encode() for t in texts]
    batches = _take(_cfg(path), 6, seq_len=512, batch=4, seed=int(_rng(1).integers(1 << 30)))
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        assert all(v.dtype == np.int32 and v.shape == (4, 512) for v in b.values())
        assert np.array_equal(b["token_index"], np.broadcast_to(np.arange(512), (4, 512)))
        for row in b["segment_ids"]:
            used = row[row > 0]
            assert used[0] == 1 and np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1)
            assert np.all(row[len(used):] == 0)  # padding only at the end of a first-fit row
        assert np.all(b["tokens"][b["segment_ids"] == 0] == PAD)
    n_whole = 0
    for b in batches:
        for tokens, rope in _segments(b):
            assert np.array_equal(rope, np.arange(len(tokens)))  # 'reset': 0.. in each document
            body = tokens[1:] if tokens[0] == BOS else tokens
            body = body[:-1] if body[-1] == EOS else body
            assert not np.isin(body, [BOS, EOS, PAD]).any()
            body = bytes(body.astype(np.uint8))
            if tokens[0] == BOS:
                doc = raw[int(ID.match(body).group(1))]
                assert doc.startswith(body)
                if tokens[-1] == EOS:
                    assert body == doc
                    n_whole += 1
            else:  # a later piece of a document longer than L
                assert any(body in d for d in raw)
    assert n_whole > 10


@pytest.mark.parametrize("long_documents", ["split_keep", "split_drop"])
def test_concat_is_the_document_stream_cut_every_L(corpus, long_documents):
    path, texts = corpus
    L, batch = 128, 2
    cfg = _cfg(path, packing="concat", shuffle=False, long_documents=long_documents)
    batches = _take(cfg, 40, seq_len=L, batch=batch)
    if long_documents == "split_drop":  # documents longer than L are trimmed to a multiple of L
        docs = [np.r_[[BOS], np.frombuffer(t.encode(), np.uint8), [EOS]] for t in texts]
        docs = [d if len(d) <= L else d[:len(d) - len(d) % L] for d in docs]
        ref = np.tile(np.concatenate(docs).astype(np.int32), 2)
    else:
        ref = _reference_stream(texts)
    got = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(got, ref[:got.size])
    for b in batches:
        assert np.all(b["segment_ids"] > 0)  # no padding
        for tokens, rope in _segments(b):
            assert np.array_equal(rope, np.arange(len(tokens)))
            assert not np.isin(tokens[1:], [BOS]).any()  # a new document starts a new segment


@pytest.mark.parametrize("long_documents", ["split_keep", "split_drop"])
def test_a_document_longer_than_all_others_together(tmp_path, long_documents):
    L, n_big = 128, 20 * 128 + 37
    rng = _rng(2)
    (tmp_path / "a_huge.txt").write_text("Z" * n_big)
    for i in range(15):
        (tmp_path / f"s{i:02d}.txt").write_text("".join(rng.choice(list("abc \n"), 100)))
    cfg = get_config().data
    cfg.update(dict(prefetch=0, validation_fraction=0.0, shuffle=False, packing_bins=4,
                    long_documents=long_documents))
    cfg.sources = [dict(kind="text", path=str(tmp_path))]
    # Batch = one first-fit group of 4 rows: the huge document (first in order) fills rows 0..20,
    # its remainder lands in rows 20..23 with small documents; epoch 2 starts after row 31.
    batches = _take(cfg, 6, seq_len=L, batch=4)
    z = sum(int(np.sum(b["tokens"] == ord("Z"))) for b in batches)
    total = n_big + 2  # BOS and EOS
    assert z == (n_big if long_documents == "split_keep" else total - total % L - 1)
    for b in batches:
        for tokens, _ in _segments(b):
            if tokens[0] != BOS and long_documents == "split_drop":
                assert len(tokens) == L  # only whole pieces of the long document survive


def test_rope_positions_continuous_and_pose(corpus):
    path, _ = corpus
    L, target, chunks = 256, 4096, 3
    seed = int(_rng(3).integers(1 << 30))
    reset = _take(_cfg(path), 3, seq_len=L, batch=4, seed=seed)
    cont = _take(_cfg(path, rope_positions="continuous"), 3, seq_len=L, batch=4, seed=seed)
    cfg = _cfg(path, rope_positions="pose", pose_target_length=target, pose_chunks=chunks)
    pose = _take(cfg, 3, seq_len=L, batch=4, seed=seed)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(reset, pose))  # only positions differ
    assert all(np.array_equal(b["rope_positions"], b["token_index"]) for b in cont)
    jumps = 0
    for b in pose:
        for tokens, rope in _segments(b):
            steps = np.diff(rope)
            assert rope[0] == 0 and np.all(steps >= 1) and rope[-1] < target
            assert np.count_nonzero(steps > 1) <= chunks - 1
            jumps += np.count_nonzero(steps > 1)
    assert jumps > 10 and max(b["rope_positions"].max() for b in pose) > L
    again = _take(cfg, 3, seq_len=L, batch=4, seed=seed)
    assert all(np.array_equal(a["rope_positions"], b["rope_positions"]) for a, b in zip(pose, again))


def _pose_offsets(rng, *, docs, n, target, chunks, per_row=10, pad=3):
    """pose_positions on `docs` documents of n tokens, `per_row` to a row followed by `pad` padding
    tokens: (positions [docs, n] with the structure checked, offsets = positions - arange(n))."""
    rows = docs // per_row
    segment_ids = np.tile(np.r_[np.repeat(np.arange(1, per_row + 1), n), np.zeros(pad, int)], (rows, 1))
    positions = np.tile(np.r_[np.tile(np.arange(n), per_row), np.arange(pad)], (rows, 1))
    out = pose_positions(positions, segment_ids, rng, target, chunks)
    assert np.array_equal(out[:, -pad:], positions[:, -pad:])  # padding untouched
    out = out[:, :-pad].reshape(docs, n)
    steps = np.diff(out, axis=1)
    assert np.all(out[:, 0] == 0) and np.all(steps >= 1) and out.max() <= target - 1
    assert np.all(np.count_nonzero(steps > 1, axis=1) <= chunks - 1)  # consecutive within each chunk
    return out, out - np.arange(n)


def _paper_pose(r: random.Random, n: int, target: int) -> np.ndarray:
    """Three PoSE chunks as sampled by the code of Fig. 6 of the paper (L_c = n, L_t = target)."""
    l0 = r.randint(1, n - 2)
    l1 = r.randint(1, n - l0 - 1)
    u1 = r.randint(0, target - n)
    u2 = r.randint(u1, target - n)
    pos = np.arange(n)
    pos[l0:] += u1
    pos[l0 + l1:] += u2 - u1
    return pos


def _close(a, b, sigmas=4.5):
    """Means of two samples (or a sample and a number) within `sigmas` standard errors."""
    se2 = np.var(a, ddof=1) / len(a) + (np.var(b, ddof=1) / len(b) if np.ndim(b) else 0.0)
    return abs(np.mean(a) - np.mean(b)) <= sigmas * np.sqrt(se2)


def test_pose_skips_are_drawn_in_sequence_as_in_the_paper():
    # One token per chunk (n == chunks) exposes every skip: token i sits at i + u_i.
    skips_range, chunks, docs = 1000, 4, 30000
    _, u = _pose_offsets(_rng(10), docs=docs, n=chunks, target=skips_range + chunks, chunks=chunks)
    assert np.all(np.diff(u, axis=1) >= 0) and u.max() <= skips_range
    for i in range(1, chunks):  # u_i ~ U{u_(i-1), ..., R}: E[u_i] = (E[u_(i-1)] + R) / 2 = R (1 - 2^-i)
        assert _close(u[:, i], skips_range * (1 - 2.0**-i)), (i, u[:, i].mean())

    # Chunk lengths and skips together, against the paper's sampling code with another RNG.
    n, target, docs = 64, 1024, 20000
    ours, u = _pose_offsets(_rng(11), docs=docs, n=n, target=target, chunks=3)
    r = random.Random(int(_rng(12).integers(2**63)))
    paper = np.stack([_paper_pose(r, n, target) for _ in range(docs)])
    u_paper = paper - np.arange(n)
    for stat in (lambda u: u[:, -1],  # the last skip
                 lambda u: np.sum(u == 0, axis=1),  # the first chunk (and any chunk not skipped)
                 lambda u: np.sum(u == u[:, -1:], axis=1),  # the last chunk (and any with its skip)
                 lambda u: u.mean(axis=1)):
        assert _close(stat(u), stat(u_paper)), (np.mean(stat(u)), np.mean(stat(u_paper)))


def test_weighted_mixture_of_sources(tmp_path):
    rng = _rng(4)
    for name, letter in (("a.jsonl", "a"), ("b.jsonl", "b")):
        (tmp_path / name).write_text("\n".join(json.dumps({"text": letter * int(n)})
                                               for n in rng.integers(1, 200, 100)))
    cfg = _cfg(tmp_path / "a.jsonl")
    cfg.sources = [dict(kind="jsonl", path=str(tmp_path / "a.jsonl"), weight=0.75),
                   dict(kind="jsonl", path=str(tmp_path / "b.jsonl"), weight=0.25)]
    batches = _take(cfg, 10, seq_len=64, batch=8)
    kinds = []
    for b in batches:
        for row, seg in zip(b["tokens"], b["segment_ids"]):
            letters = set(row[(seg > 0) & (row < 256)].tolist())
            assert letters in ({ord("a")}, {ord("b")})  # each source is packed on its own
            kinds.append(letters.pop())
    assert abs(kinds.count(ord("a")) - 60) <= 2  # 75% of 80 rows, i.e. of the tokens


def test_curriculum_switches_shapes_and_keeps_its_place(corpus):
    path, texts = corpus
    cfg = _cfg(path, packing="concat", shuffle=False, curriculum=((0, 64, 16), (3, 128, 8), (5, 256, 4)))
    batches = _take(cfg, 7, seq_len=256, batch=4)
    assert [b["tokens"].shape for b in batches] == [(16, 64)] * 3 + [(8, 128)] * 2 + [(4, 256)] * 2
    assert all(b["tokens"].size == 1024 for b in batches)  # constant tokens per step
    ref = _reference_stream(texts)
    stage1 = np.concatenate([b["tokens"].reshape(-1) for b in batches[:3]])
    np.testing.assert_array_equal(stage1, ref[:stage1.size])
    # Stage 2 goes on with the next unread document (the rest of the one being cut is dropped).
    offset = stage1.size + np.argmax(ref[stage1.size:] == BOS)
    stage2 = np.concatenate([b["tokens"].reshape(-1) for b in batches[3:5]])
    np.testing.assert_array_equal(stage2, ref[offset:offset + stage2.size])

    stages = curriculum_stages(cfg, seq_len=256, global_batch_size=4)
    assert [(s.start_step, s.seq_len, s.batch_size) for s in stages] == [(0, 64, 16), (3, 128, 8), (5, 256, 4)]
    for bad, match in ((((0, 64, 16), (3, 128, 4)), "tokens per step"), (((1, 256, 4),), "step 0"),
                       (((0, 256, 4), (0, 128, 8)), "increase"), (((0, 256),), "start_step")):
        cfg.curriculum = bad
        with pytest.raises(ValueError, match=match):
            make_train_iterator(cfg, seq_len=256, global_batch_size=4, seed=0, process_index=0, process_count=1)


def test_hosts_read_disjoint_documents_and_seeds_matter(corpus):
    path, _ = corpus
    cfg = _cfg(path)
    seed = int(_rng(5).integers(1 << 30))
    hosts = [_take(cfg, 8, seq_len=256, batch=8, seed=seed, process_index=h, process_count=2) for h in range(2)]
    assert all(b["tokens"].shape == (4, 256) for h in hosts for b in h)  # 8 rows over 2 hosts
    ids = [set(_doc_ids(h)) for h in hosts]
    assert len(ids[0]) > 12 and len(ids[1]) > 12 and not ids[0] & ids[1]  # ~25 each, of 150 per host
    same = _take(cfg, 4, seq_len=256, batch=8, seed=seed, process_index=0, process_count=2)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(hosts[0], same))
    other = _take(cfg, 4, seq_len=256, batch=8, seed=seed + 1, process_index=0, process_count=2)
    assert not np.array_equal(hosts[0][0]["tokens"], other[0]["tokens"])


def test_eval_batches_are_fixed_and_held_out(corpus):
    path, _ = corpus
    cfg = _cfg(path, validation_fraction=0.2, rope_positions="pose", pose_target_length=1024)
    held_out = open_source(cfg.sources[0], split="validation", validation_fraction=0.2).docs
    held_out_ids = {int(held_out[i][1:5]) for i in range(len(held_out))}
    evals = make_eval_batches(cfg, seq_len=256, batch_size=4, num_batches=3)
    again = make_eval_batches(cfg, seq_len=256, batch_size=4, num_batches=3)
    assert len(evals) == 3 and all(b["tokens"].shape == (4, 256) for b in evals)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(evals, again) for k in BATCH_KEYS)
    eval_ids = set(_doc_ids(evals))
    assert eval_ids and eval_ids <= held_out_ids
    for b in evals:  # evaluation uses plain per-document positions even when training uses PoSE
        for tokens, rope in _segments(b):
            assert np.array_equal(rope, np.arange(len(tokens)))
    train_ids = set(_doc_ids(_take(cfg, 8, seq_len=256, batch=4)))
    assert len(train_ids) > 12 and not train_ids & held_out_ids  # ~25 documents start in 8K tokens
    cfg.validation_sources = [dict(kind="jsonl", path=str(path))]  # a separate set, nothing held out
    assert set(_doc_ids(make_eval_batches(cfg, seq_len=256, batch_size=4, num_batches=2))) - held_out_ids


def test_pretokenized_arrayrecord_gives_the_same_batches_as_its_text(corpus, tmp_path):
    path, texts = corpus
    cfg = _cfg(path, shuffle=True)
    tok = make_tokenizer(cfg)
    out = str(tmp_path / "corpus")
    build_corpus(iter(texts), tok, out, shard_mb=0.05, progress=False)
    from_text = _take(cfg, 4, seq_len=256, batch=4, seed=11)
    cfg.sources = [dict(kind="arrayrecord", path=out)]
    from_records = _take(cfg, 4, seq_len=256, batch=4, seed=11)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(from_text, from_records) for k in BATCH_KEYS)


def test_worker_process_gives_the_same_batches():
    cfg = get_config().data
    cfg.prefetch = 0
    seed = int(_rng(6).integers(1 << 30))
    in_process = _take(cfg, 3, seq_len=512, batch=2, seed=seed)
    cfg.worker_count = 1  # one Grain mp_prefetch worker: the same order as in-process
    in_worker = _take(cfg, 3, seq_len=512, batch=2, seed=seed)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(in_process, in_worker) for k in BATCH_KEYS)


def test_configuration_errors(corpus, tmp_path):
    path, _ = corpus
    take = lambda cfg, **kw: _take(cfg, 1, **{"seq_len": 128, "batch": 4, **kw})
    with pytest.raises(ValueError, match="packing"):
        take(_cfg(path, packing="best"))
    with pytest.raises(ValueError, match="pose_target_length"):
        take(_cfg(path, rope_positions="pose"))
    with pytest.raises(ValueError, match="process_count=3"):
        take(_cfg(path), process_count=3)
    with pytest.raises(ValueError, match="unknown keys"):
        take(_cfg(path, sources=[dict(kind="jsonl", path=str(path), field="text")]))
    with pytest.raises(ValueError, match="sources is empty"):
        take(_cfg(path, sources=[]))
    with pytest.raises(KeyError, match="no key 'data.packin'; did you mean 'packing'"):
        cfg = _cfg(path)
        cfg.unlock()
        del cfg["packing"]
        cfg.packin = "concat"
        take(cfg)
    import tokenizers

    no_specials = str(tmp_path / "tokenizer.json")
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(no_specials)
    with pytest.raises(ValueError, match="no BOS token.*data.bos_token"):
        take(_cfg(path, tokenizer=no_specials))
    with pytest.raises(ValueError, match="fingerprint"):  # corpus written with another tokenizer
        out = str(tmp_path / "c")
        build_corpus(iter(["abc"]), make_tokenizer(_cfg(path)), out, progress=False)
        take(_cfg(path, tokenizer=no_specials, add_bos=False, add_eos=False,
                  sources=[dict(kind="arrayrecord", path=out)]))
