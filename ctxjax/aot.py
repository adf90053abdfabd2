"""Pre-flight: compile the real train step for a TPU topology on any host, before renting the pod.

    python -m ctxjax.aot --config=configs/llama3_8b_128k_tpu_v5p.py --topology=v5p:4x4x8 \
        [--config.a.b=v ...] [--hlo_dir=DIR]

libtpu's compiler (`pip install -e ".[tpu]"`) compiles for the topology's chips from a CPU host;
nothing runs and no chip is needed. Reads top to bottom: the config, checked as training checks
it -> the topology's devices (several slices from mesh.dcn_data x mesh.dcn_fsdp) -> the mesh
and the plan (attention backend, context parallelism, remat) -> the abstract training state (no
memory, no compute) -> every program the run compiles: the train step for each curriculum
stage's batch shape, with the SkyLadder window as a runtime argument and without it once the
window covers the row, and the eval step -> for each, compile time, per-chip peak memory
against the chip's HBM, bytes accessed and the collectives in the compiled program -> the
step's FLOPs and an estimated step time. It touches no data, tokenizer, checkpoint or
jax.distributed. Exit status 0 when every program compiles and fits, 1 when one does not,
2 for a config or topology that is wrong.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # before JAX starts: compile for the topology, never probe this host for a TPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling touches no chip

import dataclasses
import importlib.metadata
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ctxjax import mesh as mesh_lib
from ctxjax import metrics as metrics_lib
from ctxjax import parallel, train
from ctxjax.config import check_mesh_fits, translate_legacy, validate_config
from ctxjax.data import curriculum_stages
from ctxjax.model import ModelConfig
from ctxjax.schedules import make_window_schedule

# HBM per chip (bytes) and its bandwidth (bytes/s), by jax's device_kind (datasheets; the
# capacities are those of jax.experimental.pallas.tpu.get_tpu_info_for_chip).
TPU_HBM = {
    "TPU v4": (32 * 2**30, 1.2e12),
    "TPU v5 lite": (16 * 2**30, 0.82e12),  # v5e
    "TPU v5": (95 * 2**30, 2.76e12),  # v5p
    "TPU v6 lite": (32 * 2**30, 1.64e12),  # v6e (Trillium)
}
ASSUMED_MFU = (0.4, 0.6)  # the step-time estimate's assumed model FLOPs utilisations
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


class DoesNotFit(Exception):
    """A program needs more memory than a chip has: the message is the one line to print."""


# --------------------------------------------------------------------------------------------
# The devices
# --------------------------------------------------------------------------------------------
def topology_devices(name: str, num_slices: int = 1) -> list:
    """The devices of TPU topology `name` (e.g. 'v5p:4x4x8'), `num_slices` times over DCN."""
    from jax.experimental import topologies
    kwargs = {} if num_slices == 1 else {"num_slices": num_slices}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except TypeError as e:
        raise ValueError(f"this JAX ({jax.__version__}) cannot describe {num_slices} slices of {name} "
                         f"(get_topology_desc has no num_slices: {e}); pre-flight one slice with "
                         "--config.mesh.dcn_data=1 --config.mesh.dcn_fsdp=1.") from None
    except Exception as e:  # libtpu missing, or a topology it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if _libtpu_version() else " libtpu is not installed: pip install -e \".[tpu]\"."
        raise ValueError(f"cannot get TPU topology {name!r}: {first}.{hint}") from None


def _libtpu_version() -> str | None:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def chip_hbm(device) -> tuple[int, float]:
    """(HBM bytes, HBM bytes/s) of one chip."""
    if device.device_kind not in TPU_HBM:
        raise ValueError(f"no HBM size known for device kind {device.device_kind!r}; add it to "
                         "ctxjax.aot.TPU_HBM.")
    return TPU_HBM[device.device_kind]


# --------------------------------------------------------------------------------------------
# The programs a run compiles
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Program:
    name: str
    lower: Callable[[], "jax.stages.Lowered"]
    rows: int
    seq_len: int
    windows: tuple = ()  # the SkyLadder windows it runs with, smallest and largest (train steps)
    train: bool = True


def train_programs(config, jitted, params, opt_state, mesh) -> list[Program]:
    """The train step for every curriculum stage's shape: with the window as an int32 runtime
    argument while the SkyLadder window is shorter than the row, without it once it covers the
    row (as train.CompiledStep compiles them)."""
    t = config.train
    window_at = make_window_schedule(config.skyladder, seq_len=t.seq_len, total_steps=t.steps)
    stages = curriculum_stages(config.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    programs = []
    for i, stage in enumerate(stages):
        end = min(stages[i + 1].start_step if i + 1 < len(stages) else t.steps, t.steps)
        windows = {s: window_at(s, stage.seq_len) for s in range(stage.start_step, end)}
        batch = train.batch_shapes(config, stage.seq_len, stage.batch_size, mesh)
        what = f"train step, {stage.batch_size} rows x {stage.seq_len} tokens"
        windowed = {s: w for s, w in windows.items() if w is not None}
        full = [s for s, w in windows.items() if w is None]
        if windowed:
            smallest, largest = min(windowed.values()), max(windowed.values())
            programs.append(Program(
                f"{what}, SkyLadder window as an argument (steps {min(windowed)}-{max(windowed)}: "
                f"window {smallest}..{largest})", lambda b=batch: jitted.lower(params, opt_state, b, step, step),
                stage.batch_size, stage.seq_len, (smallest, largest)))
        if full:
            programs.append(Program(f"{what}, no window term (steps {min(full)}-{max(full)})",
                                    lambda b=batch: jitted.lower(params, opt_state, b, step, None),
                                    stage.batch_size, stage.seq_len, (None,)))
    return programs


def eval_program(config, graphdef, params, mesh) -> Program:
    seq_len, rows = config.eval.seq_len or config.train.seq_len, config.eval.batch_size
    batch = train.batch_shapes(config, seq_len, rows, mesh)
    eval_step = jax.jit(train.make_eval_step(graphdef, config))
    return Program(f"eval step, {rows} rows x {seq_len} tokens", lambda: eval_step.lower(params, batch),
                   rows, seq_len, train=False)


# --------------------------------------------------------------------------------------------
# What a compiled program says, and what its step costs
# --------------------------------------------------------------------------------------------
def peak_bytes(compiled) -> int:
    """Per-chip peak memory of a compiled program: arguments + outputs + temporaries - donated."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def bytes_accessed(compiled) -> float:
    """cost_analysis()'s bytes accessed, per chip; a loop body (the layer scan) counts once."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("bytes accessed", 0.0))


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops in compiled HLO text (async ones counted at their start; a loop body once).
    XLA:TPU writes a reduce-scatter as a fusion calling an %all-reduce-scatter computation (an
    all-reduce and a dynamic-slice): counted as one reduce-scatter, its inner all-reduce not."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for computation in re.split(r"\n(?=\S)", hlo_text):  # computations start in column 0
        scatter_body = computation.startswith("%all-reduce-scatter")
        for op in COLLECTIVES:
            if not (scatter_body and op == "all-reduce"):
                counts[op] += len(re.findall(rf"\s{op}(?:-start)?\(", computation))
        counts["reduce-scatter"] += len(re.findall(r"calls=%all-reduce-scatter\b", computation))
    return counts


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "exceeds the memory" in str(error).lower()


def one_row_per_document(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """A synthetic batch with one document filling each row (the count of a full packed row)."""
    index = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))
    return dict(tokens=np.zeros((rows, seq_len), np.int32), token_index=index,
                segment_ids=np.ones((rows, seq_len), np.int32))


def fit_advice(config, mesh) -> str:
    """What to try when a step does not fit, skipping what the config already does."""
    tips = []
    if mesh.shape[mesh_lib.FSDP] < mesh.size:
        tips.append("more fsdp (mesh.fsdp)")
    if config.parallel.remat != "full":
        tips.append("parallel.remat='full'")
    tips.append("a smaller train.global_batch_size or more optim.grad_accum_steps")
    tips.append("context parallelism (more mesh.context)" if mesh_lib.sequence_ways(mesh) > 1
                else "context parallelism (mesh.context=2 or more)")
    return ", ".join(tips)


def step_estimate(program: Program, target: Target, nbytes: float) -> dict:
    """FLOPs of one step (at the program's smallest and largest window) and the estimated time
    of the largest: max(FLOPs / (chips x peak x MFU), bytes / HBM bandwidth)."""
    model, chips = target.model, target.mesh.size
    batch = one_row_per_document(program.rows, program.seq_len)
    flops = [metrics_lib.step_flops(batch, w, model, target.config.skyladder.mask) for w in program.windows]
    if len(flops) == 2 and program.windows[0] != program.windows[1]:
        text = (f"{_flops(flops[0])} at window {program.windows[0]} .. {_flops(flops[1])} at window "
                f"{program.windows[1]}")
    else:
        text = _flops(flops[-1]) + ("" if program.windows[-1] is None else f" at window {program.windows[-1]}")
    memory_time = nbytes / target.bandwidth
    times = [max(flops[-1] / (chips * target.peak * mfu), memory_time) for mfu in ASSUMED_MFU]
    time_text = ", ".join(f"{_seconds(s)} at MFU {mfu}" for s, mfu in zip(times, ASSUMED_MFU))
    return dict(flops=flops[-1], flops_text=text, maxtext_flops=metrics_lib.maxtext_flops(model, program.seq_len,
                                                                                          program.rows),
                step_s=dict(zip(ASSUMED_MFU, times)), time_text=time_text + f" (bytes term {_seconds(memory_time)})")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _flops(n: float) -> str:
    return f"{n / 1e15:.3g} PFLOP" if n >= 1e14 else f"{n / 1e12:.3g} TFLOP"


def _seconds(s: float) -> str:
    return f"{s:.3g} s" if s >= 0.1 else f"{s * 1e3:.3g} ms"


# --------------------------------------------------------------------------------------------
# The pre-flight
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    """A checked config on a topology's mesh, with its plan: everything a compile needs."""
    config: ml_collections.ConfigDict
    topology: str  # as given, with ' x N slices' when several
    mesh: jax.sharding.Mesh
    plan: parallel.Plan
    model: ModelConfig
    hbm: int  # bytes per chip
    bandwidth: float  # HBM bytes/s per chip
    peak: float  # bf16 FLOP/s per chip

    @property
    def device(self):
        return self.mesh.devices.flat[0]


def prepare(config: ml_collections.ConfigDict, topology: str) -> Target:
    """The config checked as training checks it, on a mesh of the topology's devices; raises
    ValueError or KeyError (one line) for a config or topology that is wrong."""
    config = validate_config(translate_legacy(config))
    slices = int(config.mesh.dcn_data) * int(config.mesh.dcn_fsdp)
    devices = topology_devices(topology, slices)
    topology += f" x {slices} slices" if slices > 1 else ""
    try:
        mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    except ValueError as e:
        raise ValueError(f"{e} ({topology} has {len(devices)} chips)") from None
    check_mesh_fits(config, mesh)
    hbm, bandwidth = chip_hbm(devices[0])
    return Target(config, topology, mesh, parallel.make_plan(config, mesh), ModelConfig.from_config(config.model),
                  hbm, bandwidth, metrics_lib.peak_flops_per_device(devices[0]))


def programs_of(target: Target) -> list[Program]:
    """Every program the run compiles, built from the abstract training state."""
    config, mesh = target.config, target.mesh
    tx, lr_schedule = train.make_optimizer(config.optim, config.train.steps)
    # outside the mesh: optax creates the optimizer state's step counter eagerly, on this host
    graphdef, params, opt_state = train.abstract_state(target.model, target.plan, tx, mesh)
    jitted = train.jit_train_step(graphdef, tx, lr_schedule, config, mesh, params, opt_state)
    return train_programs(config, jitted, params, opt_state, mesh) + [eval_program(config, graphdef, params, mesh)]


def preflight(target: Target, *, hlo_dir: str = "", out=print) -> list[dict]:
    """Compile every program for the target, printing what each needs; returns one dict per
    program. Raises DoesNotFit when a program needs more memory than a chip has."""
    config, mesh, model, device, hbm = target.config, target.mesh, target.model, target.device, target.hbm
    sky = config.skyladder
    out(f"pre-flight on {target.topology}: {mesh.size} x {device.device_kind}, {_gib(hbm)} HBM, "
        f"{target.peak / 1e12:.0f} TFLOP/s bf16, {target.bandwidth / 1e12:.2f} TB/s per chip; "
        f"JAX {jax.__version__}, libtpu {_libtpu_version()}")
    out("mesh: " + " ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1))
    params = model.param_count()
    out(f"model: {f'{params / 1e9:.2f}B' if params >= 1e9 else f'{params / 1e6:.1f}M'} parameters, "
        f"{model.n_layers} layers, d_model {model.d_model}, "
        f"layer pattern {'/'.join(model.layer_pattern)}")
    for line in target.plan.describe(model, skyladder=bool(sky.enabled or sky.constant_window is not None),
                                     window_mask=sky.mask, seq_len=config.train.seq_len):
        out(line)

    results = []
    programs = programs_of(target)
    with mesh_lib.use_mesh(mesh):
        for i, program in enumerate(programs, start=1):
            out(f"[{i}/{len(programs)}] {program.name}")
            start = time.perf_counter()
            try:
                compiled = program.lower().compile()
            except Exception as e:
                if is_out_of_memory(e):
                    raise DoesNotFit(f"does not fit: {program.name} needs more than the {_gib(hbm)} of a "
                                     f"{device.device_kind} (XLA: {str(e).strip().splitlines()[0][:300]}); "
                                     f"try {fit_advice(config, mesh)}.") from None
                raise
            result = dict(name=program.name, compile_s=time.perf_counter() - start, peak_bytes=peak_bytes(compiled),
                          hbm_bytes=hbm, bytes=bytes_accessed(compiled),
                          collectives=count_collectives(compiled.as_text()))
            out(f"    compiled in {result['compile_s']:.1f} s")
            out(f"    memory: {metrics_lib.describe_memory(compiled.memory_analysis())}; "
                f"{100 * result['peak_bytes'] / hbm:.0f}% of {_gib(hbm)} HBM")
            out("    collectives: " + ", ".join(f"{op} {n}" for op, n in result["collectives"].items())
                + " (ops in the compiled program; a loop body counts once)")
            out(f"    bytes accessed: {result['bytes'] / 1e9:.3g} GB per chip (cost_analysis; a loop body "
                "counts once)")
            if program.train:
                result.update(step_estimate(program, target, result["bytes"]))
                out(f"    FLOPs per step: {result['flops_text']} (ctxjax count: weight matmuls + each layer's "
                    f"allowed pairs, one document per row); MaxText count {_flops(result['maxtext_flops'])}")
                out(f"    estimated step time: {result['time_text']}")
            if hlo_dir:
                os.makedirs(hlo_dir, exist_ok=True)
                path = os.path.join(hlo_dir, f"{i}_{'train' if program.train else 'eval'}.hlo.txt")
                with open(path, "w") as f:
                    f.write(compiled.as_text())
                out(f"    HLO: {path}")
            if result["peak_bytes"] > hbm:
                raise DoesNotFit(f"does not fit: {_gib(result['peak_bytes'] - hbm)} over the {_gib(hbm)} of a "
                                 f"{device.device_kind} ({program.name}: {_gib(result['peak_bytes'])} per chip); "
                                 f"try {fit_advice(config, mesh)}.")
            results.append(result)

    out(f"step time = max(FLOPs / (chips x peak bf16 FLOP/s x MFU), bytes accessed / HBM bandwidth) at an "
        f"assumed MFU of {' and '.join(map(str, ASSUMED_MFU))}: an estimate, not a measurement (the bytes term "
        "counts each loop body once)")
    out(f"pre-flight passed: {len(results)} programs compiled; the largest needs "
        f"{_gib(max(r['peak_bytes'] for r in results))} of the {_gib(hbm)} per chip")
    return results


# --------------------------------------------------------------------------------------------
def _parse_flags(argv):
    """absl's flag parsing, with a bad --config override said in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit(2, f"error: {e}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _exit(2, "error: bad --config value: " + str(e).strip("'\"").replace("\\n", " ").replace("\n", " "))


def _exit(code: int, line: str):
    print(line, flush=True)
    sys.exit(code)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)
    config, topology = flags.FLAGS.config, flags.FLAGS.topology
    if config is None or not topology:
        raise app.UsageError("both --config=configs/<experiment>.py and --topology=<e.g. v5p:4x4x8> are required.")
    try:
        target = prepare(config, topology)
    except (ValueError, KeyError) as e:  # the config's own checks, the topology, the mesh
        _exit(2, f"error: {str(e).strip(chr(39))}")
    try:
        preflight(target, hlo_dir=flags.FLAGS.hlo_dir, out=lambda line: print(line, flush=True))
    except DoesNotFit as e:
        _exit(1, f"pre-flight failed: {e}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("topology", "", "TPU topology to compile for, e.g. v5e:2x2, v5p:4x4x8, v6e:4x4.")
    flags.DEFINE_string("hlo_dir", "", "Write each compiled program's HLO text here.")
    app.run(main, flags_parser=_parse_flags)
