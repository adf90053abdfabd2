"""Does SkyLadder pay? The same model on the same tokens twice, baseline then SkyLadder, timed.

    python3 tools/experiment_skyladder.py --out OUT        # one H200: about 9 minutes in all
    python3 tools/experiment_skyladder.py --smoke --out /tmp/sky_smoke      # CPU, < 2 minutes
    python3 tools/experiment_skyladder.py --report_from OUT --report_to docs/experiments/

The arms are configs/skyladder_8k_baseline.py and configs/skyladder_8k_ladder.py (identical but
for the `skyladder` section), trained one after the other in this process with the same seed,
data and number of steps, so they see the same batches. Budget: a probe trains the baseline for
a few steps and times them (train loop seconds, compiling and evaluating left out); train.steps
of both arms is then what the baseline trains in --train_seconds_per_arm, lowered so that both
arms, their compiles and every evaluation end within --deadline_seconds of this script's start
(one 10-minute GPU command). The baseline is the slower arm per step, so SkyLadder's arm ends
sooner. --steps or --tokens fix the budget instead (no probe).

Measured and written to --out (small files only):
  results.json           everything to rerun and check: both configs, seed, data fingerprint
                         (ctxjax.data.source_fingerprint), versions, device, budget, token
                         counts, per-point curves, final metrics with standard errors
  skyladder_8k.png       validation loss against tokens and against training seconds
  skyladder_8k.md        the table: final loss +- SE, tokens, seconds, tokens/s, when SkyLadder
                         reaches the baseline's final loss, loss by position, retrieval vs chance
  {baseline,skyladder}_metrics.jsonl   each arm's metrics.jsonl as the trainer wrote it
Curves: validation loss on a fixed 256K-token held-out subset at ~15 points per arm (the
trainer's eval.every), against tokens and against the trainer's `elapsed_s`. Final evaluation
of each arm at the full 8K: >= 1.2M held-out target tokens (loss mean and standard error with
rows as clusters, and the SkyLadder - baseline difference paired by row), loss by position
within documents (ctxjax.evaluate.perplexity_by_position, 1K buckets), and a copy task: a
random 16-character key [a-z0-9] in `SECRET_KEY = "<key>"` is placed at a depth of 8K of
held-out code, and the row ends with `SECRET_KEY = "` again; scored by teacher forcing: exact
match (every byte the argmax, i.e. what greedy decoding would write; chance 36^-16) and per-byte
accuracy (chance 1/36, since the key is uniform and independent of everything else).
The arms' workdirs (checkpoints) are deleted at the end unless --keep.
"""
from __future__ import annotations

import time

START = time.time()  # the deadline counts from here

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

import numpy as np  # noqa: E402

BASELINE_CONFIG = "configs/skyladder_8k_baseline.py"
LADDER_CONFIG = "configs/skyladder_8k_ladder.py"
ARMS = ("baseline", "skyladder")
KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
KEY_LENGTH = 16
CUE = '\nSECRET_KEY = "'  # before the key in the needle, and again at the end of the row
DEPTHS = (0.02, 0.25, 0.5, 0.75, 0.98)  # where the needle sits in the hay (0: right after BOS)
# Smoke: a few standard-library packages (on every Python) keep opening the source fast.
SMOKE_PACKAGES = ["email", "json", "http", "logging", "asyncio", "unittest", "xml", "importlib"]
REPORT_SECTION = "## Results"


def log(message: str) -> None:
    print(f"[{time.time() - START:6.1f} s] {message}", flush=True)


# ----------------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output directory (created)")
    p.add_argument("--smoke", action="store_true", help="CPU check of every code path: tiny model, tiny budget")
    p.add_argument("--train_seconds_per_arm", type=float, default=None,
                   help="training seconds the baseline arm should take (default 240; smoke 6)")
    p.add_argument("--deadline_seconds", type=float, default=None,
                   help="everything ends within this many seconds of the start (default 540; smoke 110)")
    p.add_argument("--steps", type=int, default=0, help="fix train.steps of both arms (no probe)")
    p.add_argument("--tokens", type=float, default=0, help="fix the tokens per arm (no probe)")
    p.add_argument("--min_steps", type=int, default=None, help="never fewer steps (default 60; smoke 12)")
    p.add_argument("--probe_steps", type=int, default=12, help="baseline steps timed (default 12)")
    p.add_argument("--eval_points", type=int, default=None, help="validation points per arm (default 15; smoke 4)")
    p.add_argument("--final_eval_tokens", type=float, default=None,
                   help="held-out target tokens of the final evaluation (default 1.2M; smoke 4K)")
    p.add_argument("--ppl_bucket", type=int, default=None, help="position bucket (default 1024; smoke 64)")
    p.add_argument("--retrieval_trials", type=int, default=None, help="copy-task rows per depth (default 32; smoke 2)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of both arms")
    p.add_argument("--workdir", default="", help="where the arms train (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the arms' workdirs (checkpoints)")
    p.add_argument("--no_compile_cache", action="store_true",
                   help="no persistent compilation cache (by default the arms share one, so the steps and "
                        "evaluations they have in common compile once)")
    p.add_argument("--report_to", default="", help="also copy the .md and .png here and add a section to its README.md")
    p.add_argument("--report_from", default="", help="with --report_to: report an earlier run's --out directory and exit")
    args = p.parse_args(argv)
    defaults = dict(train_seconds_per_arm=(6, 240), deadline_seconds=(110, 540), min_steps=(12, 60),
                    eval_points=(4, 15), final_eval_tokens=(4096, 1.2e6),
                    ppl_bucket=(64, 1024), retrieval_trials=(2, 32))
    for key, (smoke, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    if args.report_from:
        if not args.report_to:
            p.error("--report_from needs --report_to")
    elif not args.out:
        p.error("--out is required")
    return args


# ------------------------------------------------------------------------------------- configs

def smoke_config(config):
    """A CPU-sized version of an arm: same structure, tiny model and rows."""
    m = config.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim = 64, 2, 4, 2, 128
    m.max_position_embeddings = 256
    m.dtype = "float32"  # CPUs have no fast bfloat16 matmuls
    config.data.sources = (dict(kind="python_packages", path=list(SMOKE_PACKAGES), text_field="text", weight=1.0),)
    config.train.seq_len = 256
    config.train.global_batch_size = 8
    config.train.log_every = 2
    config.optim.lr = 3e-3
    config.eval.batch_size = 8
    config.eval.batches = 1
    return config


def load_arms(args):
    from ctxjax.config import as_plain, load_config, validate_config
    arms = {}
    for name, path in zip(ARMS, (BASELINE_CONFIG, LADDER_CONFIG)):
        config = load_config(os.path.join(REPO, path))
        if args.smoke:
            config = smoke_config(config)
        config.train.seed = args.seed
        arms[name] = validate_config(config)
    flat = lambda c, prefix="": {k2: v2 for k, v in c.items() for k2, v2 in
                                 (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}
    a, b = flat(as_plain(arms["baseline"])), flat(as_plain(arms["skyladder"]))
    difference = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    outside = [k for k in difference if not k.startswith("skyladder.")]
    if outside or not arms["skyladder"].skyladder.enabled:
        raise SystemExit(f"the arms must differ in the skyladder section alone; they also differ in {outside}")
    return arms, difference


def with_budget(config, steps: int, eval_points: int):
    """The arm's config for `steps`: warmup keeps its share of the steps, ~eval_points
    validation points, logged at every evaluation step (so elapsed_s is known there)."""
    config = copy.deepcopy(config)
    share = config.optim.warmup_steps / config.train.steps
    config.optim.warmup_steps = min(steps - 1, max(1, round(share * steps)))
    log_every = max(1, min(config.train.log_every, steps // (2 * eval_points)))
    every = max(log_every, round(steps / eval_points / log_every) * log_every)
    config.train.steps, config.train.log_every, config.eval.every = steps, log_every, every
    return config


# ------------------------------------------------------------------------------------- helpers

def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tokens_per_step(config) -> int:
    return config.train.global_batch_size * config.train.seq_len


def ratio_and_se(sums, counts):
    """Mean sum/count over clusters (rows) and its standard error (ratio estimator, clusters
    independent)."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    mean = sums.sum() / counts.sum()
    n = len(sums)
    se = math.sqrt(n / max(n - 1, 1) * float(np.sum((sums - mean * counts) ** 2))) / counts.sum()
    return float(mean), float(se)


def environment():
    import grain
    import jax
    import jaxlib
    device = jax.devices()[0]
    commit = None
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "grain": getattr(grain, "__version__", None),
            "python": platform.python_version(), "platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(), "git_commit": commit}


def heldout_text(spec, fraction, max_bytes: int):
    """(held-out documents, their bytes, up to max_bytes of their text from the last document
    backwards) of a source."""
    from ctxjax.data.sources import open_source
    docs = open_source(spec, split="validation", validation_fraction=fraction).docs
    texts = [docs[i] for i in range(len(docs))]
    sizes = [len(t.encode("utf-8")) for t in texts]
    pool, total = [], 0
    for text in reversed(texts):  # the end of the split: the final evaluation reads its start
        if total >= max_bytes:
            break
        pool.append(text)
        total += len(text.encode("utf-8"))
    return len(texts), int(sum(sizes)), "\n".join(pool)


# ------------------------------------------------------------------------------------ training

def train_run(config, workdir):
    """train_and_evaluate, timed; the metrics rows and the wall seconds."""
    from ctxjax import train
    start = time.time()
    train.train_and_evaluate(config, workdir)
    return read_metrics(workdir), time.time() - start


def probe(config, workdir, steps: int):
    """Trains the baseline for `steps` steps: its steady rate (tokens per training second, the
    first logging interval left out) and the seconds outside the loop (start-up, compile, save,
    evaluation)."""
    config = copy.deepcopy(config)
    log_every = max(1, steps // 4)
    config.train.steps, config.train.log_every, config.optim.warmup_steps = steps, log_every, 1
    config.eval.every = 0
    rows, wall = train_run(config, workdir)
    train_rows = [r for r in rows if "loss" in r]
    first, last = train_rows[0], train_rows[-1]
    rate = (last["step"] - first["step"]) * tokens_per_step(config) / (last["elapsed_s"] - first["elapsed_s"])
    return {"steps": steps, "wall_seconds": wall, "train_seconds": last["elapsed_s"],
            "tokens_per_s": rate, "overhead_seconds": wall - last["elapsed_s"],
            "step_seconds": tokens_per_step(config) / rate}


def plan_steps(args, config, probed):
    """train.steps of both arms, and how it was chosen."""
    per_step = tokens_per_step(config)
    if args.steps:
        return args.steps, {"rule": "--steps"}
    if args.tokens:
        return max(1, math.ceil(args.tokens / per_step)), {"rule": "--tokens"}
    rate = probed["tokens_per_s"]
    forward_rate = 2 * rate  # a forward pass costs about a third of a train step: 2x is conservative
    eval_tokens = config.eval.batches * config.eval.batch_size * (config.eval.seq_len or config.train.seq_len)
    final_tokens = (args.final_eval_tokens / 0.9 + len(DEPTHS) * args.retrieval_trials * config.train.seq_len)
    final_fixed = 10.0 if args.smoke else 20.0  # loading params, compiling the evaluation functions
    # Each arm starts, compiles its step and saves as the probe did (its evaluation step comes from the
    # compilation cache), then evaluates; SkyLadder's step compiles twice, with a window and without
    # (the second from the cache: the baseline's), counted as most of another probe's overhead.
    per_arm = (1.1 * probed["overhead_seconds"] + (args.eval_points + 1) * eval_tokens / forward_rate
               + final_tokens / forward_rate + final_fixed)
    extra_compile = 0.6 * probed["overhead_seconds"]
    left = args.deadline_seconds - (time.time() - START) - 10.0  # 10 s: figure, tables, clean-up
    seconds = min(args.train_seconds_per_arm, (left - 2 * per_arm - extra_compile) / 2)
    steps = max(args.min_steps, int(seconds * rate / per_step))
    return steps, {"rule": "probe", "seconds_left_after_probe": left, "estimated_seconds_per_arm_outside_training":
                   per_arm, "planned_train_seconds_per_arm": steps * per_step / rate,
                   "requested_train_seconds_per_arm": args.train_seconds_per_arm,
                   "limited_by_deadline": seconds < args.train_seconds_per_arm}


def curves(rows, config):
    per_step = tokens_per_step(config)
    train_rows = [r for r in rows if "loss" in r]
    elapsed = {r["step"]: r["elapsed_s"] for r in train_rows}
    evals = [{"step": r["step"], "tokens": r["step"] * per_step, "seconds": elapsed[r["step"]],
              "eval_loss": r["eval_loss"]} for r in rows if "eval_loss" in r]
    train = [{"step": r["step"], "tokens": r["step"] * per_step, "seconds": r["elapsed_s"], "loss": r["loss"],
              "window": r["window"], "tokens_per_s": r["tokens_per_s"]} for r in train_rows]
    return evals, train


# ------------------------------------------------------------------------------ final evaluation

def copy_task_rows(tokenizer, hay_text: str, length: int, trials: int, seed: int):
    """Rows of exactly `length` tokens: BOS, hay with `CUE key"` at a depth, hay, CUE, key.
    Returns tokens [n, length], the first key position of the answer, depths, distances, keys."""
    rng = np.random.default_rng(seed)
    hay_all = np.asarray(tokenizer.encode(hay_text), np.int32)
    while hay_all.size < 2 * length:  # a small held-out split (smoke runs) is reused
        hay_all = np.concatenate([hay_all, hay_all])
    cue = tokenizer.encode(CUE)
    newline = tokenizer.encode("\n")[0]
    rows, starts, depths, distances, keys = [], [], [], [], []
    offset = 0
    for depth in DEPTHS:
        for _ in range(trials):
            key = "".join(rng.choice(list(KEY_ALPHABET), KEY_LENGTH))
            needle = cue + tokenizer.encode(key + '"\n')
            answer = tokenizer.encode(key)
            room = length - 1 - len(needle) - len(cue) - len(answer)
            if room < 16:
                raise ValueError(f"length {length} is too short for the copy task")
            for _ in range(100):  # a slice of hay without the cue in it
                if offset + room > hay_all.size:
                    offset = 0
                hay = hay_all[offset:offset + room]
                offset += room
                if tokenizer.decode(hay).find("SECRET_KEY") < 0:
                    break
            cut = int(round(depth * room))
            lines = np.flatnonzero(hay[max(0, cut - 256):cut] == newline)
            if lines.size:  # put the needle on a line of its own
                cut = max(0, cut - 256) + int(lines[-1]) + 1
            row = [tokenizer.bos_id] + hay[:cut].tolist() + needle + hay[cut:].tolist() + cue + answer
            assert len(row) == length, (len(row), length)
            rows.append(row)
            starts.append(length - len(answer))
            depths.append(depth)
            distances.append(length - len(answer) - (1 + cut + len(cue)))
            keys.append(key)
    return np.asarray(rows, np.int32), np.asarray(starts), np.asarray(depths), np.asarray(distances), keys


def final_evaluation(workdir, eval_batches, copy_rows, bucket: int, batch_size: int):
    """Per-row losses, loss by position and the copy task for the run in `workdir`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ctxjax.checkpoint import load_model
    from ctxjax.evaluate import perplexity_by_position
    from ctxjax.model import next_token_targets

    model, _ = load_model(workdir)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, segment_ids, token_index, rope_positions):
        return nnx.merge(graphdef, state)(tokens, segment_ids, token_index, rope_positions)

    @jax.jit
    def token_stats(logits, targets):
        lse = jax.nn.logsumexp(logits, axis=-1)
        loss = lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return loss, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    keys = ("tokens", "segment_ids", "token_index", "rope_positions")
    row_sums, row_counts = [], []

    def logits_fn(batch):
        logits = forward(state, *(jnp.asarray(batch[k], jnp.int32) for k in keys))
        targets, weights = next_token_targets(np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"]))
        loss = np.asarray(token_stats(logits, jnp.asarray(targets, jnp.int32))[0], np.float64)
        row_sums.extend((loss * weights).sum(1).tolist())
        row_counts.extend(weights.sum(1).tolist())
        return logits

    start = time.time()
    by_position = perplexity_by_position(logits_fn, eval_batches, bucket)
    loss, se = ratio_and_se(row_sums, row_counts)
    result = {"loss": loss, "se": se, "rows": len(row_sums), "target_tokens": int(sum(row_counts)),
              "row_sums": row_sums, "row_counts": row_counts, "by_position": by_position}

    tokens, answer_starts, depths, distances, _ = copy_rows
    n = tokens.shape[0]
    padded = -(-n // batch_size) * batch_size
    tokens_padded = np.concatenate([tokens, np.repeat(tokens[:1], padded - n, 0)])
    correct, logprob = [], []
    for i in range(0, padded, batch_size):
        chunk = tokens_padded[i:i + batch_size]
        positions = np.broadcast_to(np.arange(chunk.shape[1], dtype=np.int32), chunk.shape)
        logits = forward(state, jnp.asarray(chunk), jnp.ones(chunk.shape, jnp.int32), jnp.asarray(positions),
                         jnp.asarray(positions))
        targets = np.concatenate([chunk[:, 1:], np.zeros_like(chunk[:, :1])], axis=1)
        loss_tok, predicted = (np.asarray(x) for x in token_stats(logits, jnp.asarray(targets)))
        for row in range(chunk.shape[0]):
            if i + row >= n:
                break
            span = np.arange(answer_starts[i + row] - 1, chunk.shape[1] - 1)  # positions predicting the key
            correct.append(predicted[row, span] == targets[row, span])
            logprob.append(-loss_tok[row, span])
    correct, logprob = np.asarray(correct), np.asarray(logprob)
    copy_results = []
    for depth in DEPTHS:
        sel = depths == depth
        exact = correct[sel].all(1).astype(np.float64)
        per_byte = correct[sel].mean(1)
        copy_results.append({
            "depth": depth, "trials": int(sel.sum()), "mean_distance": float(distances[sel].mean()),
            "exact_match": float(exact.mean()), "exact_match_se": float(exact.std(ddof=1) / math.sqrt(sel.sum()))
            if sel.sum() > 1 else 0.0,
            "byte_accuracy": float(per_byte.mean()),
            "byte_accuracy_se": float(per_byte.std(ddof=1) / math.sqrt(sel.sum())) if sel.sum() > 1 else 0.0,
            "first_byte_accuracy": float(correct[sel][:, 0].mean()),
            "mean_logprob": float(logprob[sel].mean())})
    result["copy_task"] = copy_results
    result["seconds"] = time.time() - start
    del model, state
    return result


# ---------------------------------------------------------------------------------- comparison

def reach_time(curve, target):
    """(seconds, tokens) at which a validation curve first reaches `target`, linearly
    interpolated between points; None when it never does."""
    prev = None
    for point in curve:
        if point["eval_loss"] <= target:
            if prev is None:
                return point["seconds"], point["tokens"]
            f = (prev["eval_loss"] - target) / (prev["eval_loss"] - point["eval_loss"])
            return (prev["seconds"] + f * (point["seconds"] - prev["seconds"]),
                    prev["tokens"] + f * (point["tokens"] - prev["tokens"]))
        prev = point
    return None


def value_at(curve, key, x):
    """The validation loss of a curve at `x` (tokens or seconds), linearly interpolated; None
    outside the curve."""
    for a, b in zip(curve, curve[1:]):
        if a[key] <= x <= b[key]:
            f = (x - a[key]) / (b[key] - a[key]) if b[key] > a[key] else 0.0
            return a["eval_loss"] + f * (b["eval_loss"] - a["eval_loss"])
    return None


def compare(results):
    base, sky = results["arms"]["baseline"], results["arms"]["skyladder"]
    target = base["curve"][-1]["eval_loss"]
    out = {"baseline_final_curve_loss": target, "skyladder_final_curve_loss": sky["curve"][-1]["eval_loss"],
           "baseline_train_seconds": base["train_seconds"], "skyladder_train_seconds": sky["train_seconds"],
           "same_tokens_time_saving_percent": 100 * (1 - sky["train_seconds"] / base["train_seconds"])}
    out["baseline_loss_at_skyladder_final_seconds"] = value_at(base["curve"], "seconds", sky["train_seconds"])
    reached = reach_time(sky["curve"], target)
    out["skyladder_reaches_baseline_final_loss"] = None if reached is None else {
        "seconds": reached[0], "tokens": reached[1],
        "time_saving_percent": 100 * (1 - reached[0] / base["train_seconds"]),
        "token_saving_percent": 100 * (1 - reached[1] / base["tokens"])}
    if "final" in base and "final" in sky:
        a, b = base["final"], sky["final"]
        if a["row_counts"] == b["row_counts"]:
            diff = np.asarray(b["row_sums"]) - np.asarray(a["row_sums"])
            mean, se = ratio_and_se(diff, a["row_counts"])
            out["final_loss_difference"] = {"skyladder_minus_baseline": mean, "se_paired_by_row": se}
    return out


# ------------------------------------------------------------------------------------ outputs

def write_json(path, value):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def write_figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    colors = {"baseline": "tab:blue", "skyladder": "tab:orange"}
    sky = results["configs"]["skyladder"]["skyladder"]
    labels = {"baseline": "baseline (full causal within documents)",
              "skyladder": f"SkyLadder ({sky['mask']} window {sky['start']} -> {results['seq_len']})"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    late = [p["eval_loss"] for a in arms.values() for p in a["curve"] if p["tokens"] >= 0.15 * a["tokens"]]
    low = min(p["eval_loss"] for a in arms.values() for p in a["curve"])
    for ax, key, xlabel, scale in ((axes[0], "tokens", "training tokens (millions)", 1e-6),
                                   (axes[1], "seconds", "training seconds (compiling and evaluating left out)", 1)):
        for name, arm in arms.items():
            xs = [p[key] * scale for p in arm["curve"]]
            ax.plot(xs, [p["eval_loss"] for p in arm["curve"]], "o-", ms=3, color=colors[name], label=labels[name])
        ax.axhline(arms["baseline"]["curve"][-1]["eval_loss"], color="gray", ls="--", lw=0.8,
                   label="baseline's final loss")
        reached = results.get("comparison", {}).get("skyladder_reaches_baseline_final_loss")
        if reached:
            ax.axvline(reached[key] * scale, color=colors["skyladder"], ls=":", lw=0.8)
        if late:
            ax.set_ylim(low - 0.03 * (max(late) - low + 0.1), max(late) + 0.05 * (max(late) - low + 0.1))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats per byte)")
        ax.grid(alpha=0.3)
    window = [(p["tokens"] * 1e-6, p["window"]) for p in arms["skyladder"].get("train_curve", [])]
    if window:
        twin = axes[0].twinx()
        twin.plot(*zip(*window), color=colors["skyladder"], alpha=0.3, lw=1)
        twin.set_ylabel("SkyLadder window (tokens)", color=colors["skyladder"], alpha=0.6)
    axes[1].legend(loc="upper right", fontsize=8)
    smoke = " (SMOKE TEST: tiny model on CPU, not a result)" if results["smoke"] else ""
    fig.suptitle(f"SkyLadder vs baseline at {results['seq_len']} tokens per row, {count(results['model']['parameters'])} "
                 f"parameters, same data and steps{smoke}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def count(n: float) -> str:
    """1.2M, 24.6K, 512."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{1 if abs(n) < 100 * size else 0}f}{unit}"
    return f"{n:.0f}"


def less(saving_percent: float, what: str = "") -> str:
    """'12.3% less time' or '4.5% more time' from a saving in percent."""
    word = "less" if saving_percent >= 0 else "more"
    return f"{abs(saving_percent):.1f}% {word}{' ' + what if what else ''}"


def schedule_words(config) -> str:
    sky, length = config["skyladder"], config["train"]["seq_len"]
    climb = (f"over the first {sky['climb_fraction']:.0%} of steps" if sky["climb_fraction"] is not None
             else f"at {sky['alpha']:g} tokens per step")
    rounding = f", rounded down to multiples of {sky['multiple_of']}" if sky["multiple_of"] else ""
    return (f"{sky['kind']} window {sky['start']} -> {length} tokens {climb}{rounding}, "
            f"{sky['mask']} masks within documents")


def markdown(results) -> str:
    arms, env, cmp = results["arms"], results["environment"], results.get("comparison", {})
    base, sky = arms["baseline"], arms["skyladder"]
    smoke = "\n**SMOKE TEST** (tiny model on CPU): checks the code paths; the numbers mean nothing.\n" \
        if results["smoke"] else ""
    fp = results["data"]["fingerprint"]
    lines = [
        f"# SkyLadder vs baseline at {results['seq_len']} tokens per row", smoke,
        f"{results['date']} · {env['device_count']} x {env['device_kind']} · JAX {env['jax']} · Python {env['python']}"
        f" · seed {results['seed']} · git {str(env['git_commit'])[:10]}",
        "",
        f"Model: {count(results['model']['parameters'])} parameters ({results['model']['summary']}), byte "
        f"tokenizer, documents masked. Data: `python_packages` ({fp['files']} files, {fp['bytes'] / 1e6:.0f} MB, "
        f"fingerprint `{fp['sha256'][:16]}`), held out by content hash: {results['data']['heldout_documents']} "
        f"documents, {results['data']['heldout_bytes'] / 1e6:.1f} MB. Both arms: {base['steps']} steps of "
        f"{results['tokens_per_step']} tokens, the same batches (same data config and seed), "
        f"{results['configs']['baseline']['optim']['schedule']} learning rate "
        f"{results['configs']['baseline']['optim']['lr']:g} with {base['warmup_steps']} warmup step(s). SkyLadder: "
        f"{schedule_words(results['configs']['skyladder'])}; the only difference between the arms' configs.",
        "",
        "| | baseline | SkyLadder |",
        "| --- | --- | --- |",
    ]
    if "final" in base and "final" in sky:
        a, b = base["final"], sky["final"]
        lines.append(f"| final validation loss, {count(a['target_tokens'])} held-out tokens ({a['rows']} rows), "
                     f"mean ± SE | {a['loss']:.4f} ± {a['se']:.4f} | {b['loss']:.4f} ± {b['se']:.4f} |")
        d = cmp.get("final_loss_difference")
        if d:
            lines.append(f"| SkyLadder − baseline, paired by row | | {d['skyladder_minus_baseline']:+.4f} ± "
                         f"{d['se_paired_by_row']:.4f} |")
    subset = count(results["curve_subset_tokens"])
    lines += [
        f"| validation loss at the end, {subset}-position curve subset | "
        f"{cmp.get('baseline_final_curve_loss', float('nan')):.4f} | {cmp.get('skyladder_final_curve_loss', float('nan')):.4f} |",
        f"| tokens | {count(base['tokens'])} | {count(sky['tokens'])} |",
        f"| training seconds (compiling and evaluating left out) | {base['train_seconds']:.1f} | "
        f"{sky['train_seconds']:.1f} ({less(cmp.get('same_tokens_time_saving_percent', float('nan')), 'time')}) |",
        f"| tokens/s | {base['tokens'] / base['train_seconds']:,.0f} | {sky['tokens'] / sky['train_seconds']:,.0f} |",
    ]
    iso_time = cmp.get("baseline_loss_at_skyladder_final_seconds")
    if iso_time is not None:
        lines.append(f"| validation loss after {sky['train_seconds']:.1f} training seconds (curve subset) | "
                     f"{iso_time:.4f} (interpolated) | {cmp['skyladder_final_curve_loss']:.4f} |")
    reached = cmp.get("skyladder_reaches_baseline_final_loss")
    if reached:
        lines.append(f"| reaches the baseline's final loss (curve subset) at | {base['train_seconds']:.1f} s, "
                     f"{count(base['tokens'])} tokens | {reached['seconds']:.1f} s "
                     f"({less(reached['time_saving_percent'], 'time')}), {count(reached['tokens'])} tokens "
                     f"({reached['token_saving_percent']:.1f}% fewer) |")
    elif cmp:
        lines.append(f"| reaches the baseline's final loss (curve subset) at | {base['train_seconds']:.1f} s | "
                     "not within its tokens |")
    lines += ["", f"Training seconds are the trainer's `elapsed_s`. The curves are scored on the first {subset} "
              "positions of the final evaluation's rows; the time to reach the baseline's final loss is interpolated "
              "linearly between their points. Alone, a curve point is about sqrt(final rows / curve rows) times "
              "noisier than the final loss, but both arms are scored on the same rows, so their difference is far "
              "less noisy (compare the paired SE). The held-out rows are packed from held-out files in path "
              "order, so they over-represent packages early in the alphabet; both arms see the same rows.", ""]
    if "final" in base and "final" in sky:
        lines += ["Loss by position within documents (nats per byte; perplexity in brackets):", "",
                  "| positions | baseline | SkyLadder | target tokens |", "| --- | --- | --- | --- |"]
        for ra, rb in zip(base["final"]["by_position"], sky["final"]["by_position"]):
            lines.append(f"| {ra['positions']} | {ra['loss']:.4f} ({ra['ppl']:.3f}) | {rb['loss']:.4f} "
                         f"({rb['ppl']:.3f}) | {ra['tokens']:,} |")
        lines += ["", f"Copy task: a random {KEY_LENGTH}-character key (a-z, 0-9) in `SECRET_KEY = \"<key>\"` "
                  f"placed in held-out code, the row ending in `SECRET_KEY = \"` at {results['seq_len']} tokens; "
                  "exact match = every key byte is the model's argmax given the ones before (what greedy decoding "
                  "writes). Chance: per byte 1/36 = 2.8%, exact match 36^-16 ≈ 0.", "",
                  "| needle depth | distance (tokens) | trials | baseline exact | baseline per byte | "
                  "SkyLadder exact | SkyLadder per byte |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for ca, cb in zip(base["final"]["copy_task"], sky["final"]["copy_task"]):
            lines.append(f"| {ca['depth']:.2f} | {ca['mean_distance']:,.0f} | {ca['trials']} | "
                         f"{100 * ca['exact_match']:.0f}% ± {100 * ca['exact_match_se']:.0f} | "
                         f"{100 * ca['byte_accuracy']:.1f}% ± {100 * ca['byte_accuracy_se']:.1f} | "
                         f"{100 * cb['exact_match']:.0f}% ± {100 * cb['exact_match_se']:.0f} | "
                         f"{100 * cb['byte_accuracy']:.1f}% ± {100 * cb['byte_accuracy_se']:.1f} |")
    b = results["budget"]
    lines += ["", f"Budget: {b.get('rule')}" + (
        f"; the probe trained the baseline at {b['probe']['tokens_per_s']:,.0f} tokens/s "
        f"({b['probe']['step_seconds']:.3f} s per step, {b['probe']['overhead_seconds']:.0f} s start-up, compile "
        f"and save), so {base['steps']} steps were planned as {b['planned_train_seconds_per_arm']:.0f} s per arm"
        + (" (lowered to meet the deadline)" if b.get("limited_by_deadline") else "") if b.get("rule") == "probe"
        else "") + f". The whole script took {results['timings'].get('total_seconds', 0):.0f} s.",
        "", f"Rerun: `{results['rerun']}`", ""]
    return "\n".join(lines)


def report(out_dir, dest):
    """Copies the .md and .png of `out_dir` into `dest` and adds a short section to its README.md."""
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    os.makedirs(dest, exist_ok=True)
    for name in ("skyladder_8k.md", "skyladder_8k.png"):
        if os.path.abspath(os.path.join(out_dir, name)) != os.path.abspath(os.path.join(dest, name)):
            shutil.copyfile(os.path.join(out_dir, name), os.path.join(dest, name))
    arms, cmp, env = results["arms"], results["comparison"], results["environment"]
    base, sky = arms["baseline"], arms["skyladder"]
    d = cmp.get("final_loss_difference", {})
    reached = cmp.get("skyladder_reaches_baseline_final_loss")
    copy_task = lambda arm: ", ".join(f"{100 * c['exact_match']:.0f}%" for c in arm["final"]["copy_task"])
    section = [
        f"### {results['date'][:10]} · {env['device_kind']} · {count(results['model']['parameters'])} parameters, "
        f"{results['seq_len']} tokens{' · SMOKE TEST, not a result' if results['smoke'] else ''}",
        "",
        f"- Same {count(base['tokens'])} tokens: final validation loss baseline {base['final']['loss']:.4f} ± "
        f"{base['final']['se']:.4f}, SkyLadder {sky['final']['loss']:.4f} ± {sky['final']['se']:.4f} "
        f"(difference {d.get('skyladder_minus_baseline', float('nan')):+.4f} ± {d.get('se_paired_by_row', float('nan')):.4f}"
        f", paired), on {count(base['final']['target_tokens'])} held-out tokens.",
        f"- Training time for those tokens: {base['train_seconds']:.0f} s vs {sky['train_seconds']:.0f} s "
        f"(SkyLadder: {less(cmp['same_tokens_time_saving_percent'], 'time')}).",
        "- SkyLadder reaches the baseline's final loss " + (
            f"after {reached['seconds']:.0f} s: {less(reached['time_saving_percent'], 'training time')} "
            f"({reached['token_saving_percent']:.1f}% fewer tokens)." if reached else "not within its tokens."),
        f"- Copy task exact match by needle depth {', '.join(f'{c:.2f}' for c in DEPTHS)} (chance ≈ 0): "
        f"baseline {copy_task(base)}; SkyLadder {copy_task(sky)}.",
        "- Table: [skyladder_8k.md](skyladder_8k.md), figure: [skyladder_8k.png](skyladder_8k.png).",
        "",
    ]
    readme = os.path.join(dest, "README.md")
    body = open(readme).read() if os.path.exists(readme) else "# Experiments\n"
    if REPORT_SECTION not in body:
        body = body.rstrip("\n") + f"\n\n{REPORT_SECTION}\n\nAdded by `tools/experiment_skyladder.py --report_to`, " \
            "newest last.\n"
    body = body.rstrip("\n") + "\n\n" + "\n".join(section)
    with open(readme, "w") as f:
        f.write(body)
    print(f"copied skyladder_8k.md and skyladder_8k.png to {dest} and added a section to {readme}")


# ---------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.report_from:
        report(args.report_from, args.report_to)
        return
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # the arms' activations take most of the GPU (JAX's default share is 75%)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    import jax

    os.makedirs(args.out, exist_ok=True)
    root = args.workdir or tempfile.mkdtemp(prefix="skyladder_exp_")
    os.makedirs(root, exist_ok=True)
    compile_cache = not args.no_compile_cache
    if compile_cache:
        try:
            jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        except (AttributeError, KeyError, ValueError) as e:  # an option this JAX does not have
            compile_cache = False
            log(f"no persistent compilation cache: {e}")

    from ctxjax.config import as_plain
    from ctxjax.data import make_eval_batches, make_tokenizer, make_train_iterator, source_fingerprint
    from ctxjax.data import sources as sources_lib
    from ctxjax.model import ModelConfig

    # The source is opened a dozen times (fingerprint, held-out text, each run's train and eval
    # data); list the installed files once: they do not change while this runs.
    sources_lib.python_package_files = functools.lru_cache(maxsize=None)(sources_lib.python_package_files)

    timings = {}
    arms, difference = load_arms(args)
    base = arms["baseline"]
    spec = dict(base.data.sources[0])
    model = ModelConfig.from_config(base.model)
    seq_len = base.train.seq_len
    rerun = "python3 tools/experiment_skyladder.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {
        "experiment": "skyladder_8k", "smoke": args.smoke, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "rerun": rerun, "args": vars(args), "seed": args.seed, "seq_len": seq_len,
        "tokens_per_step": tokens_per_step(base),
        "model": {"parameters": model.param_count(), "summary": f"d_model {model.d_model}, {model.n_layers} layers, "
                  f"{model.n_heads}/{model.n_kv_heads} heads of {model.head_dim}, MLP {model.mlp_dim}, vocab "
                  f"{model.vocab_size}"},
        "curve_subset_tokens": base.eval.batches * base.eval.batch_size * (base.eval.seq_len or seq_len),
        "configs": {name: as_plain(c) for name, c in arms.items()}, "config_difference": difference,
        "environment": environment(), "compile_cache": compile_cache, "arms": {name: {} for name in ARMS},
        "timings": timings,
    }
    out = lambda name: os.path.join(args.out, name)
    log(f"{results['environment']['device_count']} x {results['environment']['device_kind']}, JAX "
        f"{results['environment']['jax']}; workdirs under {root}")

    # ---- data: fingerprint, held-out size, the final evaluation's rows, the copy task's rows
    t = time.time()
    fraction = float(base.data.validation_fraction)
    results["data"] = {"source": spec, "fingerprint": source_fingerprint(spec), "validation_fraction": fraction}
    tokenizer = make_tokenizer(base.data)
    hay_bytes = len(DEPTHS) * args.retrieval_trials * seq_len * 2
    docs, heldout_bytes, hay = heldout_text(spec, fraction, hay_bytes)
    results["data"].update(heldout_documents=docs, heldout_bytes=heldout_bytes)
    eval_rows_per_batch = base.eval.batch_size
    rows_needed = math.ceil(args.final_eval_tokens / (0.9 * seq_len))
    eval_batches = make_eval_batches(base.data, seq_len=seq_len, batch_size=eval_rows_per_batch,
                                     num_batches=math.ceil(rows_needed / eval_rows_per_batch))
    final_positions = sum(b["tokens"].size for b in eval_batches)
    results["data"]["final_eval_positions"] = final_positions
    results["data"]["final_eval_repeats_heldout_text"] = final_positions > heldout_bytes
    copy_rows = copy_task_rows(tokenizer, hay, seq_len, args.retrieval_trials, seed=1234)
    # the arms read the same batches: their data sections and seeds are equal; check the stream too
    first = []
    for name in ARMS:
        it = make_train_iterator(arms[name].data, seq_len=seq_len, global_batch_size=arms[name].train.global_batch_size,
                                 seed=arms[name].train.seed, process_index=0, process_count=1)
        first.append([next(it)["tokens"] for _ in range(2)])
        it.close()
    results["data"]["arms_read_the_same_batches"] = all(np.array_equal(a, b) for a, b in zip(*first))
    timings["data_seconds"] = time.time() - t
    log(f"data: {results['data']['fingerprint']['files']} files, {docs} held out ({heldout_bytes / 1e6:.1f} MB); "
        f"final evaluation {final_positions} positions; {timings['data_seconds']:.0f} s")
    write_json(out("results.json"), results)

    # ---- budget
    if args.steps or args.tokens:
        steps, budget = plan_steps(args, base, None)
    else:
        t = time.time()
        probed = probe(base, os.path.join(root, "probe"), args.probe_steps)
        shutil.rmtree(os.path.join(root, "probe"), ignore_errors=True)
        timings["probe_seconds"] = time.time() - t
        steps, budget = plan_steps(args, base, probed)
        budget["probe"] = probed
        log(f"probe: {probed['tokens_per_s']:,.0f} tokens/s, {probed['overhead_seconds']:.0f} s outside the loop; "
            f"{steps} steps per arm, planned as {budget['planned_train_seconds_per_arm']:.0f} training seconds each, "
            f"{budget['estimated_seconds_per_arm_outside_training']:.0f} s outside training, "
            f"{budget['seconds_left_after_probe']:.0f} s left")
    results["budget"] = budget
    write_json(out("results.json"), results)

    # ---- the arms, one after the other
    for name in ARMS:
        config = with_budget(arms[name], steps, args.eval_points)
        results["configs"][name] = as_plain(config)
        workdir = os.path.join(root, name)
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"{name}: {steps} steps, {count(steps * tokens_per_step(config))} tokens, eval every "
            f"{config.eval.every} steps")
        rows, wall = train_run(config, workdir)
        curve, train_curve = curves(rows, config)
        arm = results["arms"][name]
        arm.update(steps=steps, warmup_steps=config.optim.warmup_steps, tokens=steps * tokens_per_step(config),
                   train_seconds=train_curve[-1]["seconds"], wall_seconds=wall, curve=curve, train_curve=train_curve)
        arm["tokens_per_s"] = arm["tokens"] / arm["train_seconds"]
        shutil.copyfile(os.path.join(workdir, "metrics.jsonl"), out(f"{name}_metrics.jsonl"))
        log(f"{name}: trained in {arm['train_seconds']:.1f} s ({arm['tokens_per_s']:,.0f} tokens/s), "
            f"{wall:.0f} s in all; final curve loss {curve[-1]['eval_loss']:.4f}")
        write_json(out("results.json"), results)
        t = time.time()
        arm["final"] = final_evaluation(workdir, eval_batches, copy_rows, args.ppl_bucket, eval_rows_per_batch)
        subset = config.eval.batches * config.eval.batch_size  # the curve's rows come first
        arm["final"]["curve_subset_check"] = {
            "recomputed": ratio_and_se(arm["final"]["row_sums"][:subset], arm["final"]["row_counts"][:subset])[0],
            "trainer": curve[-1]["eval_loss"]}
        timings[f"{name}_final_eval_seconds"] = time.time() - t
        log(f"{name}: final loss {arm['final']['loss']:.4f} ± {arm['final']['se']:.4f} on "
            f"{arm['final']['target_tokens']} tokens; copy task exact "
            f"{[round(c['exact_match'], 2) for c in arm['final']['copy_task']]}; {timings[f'{name}_final_eval_seconds']:.0f} s")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        write_json(out("results.json"), results)

    # ---- comparison and outputs
    results["comparison"] = compare(results)
    timings["total_seconds"] = time.time() - START
    write_json(out("results.json"), results)
    write_figure(results, out("skyladder_8k.png"))
    with open(out("skyladder_8k.md"), "w") as f:
        f.write(markdown(results))
    if args.report_to:
        report(args.out, args.report_to)
    if not args.keep and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    elif not args.keep:
        shutil.rmtree(os.path.join(root, "xla_cache"), ignore_errors=True)
    cmp = results["comparison"]
    log(f"done: same tokens, SkyLadder took {less(cmp['same_tokens_time_saving_percent'], 'time')}; reaches the "
        f"baseline's final loss: {cmp['skyladder_reaches_baseline_final_loss']}; "
        f"difference {cmp.get('final_loss_difference')}; outputs in {args.out}")


if __name__ == "__main__":
    main()
