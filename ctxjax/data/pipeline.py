"""The Grain pipeline: documents -> tokens -> packed rows -> batches with segments and positions.

    per source:  documents (shuffled every epoch, sharded by host) -> tokens + BOS/EOS
                 [-> Grain mp_prefetch worker processes]
    per stage:   cut long documents -> pack to L (first-fit or concat-then-split)
                 -> mix sources by weight -> batch -> token_index, rope_positions
    then:        [background-thread prefetch of batches]

The document streams live as long as the iterator; the per-stage part is rebuilt on top of them
when a sequence-length curriculum moves to its next stage, so the run keeps its place in the data
(the new stage starts at the next unread document).
The iterator state (JSON, saved by `grain.checkpoint.CheckpointSave`) holds the step, the stage
and the nested Grain states, so a restore resumes exactly, on either side of a stage boundary.
"""
from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from ctxjax.data import sources as sources_lib
from ctxjax.data.corpus import check_corpus_tokenizer
from ctxjax.data.tokenizer import Tokenizer, make_tokenizer

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "segment_ids", "token_index", "rope_positions")


# ----------------------------------------------------------------------------- curriculum

@dataclasses.dataclass(frozen=True)
class Stage:
    start_step: int
    seq_len: int
    batch_size: int  # global, over all hosts


def curriculum_stages(data_cfg, *, seq_len: int, global_batch_size: int) -> list[Stage]:
    """The stages of `data.curriculum`, checked: first at step 0, increasing, and every one with
    seq_len * batch_size == seq_len * global_batch_size (constant tokens per step)."""
    raw = tuple(data_cfg.curriculum or ())
    if not raw:
        return [Stage(0, int(seq_len), int(global_batch_size))]
    stages = []
    for entry in raw:
        if len(entry) != 3:
            raise ValueError(f"data.curriculum entry {entry!r}: expected (start_step, seq_len, global_batch_size).")
        stages.append(Stage(*(int(x) for x in entry)))
    if stages[0].start_step != 0:
        raise ValueError(f"data.curriculum must start at step 0 (got {stages[0].start_step}).")
    for a, b in zip(stages, stages[1:]):
        if b.start_step <= a.start_step:
            raise ValueError(f"data.curriculum start steps must increase ({a.start_step} then {b.start_step}).")
    tokens = int(seq_len) * int(global_batch_size)
    for s in stages:
        if s.seq_len < 1 or s.batch_size < 1 or s.seq_len * s.batch_size != tokens:
            raise ValueError(
                f"data.curriculum stage {tuple(dataclasses.astuple(s))} has {s.seq_len * s.batch_size} tokens "
                f"per step, but seq_len={seq_len} x global_batch_size={global_batch_size} = {tokens}; "
                "every stage must keep seq_len * batch_size equal to that.")
    return stages


# ----------------------------------------------------------------------------- per-document

class _ToTokens:
    """Document (text or token ids) -> {'tokens': int32 [n]} with BOS/EOS; None when empty."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
        self.tokenizer = tokenizer
        self.prefix = [tokenizer.bos_id] if add_bos else []
        self.suffix = [tokenizer.eos_id] if add_eos else []

    def __call__(self, doc):
        if isinstance(doc, np.ndarray):
            ids = doc
        elif not doc:
            return None
        else:
            ids = self.tokenizer.encode_array(doc)
        if ids.size == 0:
            return None
        tokens = np.empty(len(self.prefix) + ids.size + len(self.suffix), np.int32)
        tokens[:len(self.prefix)] = self.prefix
        tokens[len(self.prefix):tokens.size - len(self.suffix)] = ids
        tokens[tokens.size - len(self.suffix):] = self.suffix
        return {"tokens": tokens}


class _SplitLong(grain.experimental.FlatMapTransform):
    """Cuts a document into pieces of at most seq_len tokens (views, no copies)."""

    max_fan_out = 2**31  # unbounded: one document may be longer than the rest together

    def __init__(self, seq_len: int, keep_remainder: bool):
        self.seq_len, self.keep_remainder = seq_len, keep_remainder

    def flat_map(self, element):
        tokens, n = element["tokens"], self.seq_len
        if tokens.size <= n:
            return [element]
        end = tokens.size if self.keep_remainder else tokens.size - tokens.size % n
        return [{"tokens": tokens[i:i + n]} for i in range(0, end, n)]


def _trim_to_multiple(seq_len: int):
    def trim(element):
        tokens = element["tokens"]
        if tokens.size > seq_len:
            return {"tokens": tokens[:tokens.size - tokens.size % seq_len]}
        return element
    return trim


# ----------------------------------------------------------------------------- streams

def _document_stream(source, to_tokens, data_cfg, *, seed, shard_index, shard_count, shuffle,
                     worker_count) -> grain.IterDataset:
    """Endless tokenized documents of one source for one host."""
    if source.docs is not None:
        ds = source.docs
        if shuffle:
            ds = ds.shuffle(seed=seed)  # a new permutation every epoch
        ds = ds.repeat()[shard_index::shard_count]
        ds = ds.map(to_tokens)  # None (empty document) is dropped by to_iter_dataset
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                                                  prefetch_buffer_size=int(data_cfg.read_buffer)))
    else:
        ds = source.stream(shard_index, shard_count, seed, shuffle)
        ds = ds.map(to_tokens).filter(lambda x: x is not None)
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain reads absl flags; outside absl.app nobody parsed them
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=int(data_cfg.worker_buffer_size)))
    return ds


class _Live(grain.IterDataset):
    """An already-running iterator as a dataset, so a new stage can be built on top of it."""

    def __init__(self, iterator: grain.DatasetIterator):
        super().__init__()
        self._iterator = iterator

    def __iter__(self):
        return _Passthrough(self._iterator)


class _Passthrough(grain.DatasetIterator):
    """Forwards to the live iterator without owning it: closing a finished stage (Grain closes
    parents, also on garbage collection) must not close the document streams."""

    def __init__(self, iterator):
        super().__init__()
        self._iterator = iterator

    def __next__(self):
        return next(self._iterator)

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state):
        self._iterator.set_state(state)


def _fix_json_tuples(state):
    """JSON turns tuples into lists; Grain's concat-then-split compares its slices to a tuple."""
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _fix_json_tuples(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [_fix_json_tuples(v) for v in state]
    return state


# ----------------------------------------------------------------------------- positions

def pose_positions(positions: np.ndarray, segment_ids: np.ndarray, rng: np.random.Generator,
                   target_length: int, num_chunks: int) -> np.ndarray:
    """PoSE skip-wise positions (Zhu et al., 2023) for every document of every row.

    A document of n tokens (the paper's L_c) is cut into k = min(num_chunks, n) chunks and chunk
    i is shifted by a skipping bias u_i. Both are drawn in sequence, as in Sec. 3.2 and the
    sampling code of Fig. 6 of the paper: the length of chunk i < k-1 is uniform on {1, ..., what
    is left minus one token for each later chunk} (the last chunk takes the rest), u_0 = 0 and
    u_i ~ U{u_(i-1), ..., target_length - n}. Positions are consecutive within a chunk, increase
    along the document and stay below target_length. The tokens stay those of the document in
    order (the paper's v_i = 0, which its Appendix A finds as good as sampling the content).
    The released train_pose.py differs: two chunks, the first at most half the window.
    """
    out = positions.astype(np.int32, copy=True)
    for row in range(segment_ids.shape[0]):
        seg = segment_ids[row]
        bounds = np.flatnonzero(np.diff(seg)) + 1
        for start, end in zip(np.r_[0, bounds], np.r_[bounds, seg.size]):
            n = int(end - start)
            if seg[start] == 0 or n < 2 or num_chunks < 2:
                continue
            max_skip = target_length - n
            cut, skip = int(start), 0
            for later_chunks in range(min(num_chunks, n) - 1, 0, -1):
                cut += int(rng.integers(1, end - cut - later_chunks + 1))  # this chunk's length
                next_skip = int(rng.integers(skip, max_skip + 1))
                out[row, cut:end] += next_skip - skip
                skip = next_skip
    return out


# ----------------------------------------------------------------------------- batches

@dataclasses.dataclass
class _Plan:
    """Everything a stage needs, fixed when the iterator is made."""
    stages: list[Stage]
    local_batch: list[int]  # per stage, this host's rows
    weights: list[float]
    packing: str
    packing_bins: int
    keep_remainder: bool
    rope_positions: str
    pose_target_length: int
    pose_chunks: int
    pad_id: int
    seed: int


class PackedBatches(grain.IterDataset):
    """Packed, batched rows from several document streams, following a curriculum."""

    def __init__(self, streams: list[grain.IterDataset], plan: _Plan):
        super().__init__(streams)
        self._streams, self._plan = streams, plan

    def __iter__(self):
        return PackedBatchIterator([s.__iter__() for s in self._streams], self._plan)


class PackedBatchIterator(grain.DatasetIterator):
    """Yields dicts of int32 [local_batch, L]: tokens, segment_ids, token_index, rope_positions.

    step = batches yielded so far; the stage is the last whose start_step <= step.
    """

    def __init__(self, doc_iters: list[grain.DatasetIterator], plan: _Plan):
        super().__init__(doc_iters)
        self._docs, self._plan = doc_iters, plan
        self._step, self._stage = 0, 0
        self._rows = self._build(0)

    def _build(self, stage_index: int) -> grain.DatasetIterator:
        p, stage = self._plan, self._plan.stages[stage_index]
        per_source = []
        for i, it in enumerate(self._docs):
            ds = _Live(it)
            if p.packing == "first_fit":
                ds = grain.experimental.FlatMapIterDataset(ds, _SplitLong(stage.seq_len, p.keep_remainder))
                ds = grain.experimental.FirstFitPackIterDataset(
                    ds, length_struct={"tokens": stage.seq_len}, num_packing_bins=p.packing_bins,
                    seed=p.seed + 7919 * i + stage_index, shuffle_bins=True)
            else:
                if not p.keep_remainder:
                    ds = ds.map(_trim_to_multiple(stage.seq_len))
                ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": stage.seq_len})
            per_source.append(ds)
        ds = per_source[0] if len(per_source) == 1 else grain.IterDataset.mix(per_source, p.weights)
        return ds.batch(p.local_batch[stage_index], drop_remainder=True).__iter__()

    def _next_stage_if_due(self):
        stages = self._plan.stages
        while self._stage + 1 < len(stages) and self._step >= stages[self._stage + 1].start_step:
            # Built at once on the live document streams, so the saved state of the new stage points
            # at the next unread document. What the old packers held back (at most one packing
            # group) is dropped; nothing is read twice.
            self._stage += 1
            self._rows = self._build(self._stage)
            log.info("data: step %d, curriculum stage %s", self._step, stages[self._stage])

    def __next__(self):
        batch = next(self._rows)
        p = self._plan
        segment_ids = batch["tokens_segment_ids"].astype(np.int32)
        tokens = np.where(segment_ids > 0, batch["tokens"], p.pad_id).astype(np.int32)
        rows, length = tokens.shape
        token_index = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
        if p.rope_positions == "continuous":
            rope = token_index.copy()
        elif p.rope_positions == "pose":
            rng = np.random.default_rng([p.seed, self._step])
            rope = pose_positions(batch["tokens_positions"], segment_ids, rng, p.pose_target_length, p.pose_chunks)
        else:
            rope = batch["tokens_positions"].astype(np.int32)
        self._step += 1
        self._next_stage_if_due()
        return {"tokens": tokens, "segment_ids": segment_ids, "token_index": token_index, "rope_positions": rope}

    def get_state(self):
        stage = self._plan.stages[self._stage]
        return {"step": self._step, "stage": self._stage, "seq_len": stage.seq_len,
                "batch_size": self._plan.local_batch[self._stage], "rows": self._rows.get_state()}

    def set_state(self, state):
        stage_index = int(state["stage"])
        stages = self._plan.stages
        if not (stage_index < len(stages) and stages[stage_index].seq_len == state["seq_len"]
                and self._plan.local_batch[stage_index] == state["batch_size"]):
            raise ValueError(
                f"The data iterator state was saved in curriculum stage {stage_index} with rows "
                f"[{state['batch_size']}, {state['seq_len']}] per host, which this run's data config does not "
                f"have (stages {[dataclasses.astuple(s) for s in stages]}). Resume with the run's own config.")
        self._step, self._stage = int(state["step"]), stage_index
        self._rows = self._build(self._stage)
        self._rows.set_state(_fix_json_tuples(state["rows"]))

    def __str__(self):
        return f"PackedBatchIterator(stages={self._plan.stages})"


# ----------------------------------------------------------------------------- public API

def _process_shard(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    return int(process_index), int(process_count)


def _open_sources(data_cfg, tokenizer, *, split, entries):
    fraction = float(data_cfg.validation_fraction) if split != "all" else 0.0
    opened = []
    for i, spec in enumerate(entries):
        src = sources_lib.open_source(spec, split=split, validation_fraction=fraction, index=i,
                                      parquet_cycle_length=int(data_cfg.parquet_cycle_length),
                                      shuffle_window=int(data_cfg.shuffle_window))
        if src.corpus_meta is not None:
            check_corpus_tokenizer(src.corpus_meta, tokenizer, src.name)
        opened.append(src)
    return opened


def _check_specials(data_cfg, tokenizer):
    for flag, token_id, knob in (("add_bos", tokenizer.bos_id, "bos_token"),
                                 ("add_eos", tokenizer.eos_id, "eos_token")):
        if data_cfg[flag] and token_id is None:
            raise ValueError(f"data.{flag} is set but {tokenizer.name!r} has no {knob[:3].upper()} token: "
                             f"set data.{knob} to one of its tokens or data.{flag}=False.")


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


def _make_batches(data_cfg, *, stages, shard, seed, split, entries, shuffle, worker_count,
                  rope_positions) -> PackedBatches:
    from ctxjax.config import validate_data
    validate_data(data_cfg)
    tokenizer = make_tokenizer(data_cfg)
    _check_specials(data_cfg, tokenizer)
    if rope_positions == "pose":
        target = int(data_cfg.pose_target_length)
        if target <= max(s.seq_len for s in stages):
            raise ValueError(f"data.rope_positions='pose' needs data.pose_target_length (now {target}) "
                             f"> seq_len ({max(s.seq_len for s in stages)}): the length PoSE simulates.")
    shard_index, shard_count = shard
    for s in stages:
        if s.batch_size % shard_count:
            raise ValueError(f"global batch size {s.batch_size} is not divisible by process_count={shard_count}; "
                             "use a multiple of the number of hosts.")
    srcs = _open_sources(data_cfg, tokenizer, split=split, entries=entries)
    to_tokens = _ToTokens(tokenizer, bool(data_cfg.add_bos), bool(data_cfg.add_eos))
    streams = [_document_stream(src, to_tokens, data_cfg, seed=_seed(seed, i), shard_index=shard_index,
                                shard_count=shard_count, shuffle=shuffle, worker_count=worker_count)
               for i, src in enumerate(srcs)]
    plan = _Plan(stages=stages, local_batch=[s.batch_size // shard_count for s in stages],
                 weights=[s.weight for s in srcs], packing=data_cfg.packing, packing_bins=int(data_cfg.packing_bins),
                 keep_remainder=data_cfg.long_documents == "split_keep", rope_positions=rope_positions,
                 pose_target_length=int(data_cfg.pose_target_length), pose_chunks=int(data_cfg.pose_chunks),
                 pad_id=tokenizer.pad_id, seed=_seed(seed, shard_index, 1))
    return PackedBatches(streams, plan)


def make_train_iterator(data_cfg, *, seq_len: int, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None):
    """This host's endless training batches: a Grain DatasetIterator of dicts of int32
    [global_batch_size // process_count, L] (tokens, segment_ids, token_index, rope_positions).

    With `data.curriculum`, L and the batch size follow the stage of the current step (batches
    yielded so far). Save and restore it with grain.checkpoint.CheckpointSave / CheckpointRestore.
    process_index / process_count default to JAX's.
    """
    stages = curriculum_stages(data_cfg, seq_len=seq_len, global_batch_size=global_batch_size)
    ds = _make_batches(data_cfg, stages=stages, shard=_process_shard(process_index, process_count),
                       seed=_seed(seed, data_cfg.seed), split="train", entries=list(data_cfg.sources),
                       shuffle=bool(data_cfg.shuffle), worker_count=int(data_cfg.worker_count),
                       rope_positions=data_cfg.rope_positions)
    if int(data_cfg.prefetch) > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(data_cfg.prefetch))
    return ds.__iter__()


def make_eval_batches(data_cfg, *, seq_len: int, batch_size: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    """`num_batches` batches [batch_size, seq_len] of held-out documents, the same on every host
    and every call: no shuffle, no seed. Reads `data.validation_sources` when given, else the
    held-out part of `data.sources` (cycled if it is smaller than asked for). PoSE is for
    training only: with rope_positions='pose', evaluation uses 'reset'."""
    entries = list(data_cfg.validation_sources)
    split = "all" if entries else "validation"
    rope = "reset" if data_cfg.rope_positions == "pose" else data_cfg.rope_positions
    ds = _make_batches(data_cfg, stages=[Stage(0, int(seq_len), int(batch_size))], shard=(0, 1), seed=0,
                       split=split, entries=entries or list(data_cfg.sources), shuffle=False, worker_count=0,
                       rope_positions=rope)
    it = ds.__iter__()
    try:
        return [next(it) for _ in range(int(num_batches))]
    finally:
        it.close()
