"""The main job: python -m ctxjax.train --config=configs/tiny_cpu.py --workdir=/tmp/run [--config.a.b=v]

Reads top to bottom: config -> mesh -> model and optimizer (sharded) -> data -> resume ->
loop (SkyLadder window, step, log, checkpoint, evaluate) -> final save, plot.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from ctxjax import checkpoint as ckpt_lib
from ctxjax import mesh as mesh_lib
from ctxjax.config import check_mesh_fits, validate_config
from ctxjax.data import check_vocab, make_eval_batches, make_tokenizer, make_train_iterator
from ctxjax.attention.context_parallel import zigzag
from ctxjax.model import (
    Llama, head_dim_of, init_params, lm_loss, logical_axes, matmul_flops_per_token, next_token_targets)
from ctxjax.model.llama import layer_windows
from ctxjax.schedules import make_lr_schedule, make_window_schedule


# --------------------------------------------------------------------------------------------
# Optimizer and sharded state
# --------------------------------------------------------------------------------------------
def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; weight decay on matrices only (not norms)."""
    lr = make_lr_schedule(optim_cfg, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [optax.clip_by_global_norm(optim_cfg.grad_clip_norm)] if optim_cfg.grad_clip_norm > 0 else []
    parts.append(optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), lr


def state_shardings(model_cfg, tx, mesh):
    """Shardings of params and optimizer state from the model's logical axes."""
    abstract_model = nnx.eval_shape(lambda: Llama(model_cfg, nnx.Rngs(0)))
    axes = nnx.to_pure_dict(logical_axes(abstract_model))
    abstract_params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
    mesh_lib.check_divisible(abstract_params, axes, mesh)
    param_sh = mesh_lib.tree_shardings(mesh, axes)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), param_sh,
                                   transform_non_params=lambda _: replicated)
    return param_sh, opt_sh


def init_state(model_cfg, tx, seed, param_sh, opt_sh):
    """(graphdef, params, opt_state), created directly in their shards (never whole on one device)."""
    graphdef, params = init_params(model_cfg, seed, param_sh)
    return graphdef, params, jax.jit(tx.init, out_shardings=opt_sh)(params)


# --------------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------------
def make_train_step(graphdef, tx, lr_schedule, config):
    """(params, opt_state, batch, step, window) -> (params, opt_state, metrics). `window` is a
    traced int32 scalar (or None when no window schedule), so a new window never recompiles."""
    accum = config.optim.grad_accum_steps
    vocab_chunk, z_loss = config.train.vocab_chunk, config.optim.z_loss

    def micro_loss(params, micro, window, total_tokens):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(micro["tokens"], micro["segment_ids"], micro["token_index"],
                                     micro["rope_positions"], window,
                                     window_mask=config.skyladder.mask)
        loss, metrics = lm_loss(hidden, model.head_weight(), micro["targets"], micro["loss_weights"],
                                vocab_chunk=vocab_chunk, z_loss=z_loss)
        # weight each micro-batch by its share of the step's target tokens: exact accumulation
        share = metrics["tokens"] / total_tokens
        return loss * share, {k: v * share for k, v in metrics.items() if k != "tokens"}

    def train_step(params, opt_state, batch, step, window):
        total_tokens = jnp.maximum(batch["loss_weights"].sum(), 1.0)
        micro_batches = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, micro):
            grads, metrics = carry
            (_, m), g = grad_fn(params, micro, window, total_tokens)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), {"loss": jnp.float32(0), "z_loss": jnp.float32(0)})
        if accum == 1:
            (grads, metrics), _ = accumulate(zeros, jax.tree.map(lambda x: x[0], micro_batches))
        else:
            (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=lr_schedule(step), tokens=total_tokens)
        return params, opt_state, metrics

    return train_step


def prepare_batch(batch: dict, mesh) -> dict:
    """Host side, once per step: next-token targets, then (with a context axis) the zigzag
    reordering of every field, so causal work is balanced over the context shards. The mask
    uses the reordered token_index, so attention needs no special casing."""
    targets, weights = next_token_targets(np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"]))
    batch = dict(batch, targets=targets.astype(np.int32), loss_weights=weights)
    shards = mesh.shape["context"]
    if shards > 1:
        batch = {k: zigzag(np.asarray(v), 1, shards) for k, v in batch.items()}
    return batch


def jit_train_step(graphdef, tx, lr_schedule, config, mesh, param_sh, opt_sh):
    """The train step under jit with explicit shardings; params and optimizer state donated."""
    batch_sh = mesh_lib.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(make_train_step(graphdef, tx, lr_schedule, config),
                   in_shardings=(param_sh, opt_sh, batch_sh, replicated, replicated),
                   out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1))


def make_eval_step(graphdef, config):
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(batch["tokens"], batch["segment_ids"], batch["token_index"],
                                     batch["rope_positions"], None)
        _, metrics = lm_loss(hidden, model.head_weight(), batch["targets"], batch["loss_weights"],
                             vocab_chunk=config.train.vocab_chunk)
        return metrics["loss"] * metrics["tokens"], metrics["tokens"]
    return eval_step


# --------------------------------------------------------------------------------------------
# FLOPs of the actual mask (for MFU)
# --------------------------------------------------------------------------------------------
def attended_pairs(token_index, segment_ids, *, window=None, chunk=None, sinks=0, documents=True) -> float:
    """Allowed (query, key) pairs of a causal mask over packed rows, counted on the host in
    O(B*L) with NumPy: each query sees the keys from the latest of (document start, window
    start, chunk start) up to itself, plus the sinks before that. Needs the rows in natural
    order with contiguous documents (as packing produces; i.e. before zigzag)."""
    q = np.asarray(token_index, np.int64)
    segment_ids = np.asarray(segment_ids)
    start = np.zeros_like(q)
    if documents:
        new_doc = np.concatenate([np.ones_like(segment_ids[:, :1], bool),
                                  segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        start = np.maximum.accumulate(np.where(new_doc, q, 0), axis=1)
    if window is not None:
        start = np.maximum(start, q - window + 1)
    if chunk is not None:
        start = np.maximum(start, (q // chunk) * chunk)
    body = q - start + 1
    if documents:
        body = np.where(segment_ids != 0, body, 0)
    # sink keys before `start` (all precede the query) or, for a query with no body, up to itself
    extra_sinks = np.where(body > 0, np.minimum(sinks, start), np.minimum(sinks, q + 1))
    return float((body + extra_sinks).sum())


def step_flops(batch, window: int | None, config) -> float:
    """Training FLOPs of one step on this host's rows: dense matmuls (6 x params x tokens) plus
    attention's two matmuls over the allowed area of each layer's actual mask, x3 for forward +
    backward. Host-side, off the device's critical path."""
    cfg, sky = config.model, config.skyladder.mask
    flops = matmul_flops_per_token(cfg) * batch["tokens"].size
    per_pair = 3 * 4 * cfg.n_heads * head_dim_of(cfg)
    for local in layer_windows(cfg):
        w = local if local is not None else (window if sky == "sliding" else None)
        c = window if (local is None and sky == "chunk") else None
        flops += per_pair * attended_pairs(batch["token_index"], batch["segment_ids"], window=w, chunk=c,
                                           sinks=cfg.sinks, documents=cfg.document_mask)
    return flops


_PEAK_BF16_TFLOPS = {"h100": 989, "h200": 989, "h800": 989, "gh200": 989, "a100": 312, "l4": 121,
                     "v6": 918, "v5p": 459, "v5 lite": 197, "v5e": 197, "v4": 275}


def peak_flops_per_device(config) -> float:
    if config.train.peak_tflops > 0:
        return config.train.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for name, tflops in _PEAK_BF16_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return 100e9 * max(1, (os.cpu_count() or 1) // jax.local_device_count())  # nominal CPU figure


# --------------------------------------------------------------------------------------------
# Outputs people look at
# --------------------------------------------------------------------------------------------
class MetricsWriter:
    """metrics.jsonl + TensorBoard, process 0 only."""

    def __init__(self, workdir):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()


def plot_metrics(workdir: str) -> str | None:
    """loss (and eval loss) and the attention window against step, as workdir/metrics.png."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(path)]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.grid(alpha=0.3)
    handles = ax.get_lines()
    windowed = [r for r in train if "window" in r]
    if windowed:
        ax2 = ax.twinx()
        handles += ax2.plot([r["step"] for r in windowed], [r["window"] for r in windowed], color="tab:red",
                            alpha=0.6, label="attention window")
        ax2.set_ylabel("attention window (tokens)")
    ax.legend(handles=handles, loc="center right")  # one legend for both axes
    fig.tight_layout()
    out = os.path.join(workdir, "metrics.png")
    fd, tmp = tempfile.mkstemp(dir=workdir, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


class Preemption:
    """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. called from a notebook worker)
            pass

    def _handle(self, signum, frame):
        self.requested = True


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train (or resume) the run in `workdir`; returns the last logged metrics. `stop_after`
    ends this invocation early at that step, with a checkpoint, as a preemption would (a job
    split into time-limited segments resumes from there)."""
    config = validate_config(config)
    if config.train.distributed:
        initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    ckpt_lib.write_config(workdir, config)
    mesh = mesh_lib.make_mesh(config.mesh)
    check_mesh_fits(config, mesh)
    total_steps = config.train.steps
    tokenizer = make_tokenizer(config.data)
    check_vocab(tokenizer, config.model.vocab_size)

    tx, lr_schedule = make_optimizer(config.optim, total_steps)
    window_schedule = make_window_schedule(config.skyladder, seq_len=config.train.seq_len, total_steps=total_steps)
    data = make_train_iterator(config.data, seq_len=config.train.seq_len,
                               global_batch_size=config.train.global_batch_size, seed=config.train.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    checkpointer = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)

    with mesh_lib.use_mesh(mesh):
        param_sh, opt_sh = state_shardings(config.model, tx, mesh)
        graphdef, params, opt_state = init_state(config.model, tx, config.train.seed, param_sh, opt_sh)
        step = 0
        if checkpointer.latest_step() is not None:  # resume this run where it stopped
            abstract = lambda tree, sh: jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
            params, opt_state, step = checkpointer.restore(
                checkpointer.latest_step(), abstract(params, param_sh), abstract(opt_state, opt_sh), data)
            print(f"resumed {workdir} at step {step}", flush=True)
        elif config.checkpoint.init_from:  # start from another run's (or an imported model's) params
            _, target = ckpt_lib.abstract_params(config.model, param_sh)
            params, from_step = ckpt_lib.restore_params(config.checkpoint.init_from, target,
                                                        config.checkpoint.init_step)
            print(f"initialised params from {config.checkpoint.init_from} (step {from_step})", flush=True)

        train_step = jit_train_step(graphdef, tx, lr_schedule, config, mesh, param_sh, opt_sh)
        evaluate = make_evaluator(graphdef, config, mesh)

        writer = MetricsWriter(workdir)
        preemption = Preemption()
        peak = peak_flops_per_device(config) * jax.local_device_count()  # FLOPs are counted per host
        progress = make_progress(step, total_steps)
        last, interval, t0 = {}, [], time.perf_counter()  # interval: this log period's steps
        while step < total_steps:
            host_batch = next(data)
            batch = mesh_lib.shard_batch(prepare_batch(host_batch, mesh), mesh)
            seq_len = batch["tokens"].shape[1]
            window = None if window_schedule is None else min(int(window_schedule(step)), seq_len)
            params, opt_state, metrics = train_step(params, opt_state, batch, jnp.int32(step),
                                                    None if window is None else jnp.int32(window))
            interval.append((metrics, step_flops(host_batch, window, config), batch["tokens"].size))
            step += 1
            if step % config.train.log_every == 0 or step == total_steps:
                steps = jax.device_get(interval)  # the only host sync of the loop
                elapsed, t0, interval = time.perf_counter() - t0, time.perf_counter(), []
                mean = lambda key: float(np.mean([m[key] for m, _, _ in steps]))
                last = {"loss": mean("loss"), "lr": float(steps[-1][0]["lr"]), "grad_norm": mean("grad_norm"),
                        "tokens_per_s": sum(n for _, _, n in steps) / elapsed,
                        "mfu": sum(f for _, f, _ in steps) / elapsed / peak, "seq_len": seq_len,
                        "window": seq_len if window is None else window}
                if config.optim.z_loss:
                    last["z_loss"] = mean("z_loss")
                writer.write(step, last)
                progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                     window=last["window"], mfu=f"{last['mfu']:.3f}")
            progress.update(1)
            if config.eval.every and step % config.eval.every == 0 and step < total_steps:
                writer.write(step, {"eval_loss": evaluate(params)})
            if checkpointer.should_save(step) and step < total_steps:
                checkpointer.save(step, params, opt_state, data, config)
            if preemption.requested or checkpointer.reached_preemption(step) or step == stop_after:
                print(f"\nstopping at step {step}: checkpoint saved, rerun to resume", flush=True)
                checkpointer.save(step, params, opt_state, data, config)
                checkpointer.close()
                writer.close()
                return last
        progress.close()
        checkpointer.save(step, params, opt_state, data, config)
        last["eval_loss"] = evaluate(params)
        writer.write(step, {"eval_loss": last["eval_loss"]})
        checkpointer.close()
        writer.close()
    if config.train.plot:
        plot_metrics(workdir)
    return last


def make_evaluator(graphdef, config, mesh):
    """Mean validation loss over held-out documents (same batches every time)."""
    seq_len = config.eval.seq_len or config.train.seq_len
    batches = None
    eval_step = jax.jit(make_eval_step(graphdef, config))

    def evaluate(params) -> float:
        nonlocal batches
        if batches is None:
            batches = make_eval_batches(config.data, seq_len=seq_len, batch_size=config.eval.batch_size,
                                        num_batches=config.eval.batches)
            batches = [prepare_batch(b, mesh) for b in batches]
        total = count = 0.0
        sharding = mesh_lib.batch_sharding(mesh)
        for batch in batches:  # every process holds the whole eval batch; each places its shards
            batch = {k: jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
                     for k, x in batch.items()}
            loss_sum, n = eval_step(params, batch)
            total, count = total + float(loss_sum), count + float(n)
        return total / max(count, 1.0)

    return evaluate


def make_progress(initial: int, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                disable=jax.process_index() != 0, mininterval=1.0)


def initialize_distributed():
    """jax.distributed.initialize on pods (auto-detected) or from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (multi-node GPU, or several CPU processes on one machine)."""
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


# --------------------------------------------------------------------------------------------
def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # keep Orbax/JAX info chatter out of the progress bar
        logging.set_verbosity(logging.WARNING)
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None or workdir is None:
        raise app.UsageError("both --config=configs/<experiment>.py and --workdir=DIR are required.")
    final = train_and_evaluate(config, workdir)
    print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))


if __name__ == "__main__":
    # flags live here, not at import time, so other modules can import this one
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
    app.run(main)
