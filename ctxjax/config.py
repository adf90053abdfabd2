"""Loading and validating run configs.

Configs are Python files whose `get_config()` returns an ml_collections.ConfigDict deriving
from configs/base.py. On the command line, `--config=configs/x.py --config.a.b=v` overrides
values; ml_collections rejects a key that does not exist or a value of the wrong type, naming
the key. `validate_config` then checks the values against each other.
"""
from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import ml_collections

from ctxjax.attention import IMPLEMENTATIONS


def load_config(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """get_config() of a config file, with dotted-key overrides ({"model.d_model": 512})."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found; pass e.g. configs/tiny_cpu.py.")
    spec = importlib.util.spec_from_file_location(f"_ctxjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in (overrides or {}).items():
        set_by_path(config, key, value)
    return config


def set_by_path(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Set config.a.b = value, rejecting unknown keys and wrong types with the key named."""
    *parents, leaf = dotted.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise KeyError(f"config has no key {'.'.join(parents[:i + 1])!r} (while setting {dotted!r}).")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"config has no key {dotted!r}; see configs/base.py for the available keys.")
    try:
        node[leaf] = value
    except TypeError as e:
        raise TypeError(f"config key {dotted!r}: {e}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check values against each other; returns the config unchanged. Errors name the fix."""
    from ctxjax.model import rope as rope_lib
    from ctxjax.model.llama import head_dim_of, layer_windows

    m, t = config.model, config.train
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}.")
    _require(head_dim_of(m) % 2 == 0, f"the head dim ({head_dim_of(m)}) must be even for RoPE; set model.head_dim.")
    _require(m.head_dim or m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim.")
    _require(m.attention_impl in IMPLEMENTATIONS,
             f"model.attention_impl={m.attention_impl!r}; choose one of {IMPLEMENTATIONS}.")
    _require(isinstance(m.attention_deterministic, bool),
             f"model.attention_deterministic={m.attention_deterministic!r} must be True or False.")
    _require(m.context_strategy in ("ring", "all_gather"),
             f"model.context_strategy={m.context_strategy!r}; choose 'ring' or 'all_gather'.")
    _require(m.remat in ("none", "full", "save_matmuls", "offload"),
             f"model.remat={m.remat!r}; choose 'none', 'full', 'save_matmuls' or 'offload'.")
    for name in ("dtype", "param_dtype"):
        try:
            jnp.dtype(m[name])
        except TypeError:
            raise ValueError(f"invalid config: model.{name}={m[name]!r} is not a dtype (e.g. 'bfloat16').") from None
    _require(m.sinks >= 0, f"model.sinks={m.sinks} must be >= 0.")
    layer_windows(m)  # raises on a bad layer_pattern entry
    rope_lib.validate_rope(m.rope.to_dict(), head_dim_of(m), m.max_position_embeddings)

    _require(t.steps > 0, f"train.steps={t.steps} must be positive.")
    _require(t.seq_len > 1, f"train.seq_len={t.seq_len} must be at least 2.")
    _require(t.log_every > 0, f"train.log_every={t.log_every} must be positive.")
    accum = config.optim.grad_accum_steps
    _require(accum >= 1 and t.global_batch_size % accum == 0,
             f"train.global_batch_size={t.global_batch_size} must be divisible by optim.grad_accum_steps={accum}.")
    _require(config.skyladder.mask in ("chunk", "sliding"),
             f"skyladder.mask={config.skyladder.mask!r}; choose 'chunk' or 'sliding'.")
    _require(config.checkpoint.keep >= 1, f"checkpoint.keep={config.checkpoint.keep} must be >= 1.")
    return config


def check_mesh_fits(config, mesh) -> None:
    """The batch and sequence of every curriculum stage must split evenly over the mesh."""
    from ctxjax.data import curriculum_stages
    batch_ways, context = mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["context"]
    accum = config.optim.grad_accum_steps
    for stage in curriculum_stages(config.data, seq_len=config.train.seq_len,
                                   global_batch_size=config.train.global_batch_size):
        where = f"at step {stage.start_step} (data.curriculum)" if config.data.curriculum else ""
        _require(stage.batch_size % accum == 0 and (stage.batch_size // accum) % batch_ways == 0,
                 f"the micro-batch of {stage.batch_size} / {accum} rows (global batch / optim.grad_accum_steps) "
                 f"{where} does not split over data x fsdp = {batch_ways} devices; make it a multiple of {batch_ways}.")
        _require(context == 1 or stage.seq_len % (2 * context) == 0,
                 f"sequence length {stage.seq_len} {where} must be a multiple of 2 x context = {2 * context} "
                 f"(zigzag load balancing cuts each row into 2 x context chunks).")
    eval_len = config.eval.seq_len or config.train.seq_len
    _require(context == 1 or eval_len % (2 * context) == 0,
             f"eval sequence length {eval_len} must be a multiple of 2 x context = {2 * context}.")
    _require(config.eval.batch_size % batch_ways == 0,
             f"eval.batch_size={config.eval.batch_size} does not split over data x fsdp = {batch_ways} devices; "
             f"make it a multiple of {batch_ways}.")
    _require(config.model.n_kv_heads % mesh.shape["tensor"] == 0,
             f"model.n_kv_heads={config.model.n_kv_heads} does not split over tensor={mesh.shape['tensor']} devices.")
