"""Parallelism and backends, applied from outside the model (as torchtitan's parallelize_llama).

From the config and the mesh, once at start-up, `make_plan` decides:
  - which attention backend runs (ctxjax/attention/backends.py: 'auto' from the mesh's devices,
    or the configured one after checking it can apply this model's masks on these devices:
    a combination it cannot run is refused, never silently swapped);
  - how attention is split over the devices: the context-parallel strategy when the sequence is
    sharded (ring, all-gather, Ulysses, hybrid), else `shard_map` over batch and heads for Mosaic
    kernels, which XLA cannot partition by itself;
  - the rematerialisation policy of each layer.
The model receives the resulting attention function and remat policy and knows none of this.
Also here: the input reordering for context parallelism (zigzag), done once per batch on the host.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from ctxjax import mesh as mesh_lib
from ctxjax.attention import backends as backends_lib
from ctxjax.attention.context_parallel import context_parallel_attention, zigzag
from ctxjax.model.config import ModelConfig
from pallas_kernels.mask import MaskSpec



@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs where, decided once: read by the trainer, logged at start-up."""
    backend: backends_lib.Backend
    platform: str
    context_strategy: str | None  # None: the sequence is not split
    zigzag_shards: int  # the input is reordered for this many ring shards (1: natural order)
    remat: str
    scan_layers: bool  # parallel.layer_loop resolved for this platform
    deterministic: bool
    attention: Callable  # (q, k, v, mask: MaskSpec) -> out: what every layer calls

    def model_options(self) -> dict:
        """What the model is built with: its attention function, remat policy and layer loop."""
        return dict(attention=self.attention, remat_policy=self.remat_policy(), scan_layers=self.scan_layers)

    def remat_policy(self):
        """The jax.checkpoint policy of one layer, or None for no rematerialisation."""
        policies = jax.checkpoint_policies
        if self.remat == "none":
            return None
        if self.remat == "full":
            return policies.nothing_saveable
        attention = policies.save_only_these_names(*backends_lib.RESIDUAL_NAMES)
        if self.remat == "save_attention":
            return attention
        if self.remat == "offload" and self.platform != "cpu":
            return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
        # save_matmuls (and offload on CPU, where host memory is device memory): the attention
        # kernel is opaque to the dot policy, so its residuals are named
        return policies.save_from_both_policies(policies.checkpoint_dots_with_no_batch_dims, attention)

    def describe(self, model: ModelConfig, *, skyladder: bool, window_mask: str, seq_len: int) -> list[str]:
        """One line per distinct layer kind: its mask terms and the kernel path it takes."""
        interpreted = " in TPU interpret mode" if self.backend.mosaic and self.platform == "cpu" else ""
        lines = [f"attention: {self.backend.name} ({self.backend.summary}) on {self.platform}{interpreted}"
                 + (f", context parallelism: {self.context_strategy}" if self.context_strategy else "")
                 + f"; remat: {self.remat}; layers: {'scan' if self.scan_layers else 'unrolled'}"]
        window = "W" if skyladder else None
        kinds = {}
        for layer, local in enumerate(model.layer_windows()):
            kinds.setdefault(local, []).append(layer)
        for local, layers in kinds.items():
            terms = ["causal"] + (["documents"] if model.document_mask else [])
            if local is not None:
                terms.append(f"window {local}")
            elif window:
                terms.append(f"{'chunk' if window_mask == 'chunk' else 'window'} = SkyLadder window")
            if model.sinks:
                terms.append(f"{model.sinks} sinks")
            path = ""
            if self.backend.name == "pallas_gpu":
                from pallas_kernels import gpu
                has_lo = local is not None or bool(window)
                path = " -> " + gpu.kernel_path(causal=True, has_lo=has_lo, has_seg=model.document_mask,
                                                 kv_len=seq_len, deterministic=self.deterministic)
            lines.append(f"  layers {_ranges(layers)}: {' + '.join(terms)}{path}")
        return lines


def _ranges(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def model_terms(config, mesh) -> frozenset:
    """The mask terms this run's attention must apply, from the config (see backends.TERMS)."""
    model, sky = ModelConfig.from_config(config.model), config.skyladder
    windowed = sky.enabled or sky.constant_window is not None
    terms = set()
    if model.document_mask:
        terms.add("documents")
    if any(w is not None for w in model.layer_windows()) or (windowed and sky.mask == "sliding"):
        terms.add("window")
    if windowed:
        terms.update({"traced", "chunk" if sky.mask == "chunk" else "window"})
    if model.sinks:
        terms.add("sinks")
    if mesh_lib.sequence_ways(mesh) > 1:
        terms.add("positions")
    return frozenset(terms)


def make_plan(config, mesh, *, window_aware_ring: bool = True) -> Plan:
    """The plan for this config on this mesh (its devices may be a TPU topology's, compiled
    ahead of time from a CPU host: the platform is read from the mesh, not the host).
    `window_aware_ring=False` makes the ring run the full circle for bounded masks too: a
    benchmark's baseline (tools/bench_context_parallel.py), not a run option."""
    device = mesh.devices.flat[0]
    model, p = ModelConfig.from_config(config.model), config.parallel
    context = mesh_lib.sequence_ways(mesh) > 1
    backend = backends_lib.resolve(p.attention, device=device, dtype=model.dtype, head_dim=model.head_dim,
                                   terms=model_terms(config, mesh), halves=context)
    strategy = p.context_strategy if context else None
    axes = mesh_lib.attention_axes(mesh)
    if strategy == "hybrid" and axes["ulysses_axis"] is None:
        raise ValueError("parallel.context_strategy='hybrid' needs mesh.ulysses > 1 (the all-to-all axis) "
                         "besides mesh.context (the ring); or choose 'ring' or 'ulysses'.")
    functions = backend.build(device.platform, p.deterministic)
    attention = make_attention(functions, backend, mesh, strategy, axes, window_aware_ring=window_aware_ring)
    return Plan(backend=backend, platform=device.platform, context_strategy=strategy,
                zigzag_shards=mesh_lib.zigzag_shards(mesh, p.context_strategy) if context else 1,
                remat=p.remat, deterministic=p.deterministic, attention=attention,
                scan_layers=scan_layers(p.layer_loop, device.platform, p.remat))


def scan_layers(layer_loop: str, platform: str, remat: str) -> bool:
    """parallel.layer_loop resolved: 'auto' unrolls on GPUs when the remat policy keeps
    activations, which a scan would copy through stacked buffers (and around which XLA reruns
    the attention kernel); full remat keeps only each layer's input and ran as fast scanned."""
    if layer_loop == "auto":
        return not (platform == "gpu" and remat != "full")
    return layer_loop == "scan"


# ------------------------------------------------------------------------------------------
# The attention function the model calls
# ------------------------------------------------------------------------------------------

def _split_mask(mask: MaskSpec):
    """(arrays, rebuild): the mask's array fields, and a function putting them back beside the
    static ones (Python ints stay static, so kernels specialise on them)."""
    fields = ("q_segment_ids", "kv_segment_ids", "q_token_index", "kv_token_index", "window", "chunk", "sinks")
    is_array = lambda x: not (x is None or isinstance(x, int))
    arrays = {f: getattr(mask, f) for f in fields if is_array(getattr(mask, f))}
    return arrays, lambda new: mask.replace(**new)


def _with_saved_residuals(forward, backward):
    """attention(q, k, v, arrays) with a custom VJP whose residuals out and lse carry names, so
    the 'save_attention' remat policy keeps them and the backward never reruns the forward."""
    @jax.custom_vjp
    def attend(q, k, v, arrays):
        return forward(q, k, v, arrays)[0]

    def attend_fwd(q, k, v, arrays):
        out, lse = forward(q, k, v, arrays)
        out, lse = checkpoint_name(out, backends_lib.RESIDUAL_NAMES[0]), checkpoint_name(lse, backends_lib.RESIDUAL_NAMES[1])
        return out, (q, k, v, arrays, out, lse)

    def attend_bwd(residuals, dout):
        q, k, v, arrays, out, lse = residuals
        dq, dk, dv = backward(q, k, v, arrays, out, lse, dout)
        no_grad = jax.tree.map(lambda x: np.zeros(np.shape(x), jax.dtypes.float0), arrays)
        return dq, dk, dv, no_grad

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def make_attention(functions: backends_lib.Functions, backend: backends_lib.Backend, mesh, strategy,
                   axes, *, window_aware_ring: bool = True) -> Callable:
    """(q, k, v, mask) -> out for the model: the backend, split over the mesh as decided
    (`window_aware_ring`: see make_plan)."""
    if strategy is not None:
        def attention(q, k, v, mask: MaskSpec):
            b, t, s = q.shape[0], q.shape[1], k.shape[1]
            return context_parallel_attention(q, k, v, mask.resolved(b, t, s), mesh=mesh, strategy=strategy,
                                              local_fwd=functions.forward, local_bwd=functions.backward,
                                              window_aware=window_aware_ring, **axes)
        return attention

    batch = axes["batch_axes"] or None
    seq_spec = P(batch, None, axes["head_axis"], None)
    lse_spec = P(batch, axes["head_axis"], None)
    spec_of = lambda x: P(batch, None) if x.ndim == 2 else P()
    natural_order = "positions" not in backend.terms  # without a context axis, rows are 0..L-1

    def local(fn, out_specs, extra_specs=()):
        """fn over the device-local shards when XLA cannot partition the kernel itself."""
        if not backend.mosaic or mesh.size == 1:
            return fn
        def sharded(q, k, v, arrays, *rest):
            specs = (seq_spec,) * 3 + (jax.tree.map(spec_of, arrays),) + tuple(extra_specs)
            return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(
                q, k, v, arrays, *rest)
        return sharded

    def attention(q, k, v, mask: MaskSpec):
        if natural_order:
            mask = mask.replace(q_token_index=None, kv_token_index=None)
        arrays, rebuild = _split_mask(mask)
        if functions.forward is None or functions.backward is None:
            call = lambda q, k, v, a: functions.attention(q, k, v, rebuild(a))
            return local(call, seq_spec)(q, k, v, arrays)
        forward = local(lambda q, k, v, a: functions.forward(q, k, v, rebuild(a)), (seq_spec, lse_spec))
        backward = local(lambda q, k, v, a, out, lse, dout: functions.backward(q, k, v, rebuild(a), out, lse, dout),
                         (seq_spec,) * 3, extra_specs=(seq_spec, lse_spec, seq_spec))
        return _with_saved_residuals(forward, backward)(q, k, v, arrays)

    return attention


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------

def shard_inputs(batch: dict[str, np.ndarray], mesh, plan: Plan, *, whole: bool = False) -> dict[str, jax.Array]:
    """Rows -> global arrays on the mesh: with a context axis, every field is first reordered
    into zigzag order (rank r holds chunks r and 2R-1-r), so causal work is balanced over the
    ring; the mask reads the reordered token_index, so attention needs no special case. The rows
    are this process's share of the batch, or with `whole` the whole batch on every process."""
    if plan.zigzag_shards > 1:
        batch = {k: zigzag(np.asarray(v), 1, plan.zigzag_shards) for k, v in batch.items()}
    if not whole:
        return mesh_lib.shard_batch(batch, mesh)
    sharding = mesh_lib.batch_sharding(mesh)
    return {k: jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]) for k, x in batch.items()}


def single_device_plan(config, attention: str = "auto") -> Plan:
    """A plan for one device and no remat (evaluation, sampling, notebooks), with the given
    attention backend instead of the run's."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.parallel.attention, config.parallel.remat = attention, "none"
    config.skyladder.enabled, config.skyladder.constant_window = False, None  # no window at inference
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(mesh_lib.MESH_AXES)),
                             mesh_lib.MESH_AXES)
    return make_plan(config, mesh)
