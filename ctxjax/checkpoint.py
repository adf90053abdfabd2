"""Orbax checkpoints of a run: params, optimizer state, step, data-iterator state and config.

Layout: WORKDIR/config.json (the run's config), WORKDIR/checkpoints/<step>/ with items 'params',
'opt_state', 'meta' (JSON: step), 'data' (Grain iterator state) and 'config'. Saves are
asynchronous and atomic (Orbax writes to a temporary directory and renames it on commit), so a
preempted or failed save never leaves a half checkpoint behind. A resumed run may change only
what is safe to change (`check_resume`); the changes are recorded in WORKDIR/config_history.jsonl
and the first config is kept as WORKDIR/config.original.json.
"""
from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import shutil
import sys
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from ctxjax.config import as_plain
from ctxjax.metrics import write_json

CONFIG_FILE = "config.json"
ORIGINAL_CONFIG_FILE = "config.original.json"
HISTORY_FILE = "config_history.jsonl"

# What a resumed run may change: nothing that alters parameter shapes, the optimizer state or the
# data order. Sections listed whole, or single keys.
RESUMABLE = ("train.steps", "train.log_every", "train.peak_tflops", "train.plot", "train.distributed",
             "train.profile_steps", "train.wandb_project", "train.vocab_chunk", "checkpoint", "eval", "parallel",
             "mesh", "optim", "skyladder", "model.dtype", "data.read_threads", "data.read_buffer", "data.prefetch",
             "data.worker_buffer_size")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what and what is intact."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Write WORKDIR/config.json atomically (process 0 only)."""
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, CONFIG_FILE), as_plain(config))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a ctxjax workdir (python -m ctxjax.train "
                                f"--workdir=...)?")
    with open(path) as f:
        saved = _tuples_from_json(json.load(f))
    # Today's defaults under the saved values: a run written before a knob existed (or under
    # an older name) still loads.
    from ctxjax.config import merge_saved
    return merge_saved(saved)


def _tuples_from_json(x):
    """JSON has no tuples; configs use them for sequences (e.g. layer_pattern)."""
    if isinstance(x, dict):
        return {k: _tuples_from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples_from_json(v) for v in x)
    return x


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "rope":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def latest_step(workdir: str) -> int | None:
    """The last committed step of a workdir (None when it has no checkpoint)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    with _read_only(directory) as manager:
        return manager.latest_step()


def check_resume(workdir: str, config: ml_collections.ConfigDict, step: int) -> dict:
    """Compare the config of a resumed run with the saved one before anything is written.
    Refuses, naming the keys, a change that would alter parameter shapes, the optimizer state or
    the data order; returns the allowed changes, {key: [saved, new]}, for `record_config`. A
    workdir holding params only (an imported model) starts new runs; it does not resume."""
    if not os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), "opt_state")):
        raise FileNotFoundError(f"{checkpoint_dir(workdir)}/{step} holds params only (a model imported by "
                                "tools/convert_from_hf.py): train in a new --workdir with "
                                "--config.checkpoint.init_from=<this workdir>.")
    saved = _flat(as_plain(read_config(workdir)))
    new = _flat(as_plain(config))
    changed = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    allowed = lambda key: any(key == r or key.startswith(r + ".") for r in RESUMABLE)
    refused = [k for k in changed if not allowed(k)]
    if refused:
        lines = "\n".join(f"  {k}: saved {saved.get(k)!r}, now {new.get(k)!r}" for k in refused)
        raise ValueError(f"{workdir} was trained to step {step} with a different config, and these changes would "
                         f"alter the parameters, the optimizer state or the data order:\n{lines}\n"
                         f"Drop those overrides to resume, or start a new run from its parameters: "
                         f"--workdir=NEW --config.checkpoint.init_from={workdir}")
    if new["train.steps"] != saved["train.steps"]:
        print(f"note: train.steps {saved['train.steps']} -> {new['train.steps']}: the learning-rate schedule is "
              f"stretched to the new length from step {step} on", flush=True)
    return {k: [saved.get(k), new.get(k)] for k in changed}


def record_config(workdir: str, config: ml_collections.ConfigDict, resume_step: int | None,
                  changes: dict | None = None) -> None:
    """config.json of a new run; for a resumed run with allowed `changes` (from check_resume),
    the new config.json, the first one kept as config.original.json and the changes appended to
    config_history.jsonl."""
    if jax.process_index() != 0:
        return
    if resume_step is None:
        write_config(workdir, config)
        return
    if not changes:
        return
    if not os.path.exists(os.path.join(workdir, ORIGINAL_CONFIG_FILE)):
        shutil.copyfile(os.path.join(workdir, CONFIG_FILE), os.path.join(workdir, ORIGINAL_CONFIG_FILE))
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_at_step": resume_step,
                            "changes": changes}) + "\n")
    write_config(workdir, config)


def last_metrics(workdir: str) -> dict:
    """The last training metrics line of a run, plus its last eval loss."""
    path, last = os.path.join(workdir, "metrics.jsonl"), {}
    if os.path.exists(path):
        for line in open(path):
            row = json.loads(line)
            last.update({k: v for k, v in row.items() if k != "step"})
    return last


def _read_only(directory: str) -> ocp.CheckpointManager:
    """A manager that only reads (without Orbax's warnings that it is one)."""
    absl_logger = py_logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(py_logging.ERROR)
    try:
        return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True, save_interval_steps=0, create=False))
    finally:
        absl_logger.setLevel(level)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


def _free_bytes(directory: str) -> float:
    """Free space where `directory` is (infinite for paths that are not local, e.g. gs://)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return float("inf")


@contextlib.contextmanager
def _stderr_silenced():
    """Discard what is written to file descriptor 2 (also from C++ threads) for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _QuietOrbaxErrors(py_logging.Filter):
    """Orbax logs a failed background save from each of its threads with a traceback, and
    asyncio logs each of its writes' unretrieved exceptions (hundreds of lines); the error
    itself reaches the Checkpointer, which reports it once."""

    def filter(self, record):
        orbax = record.levelno >= py_logging.ERROR and "orbax" in record.pathname
        return not (orbax or "exception was never retrieved" in record.getMessage())

    def install(self):
        for name in ("absl", "asyncio"):
            py_logging.getLogger(name).addFilter(self)

    def remove(self):
        for name in ("absl", "asyncio"):
            py_logging.getLogger(name).removeFilter(self)


class Checkpointer:
    """Thin wrapper over an Orbax CheckpointManager with this project's items."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        self.every, self.directory, self.pending = every, checkpoint_dir(workdir), None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.quiet = _QuietOrbaxErrors()
        self.quiet.install()

    def _failed(self, error: BaseException) -> CheckpointError:
        """One clear message for a save that failed (in the background or not)."""
        step, nbytes = self.pending or (None, 0)
        committed = [s for s in self.manager.all_steps() if s != step]
        free = _free_bytes(self.directory)
        reason = str(error).split("\n")[0]
        if any(s in reason for s in ("RESOURCE_EXHAUSTED", "No space left", "too large", "not enough free space")):
            reason = f"the disk is full ({reason[:200]})"
        kept = (f"the previous checkpoint, step {max(committed)}, is intact; rerun to resume from it"
                if committed else "no earlier checkpoint exists")
        return CheckpointError(f"saving the checkpoint of step {step} to {self.directory} failed: {reason}. "
                               f"It needs up to {_size(nbytes)}; {_size(free)} are free there. "
                               f"{kept.capitalize()} after freeing space (or use a --workdir on a larger disk).")

    def _check(self, operation):
        try:
            return operation()
        except (ValueError, OSError, RuntimeError) as e:
            error = self._failed(e)
            # Let Orbax's background writers finish before the process exits. They fail the same
            # way and print it (tensorstore's callbacks write to the stderr file descriptor
            # directly); `error` says it once.
            with _stderr_silenced():
                try:
                    self.manager.close()
                except Exception:  # noqa: BLE001
                    pass
            raise error from None

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, params, opt_state, data_iterator, config) -> None:
        """Save `step` (a no-op when that step is already saved)."""
        if step in self.manager.all_steps():
            return
        items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                     meta=ocp.args.JsonSave({"step": int(step)}),
                     config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._check(self.manager.wait_until_finished)  # a failure of the previous (async) save surfaces here
        nbytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state))) // jax.process_count()
        self.pending = (step, nbytes)
        if _free_bytes(self.directory) < nbytes:  # uncompressed size: an upper bound; a local disk only
            raise self._failed(OSError("not enough free space"))
        self._check(lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=True))

    def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator):
        """Restore onto the shardings carried by the abstract trees (a new mesh reshards)."""
        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     opt_state=ocp.args.StandardRestore(abstract_opt_state),
                     meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["params"], restored["opt_state"], restored["meta"]["step"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        try:
            self._check(self.manager.wait_until_finished)
        finally:
            self.manager.close()
            self.quiet.remove()


def restore_params(path: str, abstract_params, step: int | None = None):
    """Params alone from a workdir or its checkpoints/ directory (for evaluation and for
    starting a new run from an old one)."""
    directory = path if os.path.basename(os.path.normpath(path)) == "checkpoints" else checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {path!r} (expected {directory}).")
    with _read_only(directory) as manager:
        step = manager.latest_step() if step is None or step < 0 else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no committed checkpoint.")
        if step not in manager.all_steps():
            raise FileNotFoundError(f"step {step} is not in {directory}; available: {sorted(manager.all_steps())}.")
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    return restored["params"], step


def abstract_params(model_cfg, shardings=None, **runtime):
    """(graphdef, ShapeDtypeStructs of the params as a pure dict) carrying `shardings` (a
    matching tree), or placed on the first device when none are given. `model_cfg`: a
    ModelConfig; `runtime`: the model's attention, remat_policy and scan_layers."""
    from ctxjax.model import abstract_model
    graphdef, state = nnx.split(abstract_model(model_cfg, **runtime))
    abstract = nnx.to_pure_dict(state)
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return graphdef, abstract


def load_model(workdir: str, step: int | None = None, *, attention: str = "auto"):
    """(model, config): the model with the params of `step` (latest by default) on this
    process's first device, attention by the `attention` backend; `model(tokens)` returns
    logits [B, T, vocab] in float32. Call it under `jax.jit` (eager calls are slow)."""
    from ctxjax import parallel
    from ctxjax.model import ModelConfig
    config = read_config(workdir)
    plan = parallel.single_device_plan(config, attention)
    graphdef, abstract = abstract_params(ModelConfig.from_config(config.model), attention=plan.attention)
    params, _ = restore_params(workdir, abstract, step)
    return nnx.merge(graphdef, params), config
