"""Orbax checkpoints of a run: params, optimizer state, step, data-iterator state and config.

Layout: WORKDIR/config.json (the run's config, written once) and WORKDIR/checkpoints/<step>/
with items 'params', 'opt_state', 'meta' (JSON: step), 'data' (Grain iterator state) and
'config'. Saves are asynchronous and atomic (Orbax writes to a temporary directory and
renames it on commit), so a preempted save never leaves a half checkpoint behind.
"""
from __future__ import annotations

import json
import os
import tempfile

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

CONFIG_FILE = "config.json"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Write WORKDIR/config.json atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".config.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a ctxjax workdir (python -m ctxjax.train "
                                f"--workdir=...)?")
    with open(path) as f:
        saved = _tuples_from_json(json.load(f))
    # Start from today's defaults so a run written before a knob existed still loads.
    from configs import base
    config = base.get_config()
    _merge(config, saved)
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
            _merge(config[key], value)
        else:
            with config.unlocked():
                config[key] = value


def _tuples_from_json(x):
    """JSON has no tuples; configs use them for sequences (e.g. layer_pattern)."""
    if isinstance(x, dict):
        return {k: _tuples_from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples_from_json(v) for v in x)
    return x


class Checkpointer:
    """Thin wrapper over an Orbax CheckpointManager with this project's items."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator):
        """Restore onto the shardings carried by the abstract trees (a new mesh reshards)."""
        step_dir = os.path.join(str(self.manager.directory), str(step))
        if not os.path.isdir(os.path.join(step_dir, "opt_state")):
            raise FileNotFoundError(f"{step_dir} holds params only (a model imported by tools/convert_from_hf.py): "
                                    "train in a new --workdir with --config.checkpoint.init_from=<this workdir>.")
        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     opt_state=ocp.args.StandardRestore(abstract_opt_state),
                     meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["params"], restored["opt_state"], restored["meta"]["step"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(path: str, abstract_params, step: int | None = None):
    """Params alone from a workdir or its checkpoints/ directory (for evaluation and for
    starting a new run from an old one)."""
    directory = path if os.path.basename(os.path.normpath(path)) == "checkpoints" else checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {path!r} (expected {directory}).")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None or step < 0 else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no committed checkpoint.")
        if step not in manager.all_steps():
            raise FileNotFoundError(f"step {step} is not in {directory}; available: {sorted(manager.all_steps())}.")
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    return restored["params"], step


def abstract_params(model_cfg, shardings=None):
    """(graphdef, ShapeDtypeStructs of the params as a pure dict) carrying `shardings` (a
    matching tree), or placed on the first device when none are given."""
    from ctxjax.model import Llama
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(model_cfg, nnx.Rngs(0))))
    abstract = nnx.to_pure_dict(state)
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return graphdef, abstract


def load_model(workdir: str, step: int | None = None):
    """(model, config): the model with the params of `step` (latest by default); `model(tokens)`
    returns logits [B, T, vocab] in float32."""
    config = read_config(workdir)
    graphdef, abstract = abstract_params(config.model)
    params, _ = restore_params(workdir, abstract, step)
    return nnx.merge(graphdef, params), config
