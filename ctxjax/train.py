"""The main job: python -m ctxjax.train --config=configs/tiny_cpu.py --workdir=/tmp/run [--config.a.b=v]

Reads top to bottom: config (every check before anything is written) -> mesh -> plan (attention
backend, context parallelism, remat: ctxjax/parallel.py) -> model and optimizer state, sharded ->
data -> resume -> compile -> loop (SkyLadder window, step, log, evaluate, checkpoint) -> final
save, evaluation, plot.
"""
from __future__ import annotations

import os
import signal
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
from ctxjax import metrics as metrics_lib
from ctxjax import parallel
from ctxjax.config import check_mesh_fits, translate_legacy, validate_config
from ctxjax.data import check_vocab, make_eval_batches, make_tokenizer, make_train_iterator
from ctxjax.model import ModelConfig, init_params, lm_loss, logical_axes, next_token_targets
from ctxjax.model.llama import abstract_model
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


def abstract_state(model_cfg: ModelConfig, plan: parallel.Plan, tx, mesh):
    """(graphdef, params, opt_state) as ShapeDtypeStructs carrying their shardings: the whole
    training state without memory or compute (enough to compile the step ahead of time)."""
    model = abstract_model(model_cfg, **plan.model_options())
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    axes = nnx.to_pure_dict(logical_axes(model))
    mesh_lib.check_divisible(params, axes, mesh)
    param_sh = mesh_lib.tree_shardings(mesh, axes)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_sh,
                                   transform_non_params=lambda _: replicated)
    with_sharding = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    return graphdef, with_sharding(params, param_sh), with_sharding(opt_shapes, opt_sh)


def init_state(model_cfg: ModelConfig, plan: parallel.Plan, tx, seed: int, params_abstract, opt_abstract):
    """(params, opt_state), created directly in their shards (never whole on one device)."""
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    _, params = init_params(model_cfg, seed, shardings(params_abstract), **plan.model_options())
    return params, jax.jit(tx.init, out_shardings=shardings(opt_abstract))(params)


# --------------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------------
def make_train_step(graphdef, tx, lr_schedule, config):
    """(params, opt_state, batch, step, window) -> (params, opt_state, metrics). `window` is a
    traced int32 scalar, or None when no window applies (a separate compilation), so a new
    window never recompiles."""
    accum = config.optim.grad_accum_steps
    vocab_chunk, z_loss, window_mask = config.train.vocab_chunk, config.optim.z_loss, config.skyladder.mask

    def micro_loss(params, micro, window, total_tokens):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(micro["tokens"], micro["segment_ids"], micro["token_index"],
                                     micro["rope_positions"], window, window_mask=window_mask)
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


def jit_train_step(graphdef, tx, lr_schedule, config, mesh, params_abstract, opt_abstract):
    """The train step under jit with explicit shardings; params and optimizer state donated."""
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(make_train_step(graphdef, tx, lr_schedule, config),
                   in_shardings=(shardings(params_abstract), shardings(opt_abstract), mesh_lib.batch_sharding(mesh),
                                 replicated, replicated),
                   out_shardings=(shardings(params_abstract), shardings(opt_abstract), replicated),
                   donate_argnums=(0, 1))


def make_eval_step(graphdef, config):
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(batch["tokens"], batch["segment_ids"], batch["token_index"],
                                     batch["rope_positions"], None)
        _, metrics = lm_loss(hidden, model.head_weight(), batch["targets"], batch["loss_weights"],
                             vocab_chunk=config.train.vocab_chunk)
        return metrics["loss"] * metrics["tokens"], metrics["tokens"]
    return eval_step


def with_targets(batch: dict) -> dict:
    """Host side, before any reordering: next-token targets and loss weights of packed rows."""
    targets, weights = next_token_targets(np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"]))
    return dict(batch, targets=targets.astype(np.int32), loss_weights=weights)


def batch_shapes(config, seq_len: int, rows: int, mesh) -> dict:
    """ShapeDtypeStructs of a prepared batch (for compiling ahead of time)."""
    sharding = mesh_lib.batch_sharding(mesh)
    dtypes = dict(tokens=jnp.int32, segment_ids=jnp.int32, token_index=jnp.int32, rope_positions=jnp.int32,
                  targets=jnp.int32, loss_weights=jnp.float32)
    return {k: jax.ShapeDtypeStruct((rows, seq_len), d, sharding=sharding) for k, d in dtypes.items()}


class CompiledStep:
    """The jitted train step, compiled ahead of its first call for each batch shape (and with or
    without a window term), so the run says that it is compiling and how much memory the step
    needs, instead of pausing silently."""

    def __init__(self, jitted):
        self.jitted, self.executables = jitted, {}
        self.compile_seconds = 0.0  # spent compiling so far

    def __call__(self, params, opt_state, batch, step, window):
        key = (batch["tokens"].shape, window is None)
        if key not in self.executables:
            rows, length = key[0]
            if jax.process_index() == 0:
                print(f"compiling the train step for {rows} rows x {length} tokens"
                      f"{'' if window is None else ' with a window'}...", flush=True)
            start = time.perf_counter()
            self.executables[key] = self.jitted.lower(params, opt_state, batch, step, window).compile()
            self.compile_seconds += time.perf_counter() - start
            if jax.process_index() == 0:
                print(f"compiled in {time.perf_counter() - start:.1f} s; memory "
                      f"{metrics_lib.describe_memory(self.executables[key].memory_analysis())}", flush=True)
        return self.executables[key](params, opt_state, batch, step, window)


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------
class Stop:
    """SIGTERM (preemption) and a first Ctrl-C ask the loop to save and exit at the next step
    boundary; a second Ctrl-C exits at once."""

    def __init__(self):
        self.requested, self.reason = False, ""
        try:
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread (e.g. called from a notebook worker)
            pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.reason = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving a checkpoint at the end of this step (press Ctrl-C again to quit now)",
                  flush=True)

    def restore(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
            except ValueError:
                pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
    """Train (or resume) the run in `workdir`; returns the last logged metrics (with
    'stopped': True when it stopped early). `stop_after` ends this invocation at that step,
    with a checkpoint, as a preemption would (a job split into time-limited segments)."""
    # ---- everything that can be wrong with the inputs, before anything is written
    config = validate_config(translate_legacy(config))
    if config.train.distributed:
        initialize_distributed()
    mesh = mesh_lib.make_mesh(config.mesh)
    check_mesh_fits(config, mesh)
    tokenizer = make_tokenizer(config.data)
    check_vocab(tokenizer, config.model.vocab_size)
    plan = parallel.make_plan(config, mesh)
    resume_step, changes = ckpt_lib.latest_step(workdir), None
    if resume_step is not None:
        changes = ckpt_lib.check_resume(workdir, config, resume_step)
        if resume_step >= config.train.steps:
            print(f"{workdir} is complete: it trained {resume_step} of train.steps={config.train.steps} steps. "
                  f"To train further, rerun with a larger --config.train.steps (the learning-rate schedule "
                  f"then stretches to the new length).", flush=True)
            return ckpt_lib.last_metrics(workdir)

    # ---- the run's state
    model_cfg, total_steps = ModelConfig.from_config(config.model), config.train.steps
    os.makedirs(workdir, exist_ok=True)
    ckpt_lib.record_config(workdir, config, resume_step, changes)
    tx, lr_schedule = make_optimizer(config.optim, total_steps)
    window_at = make_window_schedule(config.skyladder, seq_len=config.train.seq_len, total_steps=total_steps)
    data = make_train_iterator(config.data, seq_len=config.train.seq_len,
                               global_batch_size=config.train.global_batch_size, seed=config.train.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    checkpointer = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
    if jax.process_index() == 0:
        print("\n".join(metrics_lib.run_summary(config, model_cfg, mesh, plan)), flush=True)

    with mesh_lib.use_mesh(mesh):
        graphdef, params_abstract, opt_abstract = abstract_state(model_cfg, plan, tx, mesh)
        step = 0
        if resume_step is not None:  # resume this run where it stopped
            params, opt_state, step = checkpointer.restore(resume_step, params_abstract, opt_abstract, data)
            print(f"resumed {workdir} at step {step}", flush=True)
        else:
            params, opt_state = init_state(model_cfg, plan, tx, config.train.seed, params_abstract, opt_abstract)
            if config.checkpoint.init_from:  # another run's (or an imported model's) params
                params, from_step = ckpt_lib.restore_params(config.checkpoint.init_from, params_abstract,
                                                            config.checkpoint.init_step)
                print(f"initialised params from {config.checkpoint.init_from} (step {from_step})", flush=True)

        train_step = CompiledStep(jit_train_step(graphdef, tx, lr_schedule, config, mesh, params_abstract,
                                                 opt_abstract))
        evaluate = make_evaluator(graphdef, config, mesh, plan)
        writer = metrics_lib.MetricsWriter(workdir, wandb_project=config.train.wandb_project, config=config)
        stop = Stop()
        profiler = metrics_lib.Profiler(workdir, config.train.profile_steps)
        peak = metrics_lib.peak_flops_per_device(jax.local_devices()[0], config.train.peak_tflops)
        peak *= jax.local_device_count()  # FLOPs are counted on this host's rows
        progress = make_progress(step, total_steps)
        last, interval, t0 = {}, [], time.perf_counter()  # interval: this log period's steps
        # elapsed_s: seconds of this invocation's training loop, compiling and evaluating left out
        train_seconds, not_training, compiled = 0.0, 0.0, train_step.compile_seconds
        try:
            while step < total_steps:
                host_batch = next(data)
                batch = parallel.shard_inputs(with_targets(host_batch), mesh, plan)
                seq_len = batch["tokens"].shape[1]
                window = window_at(step, seq_len)
                profiler.before(step + 1)
                params, opt_state, metrics = train_step(params, opt_state, batch, jnp.int32(step),
                                                        None if window is None else jnp.int32(window))
                interval.append((metrics, metrics_lib.step_flops(host_batch, window, model_cfg, config.skyladder.mask),
                                 batch["tokens"].size))
                step += 1
                profiler.after(step, metrics)
                if step % config.train.log_every == 0 or step == total_steps:
                    steps = jax.device_get(interval)  # the only host sync of the loop
                    elapsed, t0, interval = time.perf_counter() - t0, time.perf_counter(), []
                    train_seconds += elapsed - not_training - (train_step.compile_seconds - compiled)
                    not_training, compiled = 0.0, train_step.compile_seconds
                    mean = lambda key: float(np.mean([m[key] for m, _, _ in steps]))
                    last = {"loss": mean("loss"), "lr": float(steps[-1][0]["lr"]), "grad_norm": mean("grad_norm"),
                            "tokens_per_s": sum(n for _, _, n in steps) / elapsed,
                            "mfu": sum(f for _, f, _ in steps) / elapsed / peak, "seq_len": seq_len,
                            "window": seq_len if window is None else window, "elapsed_s": train_seconds}
                    if config.optim.z_loss:
                        last["z_loss"] = mean("z_loss")
                    writer.write(step, last)
                    progress.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                         window=last["window"], mfu=f"{last['mfu']:.3f}")
                progress.update(1)
                if config.eval.every and step % config.eval.every == 0 and step < total_steps:
                    jax.block_until_ready(params)  # steps still in flight count as training
                    eval_start = time.perf_counter()
                    writer.write(step, {"eval_loss": evaluate(params)})
                    not_training += time.perf_counter() - eval_start
                if checkpointer.should_save(step) and step < total_steps:
                    checkpointer.save(step, params, opt_state, data, config)
                if stop.requested or checkpointer.reached_preemption(step) or step == stop_after:
                    progress.close()
                    checkpointer.save(step, params, opt_state, data, config)
                    checkpointer.close()
                    why = stop.reason or ("stop_after" if step == stop_after else "preemption")
                    print(f"stopped at step {step} of {total_steps} ({why}): checkpoint saved; rerun the same "
                          f"command to resume", flush=True)
                    return dict(last, stopped=True)
            progress.close()
            checkpointer.save(step, params, opt_state, data, config)
            last["eval_loss"] = evaluate(params)
            writer.write(step, {"eval_loss": last["eval_loss"]})
            checkpointer.close()
        finally:
            profiler.close()
            writer.close()
            stop.restore()
    if config.train.plot:
        metrics_lib.plot_metrics(workdir)
    return last


def make_evaluator(graphdef, config, mesh, plan):
    """Mean validation loss over held-out documents (same batches every time)."""
    seq_len = config.eval.seq_len or config.train.seq_len
    batches = None
    eval_step = jax.jit(make_eval_step(graphdef, config))

    def evaluate(params) -> float:
        nonlocal batches
        if batches is None:
            batches = make_eval_batches(config.data, seq_len=seq_len, batch_size=config.eval.batch_size,
                                        num_batches=config.eval.batches)
            batches = [with_targets(b) for b in batches]
        total = count = 0.0
        for batch in batches:  # every process holds the whole eval batch; each places its shards
            loss_sum, n = eval_step(params, parallel.shard_inputs(batch, mesh, plan, whole=True))
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
    try:
        final = train_and_evaluate(config, workdir)
    except ckpt_lib.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if final and not final.get("stopped"):
        print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))


if __name__ == "__main__":
    # flags live here, not at import time, so other modules can import this one
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
    app.run(main)
