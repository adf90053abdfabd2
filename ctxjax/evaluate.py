"""Long-context evaluation of a trained run:

    python -m ctxjax.evaluate --workdir=runs/tiny [--step=N] [--tasks=ppl,passkey,niah] [--lengths=256,512]

- ppl:     loss and perplexity of held-out documents by position bucket (does the model use
           distant context? the loss should keep falling with position);
- passkey: a 5-digit key hidden in repeated filler text, retrieved by greedy decoding;
- niah:    needle-in-a-haystack: a key/value sentence inserted at several depths of real
           held-out text, retrieved by greedy decoding.

Results go to WORKDIR/eval_results.json (written atomically) and a table on stdout.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def perplexity_by_position(logits_fn, batches, bucket: int) -> list[dict]:
    """Mean next-token loss of real targets grouped by within-document position (rope_positions
    reset per document) in buckets of `bucket` tokens."""
    from ctxjax.model import next_token_targets
    sums, counts = {}, {}
    for batch in batches:
        logits = logits_fn(batch)
        targets, weights = next_token_targets(jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]))
        lse = jax.nn.logsumexp(logits, axis=-1)
        loss = np.asarray(lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])
        weights, position = np.asarray(weights), np.asarray(batch["rope_positions"])
        for b in np.unique(position[weights > 0] // bucket):
            sel = (weights > 0) & (position // bucket == b)
            sums[int(b)] = sums.get(int(b), 0.0) + float(loss[sel].sum())
            counts[int(b)] = counts.get(int(b), 0) + int(sel.sum())
    return [{"positions": f"{b * bucket}-{(b + 1) * bucket - 1}", "loss": sums[b] / counts[b],
             "ppl": float(np.exp(sums[b] / counts[b])), "tokens": counts[b]} for b in sorted(sums)]


def greedy_continue(logits_fn, tokens: list[int], n: int) -> list[int]:
    """n greedy tokens after `tokens` (full recompute per token: fine for short answers)."""
    out = list(tokens)
    for _ in range(n):
        arr = np.asarray(out, np.int32)[None]
        batch = {"tokens": arr, "segment_ids": np.ones_like(arr), "token_index": np.arange(len(out))[None],
                 "rope_positions": np.arange(len(out))[None]}
        out.append(int(jnp.argmax(logits_fn(batch)[0, -1])))
    return out[len(tokens):]


def insert_at_depth(tokenizer, haystack: str, needle: str, question: str, length: int, depth: float) -> list[int]:
    """Token ids of BOS + haystack (cut to fit `length`) with `needle` at `depth` (0..1) + question."""
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    needle_ids, question_ids = tokenizer.encode(needle), tokenizer.encode(question)
    room = length - len(prefix) - len(needle_ids) - len(question_ids)
    if room <= 0:
        raise ValueError(f"length {length} is too short for the needle and question; use a longer length.")
    hay = tokenizer.encode(haystack)
    while len(hay) < room:
        hay = hay + hay
    hay = hay[:room]
    cut = int(round(depth * room))
    return prefix + hay[:cut] + needle_ids + hay[cut:] + question_ids


def retrieval_accuracy(logits_fn, tokenizer, haystack: str, lengths, depths, trials: int, seed: int,
                       kind: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = f"{rng.integers(10000, 100000)}"
                if kind == "passkey":
                    needle, question = f" The pass key is {key}. Remember it. {key} is the pass key. ", \
                        " What is the pass key? The pass key is "
                else:
                    city = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tromso"][rng.integers(5)]
                    needle, question = f"\n# The magic number of {city} is {key}.\n", \
                        f"\n# The magic number of {city} is "
                ids = insert_at_depth(tokenizer, haystack, needle, question, length, depth)
                answer = tokenizer.decode(greedy_continue(logits_fn, ids, len(tokenizer.encode(key))))
                hits += answer.strip().startswith(key)
            rows.append({"task": kind, "length": length, "depth": depth, "accuracy": hits / trials})
    return rows


def evaluate_run(workdir: str, *, step=None, tasks=("ppl", "passkey", "niah"), lengths=(256, 512),
                 depths=(0.1, 0.5, 0.9), trials: int = 4, ppl_batches: int = 4, bucket: int = 0, seed: int = 0):
    from ctxjax.checkpoint import latest_step, load_model
    from ctxjax.data import make_eval_batches, make_tokenizer

    step = latest_step(workdir) if step is None or step < 0 else step
    model, config = load_model(workdir, step)
    tokenizer = make_tokenizer(config.data)

    @jax.jit
    def logits(tokens, segment_ids, token_index, rope_positions):
        return model(tokens, segment_ids, token_index, rope_positions)

    logits_fn = lambda b: logits(*(jnp.asarray(b[k], jnp.int32) for k in
                                   ("tokens", "segment_ids", "token_index", "rope_positions")))
    results = {"workdir": workdir, "step": step}
    if "ppl" in tasks:
        seq_len = max(lengths)
        batches = make_eval_batches(config.data, seq_len=seq_len, batch_size=config.eval.batch_size,
                                    num_batches=ppl_batches)
        results["ppl"] = perplexity_by_position(logits_fn, batches, bucket or max(seq_len // 8, 1))
    haystack = None
    for kind in ("passkey", "niah"):
        if kind not in tasks:
            continue
        if kind == "passkey":
            haystack = FILLER
        else:
            batch = make_eval_batches(config.data, seq_len=max(lengths), batch_size=1, num_batches=1)[0]
            haystack = tokenizer.decode([int(t) for t in batch["tokens"][0] if t not in
                                         (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)])
        results[kind] = retrieval_accuracy(logits_fn, tokenizer, haystack, lengths, depths, trials, seed, kind)
    return results


def write_results(workdir: str, results: dict) -> str:
    from ctxjax.metrics import write_json
    path = os.path.join(workdir, "eval_results.json")
    write_json(path, results)
    return path


def main(argv):
    del argv
    from absl import logging
    if not flags.FLAGS["verbosity"].present:  # keep Orbax/JAX info chatter off the results
        logging.set_verbosity(logging.WARNING)
    FLAGS = flags.FLAGS
    if not FLAGS.workdir:
        raise app.UsageError("--workdir=DIR is required (a directory written by python -m ctxjax.train).")
    unknown = set(FLAGS.tasks) - {"ppl", "passkey", "niah"}
    if unknown:
        raise app.UsageError(f"unknown tasks {sorted(unknown)}; choose from ppl, passkey, niah.")
    results = evaluate_run(FLAGS.workdir, step=FLAGS.step, tasks=tuple(FLAGS.tasks),
                           lengths=tuple(int(x) for x in FLAGS.lengths), trials=FLAGS.trials)
    for row in results.get("ppl", []):
        print(f"ppl   positions {row['positions']:>12}  loss {row['loss']:.3f}  ppl {row['ppl']:.2f}")
    for kind in ("passkey", "niah"):
        for row in results.get(kind, []):
            print(f"{kind:7} length {row['length']:>7}  depth {row['depth']:.1f}  accuracy {row['accuracy']:.2f}")
    print(f"wrote {write_results(FLAGS.workdir, results)}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A ctxjax training workdir.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_list("tasks", ["ppl", "passkey", "niah"], "ppl, passkey, niah.")
    flags.DEFINE_list("lengths", ["256", "512"], "Context lengths (tokens).")
    flags.DEFINE_integer("trials", 4, "Retrieval trials per (length, depth).")
    app.run(main)
