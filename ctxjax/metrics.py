"""What a run measures and writes: FLOPs and MFU, metrics.jsonl / TensorBoard, the loss plot.

FLOPs are counted from the model config (ctxjax/model/config.py) and the actual mask of each
layer (the same per-layer terms the model applies), with the allowed pairs counted on the host
(pallas_kernels.mask.count_allowed_pairs), so MFU reflects windows, chunks and documents rather
than dense attention. `maxtext_flops` counts the way MaxText does, for side-by-side numbers.
`collective_permutes` / `permute_traffic` read the bytes a compiled program's collective-permutes
send from its HLO text (the ring's traffic: tests/test_context_parallel.py,
tools/bench_context_parallel.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile

import jax

from ctxjax.model.config import ModelConfig, layer_masks_of
from pallas_kernels.mask import count_allowed_pairs

# bf16 dense peak per device (datasheets), by a substring of jax's device_kind, first match
# wins: a v5p reports "TPU v5" and a v5e "TPU v5 lite", so "v5 lite" comes before "v5".
PEAK_BF16_TFLOPS = {"h100": 989, "h200": 989, "h800": 989, "gh200": 989, "a100": 312, "l4": 121,
                    "v6": 918, "v5p": 459, "v5 lite": 197, "v5e": 197, "v5": 459, "v4": 275}
CPU_PEAK_FLOPS_PER_CORE = 100e9  # a nominal figure, so MFU on a laptop is a number, not a claim


def step_flops(batch, window, model: ModelConfig, window_mask: str) -> float:
    """Training FLOPs of one step on these rows (host NumPy arrays in natural order): weight
    matmuls (6 x matmul params x tokens) plus attention's two matmuls over the allowed pairs of
    each layer's actual mask, forward and backward (no remat recompute)."""
    flops = model.matmul_flops_per_token() * batch["tokens"].size
    pairs = {}
    for layer_mask in layer_masks_of(model, window, window_mask):
        if layer_mask not in pairs:  # layers with the same terms share one count
            pairs[layer_mask] = count_allowed_pairs(batch["token_index"], batch["segment_ids"], sinks=model.sinks,
                                                    documents=model.document_mask, **layer_mask.as_fields())
        flops += model.attention_flops_per_pair() * pairs[layer_mask]
    return flops


def maxtext_flops(model: ModelConfig, seq_len: int, rows: int) -> float:
    """MaxText's per-step model FLOPs: 6 x matmul params x tokens plus causal attention counted
    at half of dense, for every layer, no remat recompute (maxtext_utils.calculate_tflops_
    training_per_device, causal). Counts the same for any mask: comparable across trainers."""
    tokens = seq_len * rows
    attention = 12.0 * model.n_heads * model.head_dim * seq_len * seq_len / 2 * rows * model.n_layers
    return model.matmul_flops_per_token() * tokens + attention


def peak_flops_per_device(device, peak_tflops: float = 0.0) -> float:
    """The bf16 peak of `device` (or `peak_tflops` when given); CPUs get a nominal 100 GFLOP/s
    per core."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    kind = device.device_kind.lower()
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return CPU_PEAK_FLOPS_PER_CORE * max(1, (os.cpu_count() or 1) // max(1, jax.local_device_count()))


# --------------------------------------------------------------------------------------------
# Collective traffic of a compiled program (its HLO text)
# --------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_PERMUTE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+collective-permute(-start)?\(")


def _arrays(type_text: str) -> list[int]:
    """Bytes of each array in an HLO type ('f32[2,3]{1,0}' or a tuple of them)."""
    return [_DTYPE_BYTES[dtype] * math.prod(int(n) for n in dims.split(",") if n)
            for dtype, dims in _ARRAY.findall(type_text)]


def _permute_bytes(line: str) -> int | None:
    """Bytes one collective-permute instruction sends over all its source->target pairs; None
    for any other line. Synchronous (CPU): the result is what is sent. Asynchronous
    (`collective-permute-start`, GPU): the result tuple holds the operands, the outputs and
    maybe u32[] context scalars: half the arrays, scalars left out."""
    match = _PERMUTE.match(line)
    if not match:
        return None
    type_text, is_start = match.groups()
    pairs = re.search(r"source_target_pairs=\{((\{\d+,\d+\},?)*)\}", line)
    pairs = len(re.findall(r"\{\d+,\d+\}", pairs.group(1))) if pairs else 0
    if is_start:
        sizes = [n for n, (_, dims) in zip(_arrays(type_text), _ARRAY.findall(type_text)) if dims]
        return sum(sizes) // 2 * pairs
    return sum(_arrays(type_text)) * pairs


def collective_permutes(hlo_text: str) -> list[tuple[int, str]]:
    """(bytes sent over all source->target pairs, op_name) of each collective-permute in a
    compiled program's HLO text (`compiled.as_text()`), as written: an op in a loop body or a
    conditional branch counts once (`permute_traffic` counts what runs)."""
    found = []
    for line in hlo_text.splitlines():
        sent = _permute_bytes(line)
        if sent is not None:
            op_name = re.search(r'op_name="([^"]*)"', line)
            found.append((sent, op_name.group(1) if op_name else ""))
    return found


@dataclasses.dataclass
class PermuteTraffic:
    """Bytes a program's collective-permutes send in one run. `fixed`: sent whatever branch
    runs (loop bodies times their trip count); `branches`: one list per conditional whose
    branches send anything (outermost such conditionals), the bytes of each branch, in branch
    order (a `lax.switch`'s order); which branch runs is the caller's to say.
    `unknown_trip_counts`: loops that send something but have no known trip count (counted once)."""
    fixed: int
    branches: list
    unknown_trip_counts: int = 0

    def total(self, branch: int) -> int:
        """Bytes sent when every conditional takes `branch` (clipped to its last: -1 is the last)."""
        pick = lambda sizes: sizes[branch if -len(sizes) <= branch < len(sizes) else -1]
        return self.fixed + sum(pick(sizes) for sizes in self.branches)


def _computations(hlo_text: str) -> tuple[dict, str]:
    """{name: instruction lines} of an HLO module's text, and the entry computation's name."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        if current is None:
            header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
            if header and not line.startswith((" ", "HloModule")):
                current = header.group(2)
                computations[current] = []
                entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        else:
            computations[current].append(line)
    return computations, entry


def permute_traffic(hlo_text: str) -> PermuteTraffic:
    """What the collective-permutes of a compiled program (`compiled.as_text()`) send when it
    runs once: each op's bytes over its source->target pairs, times the known trip count of
    every loop around it (XLA's `known_trip_count`), with the conditionals' branches kept apart
    (see PermuteTraffic). Nested conditionals inside a branch count their largest branch."""
    computations, entry = _computations(hlo_text)
    memo = {}

    def walk(name) -> tuple[int, list, int]:
        if name in memo:
            return memo[name]
        memo[name] = (0, [], 0)  # guards against cycles, which HLO does not have
        fixed, branches, unknown = 0, [], 0
        for line in computations.get(name, ()):
            sent = _permute_bytes(line)
            if sent is not None:
                fixed += sent
                continue
            if " while(" in line:
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                b_fixed, b_branches, b_unknown = walk(body)
                if trips is None and (b_fixed or b_branches):
                    b_unknown += 1
                n = int(trips.group(1)) if trips else 1
                fixed += n * b_fixed
                branches += [[n * x for x in sizes] for sizes in b_branches]
                unknown += b_unknown
                continue
            if " conditional(" in line:
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = ([x.strip().lstrip("%") for x in listed.group(1).split(",")] if listed else
                         [re.search(rf"{key}=%?([\w.\-]+)", line).group(1)
                          for key in ("false_computation", "true_computation")])  # a PRED index: 0, 1
                walked = [walk(n) for n in names]
                sizes = [f + sum(max(s) for s in bs) for f, bs, _ in walked]
                unknown += sum(u for _, _, u in walked)
                if any(sizes):
                    branches.append(sizes)
                continue
            for called in re.findall(r"\bcalls=%?([\w.\-]+)", line):  # calls, fusions, async wrappers
                c_fixed, c_branches, c_unknown = walk(called)
                fixed, branches, unknown = fixed + c_fixed, branches + c_branches, unknown + c_unknown
        memo[name] = (fixed, branches, unknown)
        return memo[name]

    fixed, branches, unknown = walk(entry)
    return PermuteTraffic(fixed, branches, unknown)


# --------------------------------------------------------------------------------------------
# Outputs people look at
# --------------------------------------------------------------------------------------------

def _replace(path: str, write) -> None:
    """Write via a temporary file in the same directory, then rename; readable like the rest."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2)
    _replace(path, write)


class MetricsWriter:
    """metrics.jsonl + TensorBoard (+ Weights & Biases when a project is set), process 0 only."""

    def __init__(self, workdir: str, *, wandb_project: str = "", config=None):
        self.active = jax.process_index() == 0
        self.wandb = None
        if not self.active:
            return
        from tensorboardX import SummaryWriter
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError("train.wandb_project is set but wandb is not installed: "
                                  "pip install -e '.[wandb]' (or set train.wandb_project='').") from None
            self.wandb = wandb.init(project=wandb_project, dir=workdir, name=os.path.basename(os.path.abspath(workdir)),
                                    config=None if config is None else config.to_dict(), resume="allow")

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
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


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
    _replace(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# What the run prints before and around its first steps
# --------------------------------------------------------------------------------------------

def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def describe_memory(analysis) -> str:
    """Per-device memory of a compiled program (jax's memory_analysis()), in one line."""
    if analysis is None:
        return "memory analysis not available on this backend"
    args, out = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
    temp, alias = analysis.temp_size_in_bytes, analysis.alias_size_in_bytes
    peak = args + out + temp - alias
    return (f"{_gib(peak)} per device (arguments {_gib(args)}, temporaries {_gib(temp)}, outputs {_gib(out)}, "
            f"of which donated {_gib(alias)})")


def run_summary(config, model: ModelConfig, mesh, plan) -> list[str]:
    """The start-up summary: model, FLOPs, devices and mesh, attention plan, batch, state memory."""
    from ctxjax import mesh as mesh_lib
    t, sky = config.train, config.skyladder
    params, embedding = model.param_count(), model.vocab_size * model.d_model
    device = mesh.devices.flat[0]
    mesh_sizes = " ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "one device"
    attention_pairs = t.seq_len * (t.seq_len + 1) / 2 / t.seq_len  # causal, per query
    shards = max(1, mesh.size // mesh_lib.batch_ways(mesh) // mesh_lib.sequence_ways(mesh)) * mesh_lib.batch_ways(mesh)
    state = params * (jax.numpy.dtype(model.param_dtype).itemsize + 8)  # params + AdamW's two moments (f32)
    lines = [
        f"model: {_count(params)} parameters ({_count(params - embedding)} without the embedding), "
        f"{model.n_layers} layers, d_model {model.d_model}, heads {model.n_heads}/{model.n_kv_heads} x {model.head_dim}, "
        f"MLP {model.mlp_dim}, vocab {model.vocab_size}, layer pattern {'/'.join(model.layer_pattern)}",
        f"FLOPs per token: {model.matmul_flops_per_token() / 1e9:.3g} GFLOP in weight matmuls + "
        f"{model.attention_flops_per_pair() * model.n_layers * attention_pairs / 1e9:.3g} GFLOP in attention at "
        f"{t.seq_len} tokens, causal (training: forward + backward; MFU counts the actual mask)",
        f"devices: {mesh.size} x {device.device_kind} ({device.platform}), {jax.process_count()} process(es); "
        f"mesh {mesh_sizes}",
        *plan.describe(model, skyladder=bool(sky.enabled or sky.constant_window is not None),
                       window_mask=sky.mask, seq_len=t.seq_len),
        f"batch: {t.global_batch_size} rows x {t.seq_len} tokens = {t.global_batch_size * t.seq_len} tokens per "
        f"step, {t.steps} steps ({_count(t.global_batch_size * t.seq_len * t.steps)} tokens)"
        + (f", {config.optim.grad_accum_steps} micro-batches per step" if config.optim.grad_accum_steps > 1 else ""),
        f"params and optimizer state: about {_gib(state / shards)} per device "
        f"({_gib(state)} in all; activations are reported once the step is compiled)",
    ]
    return lines


class Profiler:
    """A jax.profiler trace of train.profile_steps = (first, last), written to WORKDIR/profile
    (open it with TensorBoard's profile plugin or Perfetto)."""

    def __init__(self, workdir: str, steps):
        self.first, self.last = tuple(steps) if steps else (None, None)
        self.directory, self.active = os.path.join(workdir, "profile"), False

    def before(self, step: int) -> None:
        if step == self.first and jax.process_index() == 0:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.close()
            print(f"\nprofile of steps {self.first}-{self.last} written to {self.directory}", flush=True)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
