"""The device mesh and the one table mapping logical axis names to mesh axes.

Model code names logical axes only ('batch', 'seq', 'embed', 'heads', ...); this module alone
knows which mesh axis each one lands on, and it alone spells the mesh axes' names:
  data     pure data parallelism (replicated params)
  fsdp     data parallelism with params/optimizer state sharded (ZeRO-3)
  tensor   heads and MLP hidden units split across devices
  context  the sequence split across devices (ring / all-gather / Ulysses attention)
  ulysses  hybrid context parallelism: the sequence split further, all-to-all to heads inside
           each ring rank (USP)
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR, CONTEXT, ULYSSES = "data", "fsdp", "tensor", "context", "ulysses"
# Later axes vary fastest over the devices: the context axes and tensor get the nearest
# neighbours (the ring's hops, the all-to-alls).
MESH_AXES = (DATA, FSDP, TENSOR, CONTEXT, ULYSSES)
BATCH_AXES = (DATA, FSDP)
SEQUENCE_AXES = (CONTEXT, ULYSSES)  # context-major: device (c, u) holds piece c * U + u

# logical axis -> mesh axis (or axes); None = replicated. Activations and params share the table.
LOGICAL_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "seq": SEQUENCE_AXES,
    "act_embed": None,  # activations' model dim stays whole
    "embed": FSDP,  # params' model dim: FSDP shards it
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "head_dim": None,
    "mlp": TENSOR,
    "vocab": TENSOR,
    "layers": None,
    "norm": None,
}


def _resolve_sizes(sizes: dict[str, int], num_devices: int, what: str) -> dict[str, int]:
    sizes = dict(sizes)
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"{what}: only one axis may be -1 (the rest of the devices); got {unknown}.")
    for axis, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"{what}: axis {axis!r} has size {size!r}; use a positive int or -1.")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"{what}: the fixed axes {sizes} (product {known}) do not divide the "
                             f"{num_devices} devices; change the mesh sizes.")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"{what}: mesh {sizes} needs {math.prod(sizes.values())} devices but "
                         f"{num_devices} are available; make the product of the mesh axes equal "
                         f"{num_devices} (or set one axis to -1).")
    return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh from a config with ints `data, fsdp, tensor, context` (one may be -1) and, for
    multi-slice pods, `dcn_data, dcn_fsdp` (slices along data / fsdp over the data-centre network).
    `devices` defaults to jax.devices(); pass a TPU topology's devices to compile ahead of time."""
    devices = list(jax.devices() if devices is None else devices)
    dcn = {DATA: int(mesh_cfg.get("dcn_data", 1)), FSDP: int(mesh_cfg.get("dcn_fsdp", 1))}
    num_slices = dcn[DATA] * dcn[FSDP]
    ici = {a: mesh_cfg.get(a, 1) for a in MESH_AXES}
    if len(devices) % num_slices:
        raise ValueError(f"mesh: {len(devices)} devices do not split into dcn_data x dcn_fsdp = {num_slices} slices.")
    ici = _resolve_sizes(ici, len(devices) // num_slices, "mesh (per slice)")
    shape = [ici[a] * dcn.get(a, 1) for a in MESH_AXES]
    if num_slices > 1:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_hybrid_device_mesh(
            [ici[a] for a in MESH_AXES], [dcn.get(a, 1) for a in MESH_AXES], devices=devices)
    else:
        try:
            from jax.experimental import mesh_utils
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], rules: dict[str, Any] = LOGICAL_RULES) -> P:
    """PartitionSpec for a tuple of logical axis names (each mesh axis used at most once)."""
    used, spec = set(), []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; add it to ctxjax.mesh.LOGICAL_RULES.")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def active_mesh():
    """The (abstract) mesh set with `jax.set_mesh`, inside or outside jit; None when none is."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x, logical_axes: Sequence[str | None]):
    """Sharding constraint by logical names; a no-op when no mesh is active."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def _present(mesh, axes) -> tuple[str, ...]:
    """The axes (a name, a tuple or None) that the mesh has with more than one device."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def attention_axes(mesh) -> dict[str, Any]:
    """Mesh axes of an attention input [batch, seq, heads, head_dim], for shard_map wrappers:
    batch_axes, head_axis, context_axis and ulysses_axis (None where the mesh has no such split)."""
    spec = logical_to_spec(("batch", "seq", "heads"))
    heads = _present(mesh, spec[2])
    return dict(batch_axes=_present(mesh, spec[0]), head_axis=heads[0] if heads else None,
                context_axis=CONTEXT if mesh.shape.get(CONTEXT, 1) > 1 else None,
                ulysses_axis=ULYSSES if mesh.shape.get(ULYSSES, 1) > 1 else None)


def batch_ways(mesh) -> int:
    """Devices the batch is split over."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def sequence_ways(mesh) -> int:
    """Devices the sequence is split over (context parallelism)."""
    return math.prod(mesh.shape.get(a, 1) for a in SEQUENCE_AXES)


def zigzag_shards(mesh, context_strategy: str) -> int:
    """Shards the zigzag load balance is computed for: the ring (or all-gather) size; 1 when
    there is no ring (no context axis, or Ulysses alone: every device attends every position)."""
    ring = mesh.shape.get(CONTEXT, 1)
    return 1 if context_strategy == "ulysses" else ring


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes))


def tree_shardings(mesh: Mesh, logical_tree):
    """Map a pytree of logical-axis tuples (PartitionSpecs of names) to NamedShardings."""
    is_leaf = lambda x: isinstance(x, P) or (isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))
    return jax.tree.map(lambda axes: named_sharding(mesh, tuple(axes)), logical_tree, is_leaf=is_leaf)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, seq] input array: batch over data+fsdp, sequence over context."""
    return named_sharding(mesh, ("batch", "seq"))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy rows -> global jax.Arrays (each process contributes its own rows)."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(x)) for name, x in batch.items()}


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Activate a mesh for jit/constrain/attention (jax.set_mesh as a context manager)."""
    with jax.set_mesh(mesh):
        yield mesh


def check_divisible(shapes, logical_tree, mesh, what: str = "param") -> None:
    """Every dimension must split evenly over the mesh axes its logical name maps to."""
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(logical_tree, is_leaf=lambda x: isinstance(x, tuple)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        axes = flat_axes[path]
        for dim, (size, name) in enumerate(zip(leaf.shape, axes)):
            mesh_axes = logical_to_spec((name,))[0] if name else None
            mesh_axes = () if mesh_axes is None else ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes)
            ways = math.prod(mesh.shape[a] for a in mesh_axes)
            if size % ways:
                raise ValueError(f"{what} {jax.tree_util.keystr(path)} dim {dim} ({name!r}, size {size}) does not "
                                 f"split over mesh axes {mesh_axes} = {ways} devices; change that model size "
                                 f"(e.g. pad the vocabulary to a multiple of {ways}) or the mesh.")
