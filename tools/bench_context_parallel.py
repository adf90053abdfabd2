"""Context parallelism on one multi-GPU node: a million-token sequence, and how each strategy scales.

One script for the whole sweep. Every case runs in its own process on the first N GPUs
(CUDA_VISIBLE_DEVICES, NCCL_NVLS_ENABLE=0, XLA_PYTHON_CLIENT_MEM_FRACTION=--mem_fraction), so
peak memory is the case's own and a hang or an out-of-memory ends that case only: each has a
timeout (2 x its estimate + 60 s, at least --min_case_timeout; --case_timeout fixes it). A case
times the real train step with tools/bench_train.py's run_case (the 1B model of
configs/llama_1b_32k_skyladder.py, one row per step, overrides mesh.context=N, mesh.fsdp=1,
parallel.context_strategy, parallel.remat=--remat). The groups, in the order they run:

  check      (4) Correctness: the first 10 losses (same data, same seed) of ring, all_gather,
             ulysses and hybrid on all the GPUs against one GPU, at 32K tokens: all layers global
             with documents masked, and the shipped recipe as is (local/global layers, SkyLadder
             window 64 at step 0: the window-aware ring's static and traced halo plans); and FSDP
             over 4 GPUs without a context axis (4 x 8K rows; the Pallas GPU kernel inside
             shard_map) against one GPU. Pass: every |loss difference| <= --loss_tol (0.02).
  million    (2) 1,048,576-token rows on 4 and 8 GPUs, ring (the most frugal strategy), remat
             'full' first; on the largest count then --million_remat's faster policies
             (save_attention) when 'full' fitted. Documents masked (all layers global), and the
             local/global recipe (local_window 4096, SkyLadder off, i.e. the end of its climb).
  skyladder  (3) The window-aware ring against the full ring (forced by
             parallel.make_plan(window_aware_ring=False)) at SkyLadder chunk windows 64, 1K and
             8K (traced, as in training), 128K tokens per GPU (1M on 8 GPUs, 512K on 4), all layers
             global, documents masked: step time, and the bytes one global layer's attention
             (forward + backward) sends, from its compiled program's collective-permutes
             (ctxjax.metrics.permute_traffic, as tests/test_context_parallel.py's traffic test;
             the window-aware program holds a lax.switch: the table names the branch the window
             takes, computed from the ladder of 1, 2, 4, ... pieces; the HLO is kept in --out/hlo).
  weak       (1) Weak scaling: 128K tokens per GPU (--tokens_per_gpu) on 1, 2, 4 and 8 GPUs, for
             ring, all_gather, ulysses and hybrid (context N/2 x ulysses 2, from 4 GPUs; --ulysses),
             all layers global, documents masked and plain causal: tokens/s per GPU, MFU (actual
             mask), peak memory, and efficiency = tokens/s per GPU at N / at 1 GPU. Plain causal
             from 512K tokens times one step (--one_step_from): ~40-70 s per step.

Commands. First, on any CPU: the same code paths with simulated devices at tiny shapes
(48 cases, about 20 minutes on 2 busy cores; tests/test_bench_context_parallel.py runs a few):

    python tools/bench_context_parallel.py --dry_run --out /tmp/cp_dry

8 GPUs (one H200 node), then 4 GPUs (a 4-GPU machine: the same lines; on the 8-GPU node add --gpus 4):

    python tools/bench_context_parallel.py --out runs/cp_8gpu --plan    # cases, estimates, parts; runs nothing
    python tools/bench_context_parallel.py --out runs/cp_8gpu           # again and again until it prints 'all done'
    python tools/bench_context_parallel.py --out runs/cp_4gpu --gpus 4  # likewise

--out must outlive the calls (it holds the finished cases; runs/ is ignored by git): on a machine
that may not keep it between calls, bring it along and copy it back after each call.

Each call runs the pending cases in order while their estimate fits --budget_s (540 s: under a
10-minute command limit), keeps every result in --out and never reruns a finished case
(--redo, --retry_failed); a case the budget cut short runs again next call. Fixed parts instead:
--part K (K from --plan; cut with the assumed estimates, so the numbering stays put). --only
check,million,skyladder,weak picks groups; --match KEY_SUBSTRING picks cases.

Time (estimated before any GPU run, assuming 90 s start-up + compilation per case and steps at 40%
of 989 TFLOP/s counting remat recompute; the calls recalibrate from the cases that ran, --plan
shows both):

  8 GPUs, 48 cases, ~12 calls of <= 9 min (~100 min):
    parts 1-2   check: 10 cases (~8 + 8 min)
    parts 3-4   million: 6 cases, 5-14 s steps (~8 min), then the SkyLadder traffic compiles
    parts 4-5   skyladder: 2 compiles + 6 cases at 1M, ~3-4 s steps (~13 min with the traffic)
    parts 5-8   weak, documents masked: 12 cases (1 runs in million), 5-8 s steps (~30 min)
    parts 8-12  weak, plain causal: 12 cases, steps ~12 s (1 GPU) to ~70 s (8 GPUs) (~40 min)
  4 GPUs, 38 cases, ~9 calls (~72 min): check 2 calls, million (4 cases at 256K per GPU) 1,
    skyladder (512K) 1.5, weak documents 2, weak causal 2.5.

Printed: a line per case as it starts (estimate, timeout) and as it ends (step time, tokens/s
per device, MFU, peak memory, compile time, time taken against the estimate; or the error and
its log file); then 'N of M cases pending: run again: ...' or 'all done'; last, the tables:
correctness (loss differences, pass/FAIL), a million tokens (fits, tokens/s/GPU, MFU, peak),
SkyLadder (step ms, MiB sent per layer, branch, full/aware step), weak scaling (tokens/s/GPU,
MFU, peak, efficiency vs 1 GPU). Written to --out: cases/KEY.json (the result, per-step losses),
logs/KEY.log, hlo/KEY.hlo.txt.gz, summary.json, report.md; when every case is done on GPUs, the
dated tables are appended once to docs/benchmarks.md (--markdown PATH elsewhere; --report
prints and appends from --out without running anything).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, ROOT)
sys.path.insert(0, TOOLS)

CONFIG = os.path.join(ROOT, "configs", "llama_1b_32k_skyladder.py")
GROUPS = ("check", "million", "skyladder", "weak")  # the order cases run in
STRATEGIES = ("ring", "all_gather", "ulysses", "hybrid")
MIB = 2**20

# Model variants: overrides of the 1B config. 'recipe' is the shipped config itself (local/global
# layers, documents, SkyLadder on: window 64 at step 0); 'sky' gets skyladder.constant_window.
VARIANTS = {
    "causal": {"model.layer_pattern": ("global",), "model.document_mask": False, "skyladder.enabled": False},
    "docs": {"model.layer_pattern": ("global",), "model.document_mask": True, "skyladder.enabled": False},
    "local_global": {"model.layer_pattern": ("local", "local", "global"), "model.local_window": 4096,
                     "model.document_mask": True, "skyladder.enabled": False},
    "recipe": {},
    "sky": {"model.layer_pattern": ("global",), "model.document_mask": True, "skyladder.enabled": False},
}
VARIANT_TEXT = {
    "causal": "all layers global, plain causal",
    "docs": "all layers global, documents masked",
    "local_global": "('local','local','global'), local_window 4096, documents masked (SkyLadder off: its end)",
    "recipe": "the shipped recipe as is: local/global, documents, SkyLadder window at step 0",
    "sky": "all layers global, documents masked, SkyLadder chunk window (constant_window)",
}
# --dry_run: the same code paths on CPU devices at tiny shapes.
DRY_MODEL = {"model.d_model": 64, "model.n_layers": 3, "model.n_heads": 8, "model.n_kv_heads": 2,
             "model.head_dim": 8, "model.mlp_dim": 128, "model.vocab_size": 512, "skyladder.start": 8,
             "skyladder.multiple_of": 8}
DRY_LOCAL_WINDOW = 64
DRY_DEFAULTS = dict(tokens_per_gpu=256, million=2048, check_tokens=1024, sky_windows="8,32,128")
GPU_DEFAULTS = dict(tokens_per_gpu=131072, million=1048576, check_tokens=32768, sky_windows="64,1024,8192")


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    group: str  # check | million | skyladder | weak
    variant: str  # a VARIANTS name
    gpus: int
    strategy: str  # 'single' (one device), 'fsdp' (no context axis), or a context strategy
    remat: str
    seq_len: int
    rows: int = 1
    warmup: int = 1
    steps: int = 2
    window: int | None = None  # skyladder.constant_window ('sky')
    window_aware: bool = True  # False: the ring runs the full circle (parallel.make_plan)
    kind: str = "train"  # train | traffic (compile one layer's attention, count collective-permute bytes)
    ulysses: int = 1  # hybrid: the Ulysses axis inside each ring rank
    requires: str = ""  # key of a case that must have fit first (million: remat full before the rest)

    @property
    def mesh(self) -> dict:
        if self.strategy == "fsdp":
            return {"mesh.data": 1, "mesh.fsdp": self.gpus, "mesh.context": 1, "mesh.ulysses": 1}
        if self.strategy == "hybrid":
            return {"mesh.data": 1, "mesh.fsdp": 1, "mesh.context": self.gpus // self.ulysses,
                    "mesh.ulysses": self.ulysses}
        return {"mesh.data": 1, "mesh.fsdp": 1, "mesh.context": self.gpus, "mesh.ulysses": 1}

    @property
    def mesh_tag(self) -> str:
        if self.strategy == "fsdp":
            return f"fsdp{self.gpus}"
        if self.strategy == "hybrid":
            return f"c{self.gpus // self.ulysses}u{self.ulysses}"
        return f"c{self.gpus}"

    @property
    def key(self) -> str:
        """Names the measurement (not the group): an identical case in two groups runs once."""
        variant = self.variant + (f"{self.window}" if self.window is not None else "")
        ring = "" if self.window_aware else "-fullring"
        if self.kind == "traffic":
            return f"traffic-{self.variant}-{self.mesh_tag}-{self.strategy}-L{self.seq_len}{ring}"
        return (f"{variant}-{self.mesh_tag}-{self.strategy}-{self.remat}-L{self.seq_len}x{self.rows}"
                f"-s{self.warmup}+{self.steps}{ring}")

    @property
    def label(self) -> str:
        ring = "" if self.window_aware else " (full ring)"
        return f"{self.variant}{'' if self.window is None else f' w{self.window}'} {self.mesh_tag} {self.strategy}{ring}"

    def overrides(self, dry_run: bool) -> dict:
        out = dict(VARIANTS[self.variant])
        if dry_run:
            out.update(DRY_MODEL)
            if "model.local_window" in out or self.variant == "recipe":
                out["model.local_window"] = DRY_LOCAL_WINDOW
        if self.window is not None:
            out["skyladder.constant_window"] = self.window
        out.update(self.mesh)
        if self.strategy not in ("single", "fsdp"):
            out["parallel.context_strategy"] = self.strategy
        out["parallel.remat"] = self.remat
        return out


def sizes(args) -> dict:
    defaults = DRY_DEFAULTS if args.dry_run else GPU_DEFAULTS
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}


def strategies_at(n: int, args) -> list[str]:
    """The context strategies that run on n devices (hybrid: n = context x ulysses, both >= 2)."""
    out = []
    for s in args.strategies.split(","):
        if s == "hybrid" and not (n % args.ulysses == 0 and n // args.ulysses >= 2 and args.ulysses >= 2):
            continue
        out.append(s)
    return out


def make_cases(args, gpus: int) -> list[Case]:
    """Every case of the sweep on `gpus` devices, in the order they run."""
    s = sizes(args)
    counts = [n for n in (1, 2, 4, 8) if n <= gpus]
    top = counts[-1]
    remat, u = args.remat, args.ulysses
    cases = []
    # 4. Correctness: the first 10 losses of each strategy against one device, same data and seed.
    if top >= 2:
        check = dict(group="check", remat=remat, warmup=1, steps=args.check_steps - 1, ulysses=u)
        length = s["check_tokens"]
        for variant in ("docs", "recipe"):
            cases.append(Case(variant=variant, gpus=1, strategy="single", seq_len=length, **check))
            names = strategies_at(top, args) if variant == "docs" else [
                x for x in strategies_at(top, args) if x in ("ring", "hybrid")]
            cases += [Case(variant=variant, gpus=top, strategy=x, seq_len=length, **check) for x in names]
        if top >= 4:  # plain FSDP: no context axis, the Pallas GPU kernel inside shard_map
            cases.append(Case(variant="docs", gpus=1, strategy="single", seq_len=length // 4, rows=4, **check))
            cases.append(Case(variant="docs", gpus=4, strategy="fsdp", seq_len=length // 4, rows=4, **check))
    # 2. A million tokens on 4 and 8 devices: remat full first (the most frugal), then faster ones.
    for n in (x for x in (4, 8) if x in counts):
        for variant in ("docs", "local_global"):
            first = Case(group="million", variant=variant, gpus=n, strategy="ring", remat="full",
                         seq_len=s["million"], warmup=args.warmup, steps=args.steps)
            cases.append(first)
            if n == top:
                for faster in args.million_remat.split(","):
                    if faster and faster != "full":
                        cases.append(dataclasses.replace(first, remat=faster, requires=first.key))
    # 3. SkyLadder early in the climb: the window-aware ring against the full ring.
    if top >= 2:
        length = args.sky_seq or s["tokens_per_gpu"] * top
        windows = [int(w) for w in s["sky_windows"].split(",")]
        for aware in (True, False):
            cases.append(Case(group="skyladder", variant="sky", gpus=top, strategy="ring", remat=remat,
                              seq_len=length, window=windows[0], window_aware=aware, kind="traffic"))
        for window in windows:
            for aware in (True, False):
                cases.append(Case(group="skyladder", variant="sky", gpus=top, strategy="ring", remat=remat,
                                  seq_len=length, window=window, window_aware=aware, warmup=args.warmup,
                                  steps=args.steps))
    # 1. Weak scaling: tokens per device fixed, devices 1, 2, 4, 8. Plain causal steps grow with
    # the sequence (about 80 s at 1M on 8 GPUs): from --one_step_from tokens one step is timed.
    for variant in args.masks.split(","):
        for n in counts:
            length = s["tokens_per_gpu"] * n
            steps = 1 if variant == "causal" and args.one_step_from and length >= args.one_step_from else args.steps
            for strategy in (["single"] if n == 1 else strategies_at(n, args)):
                cases.append(Case(group="weak", variant=variant, gpus=n, strategy=strategy, remat=remat,
                                  seq_len=length, warmup=args.warmup, steps=steps, ulysses=u))
    only = set(args.only.split(",")) if args.only else set(GROUPS)
    cases = [c for c in cases if c.group in only and (not args.match or any(m in c.key for m in args.match))]
    seen, unique = set(), []
    for c in cases:  # a case already listed (e.g. million = weak's 8-GPU documents ring) runs once
        if (c.key, c.group) not in seen:
            seen.add((c.key, c.group))
            unique.append(c)
    return unique


# ------------------------------------------------------------------------------------------
# Estimates (the plan), from FLOPs on the real data and assumed efficiencies
# ------------------------------------------------------------------------------------------

REMAT_RECOMPUTE = {"full": (4 / 3, 4 / 3), "save_attention": (4 / 3, 1.0), "save_matmuls": (1.0, 4 / 3),
                   "none": (1.0, 1.0), "offload": (1.0, 4 / 3)}  # (matmul, attention) factors


class Estimator:
    """Seconds per case: start-up and compilation (`overhead`) plus (warmup + steps) steps of
    FLOPs / (devices x peak x efficiency). FLOPs are counted as run_case counts them (actual
    mask, one batch of the real data), times the remat recompute. The overhead and efficiency
    are assumptions until cases have run: then the medians of the measured ones are used."""

    def __init__(self, args, results: dict):
        self.args, self.cache_path = args, os.path.join(args.out, "flops.json")
        self.flops = _read_json(self.cache_path, {})
        peak = 100e9 * (os.cpu_count() or 1) if args.dry_run else args.peak_tflops * 1e12
        self.peak = peak
        self.overhead, self.efficiency = args.overhead_s, args.efficiency
        self.calibrated = False
        overheads, effs = [], []
        for r in results.values():
            row, case = r.get("row") or {}, r.get("case") or {}
            if r.get("status") != "ok" or case.get("kind") != "train" or "step_ms" not in row:
                continue
            steps = case["warmup"] + case["steps"]
            overheads.append(r["wall_s"] - steps * row["step_ms"] / 1e3)
            split = self._split(Case(**case))
            if split:
                effs.append(self._work(Case(**case), split) / (row["step_ms"] / 1e3) / (case["gpus"] * peak))
        if len(overheads) >= 2:
            self.overhead, self.calibrated = statistics.median(overheads), True
        if len(effs) >= 2:
            self.efficiency = statistics.median(effs)

    def _split(self, case: Case, compute: bool = False):
        """(matmul FLOPs, attention FLOPs) of one step, cached in --out/flops.json."""
        key = f"{case.variant}|{case.window}|{case.seq_len}x{case.rows}|{'dry' if self.args.dry_run else 'gpu'}"
        if key not in self.flops and compute:
            import bench_train
            from ctxjax.config import load_config
            from ctxjax.data import make_train_iterator
            from ctxjax.metrics import step_flops
            from ctxjax.model import ModelConfig
            from ctxjax.schedules import make_window_schedule
            overrides = case.overrides(self.args.dry_run)
            overrides.update({"mesh.context": 1, "mesh.fsdp": 1, "mesh.ulysses": 1})
            config = bench_train.case_config(load_config(self.args.config), case.seq_len, case.rows, overrides,
                                             total_steps=case.warmup + case.steps)
            model = ModelConfig.from_config(config.model)
            window = make_window_schedule(config.skyladder, seq_len=case.seq_len,
                                          total_steps=config.train.steps)(0, case.seq_len)
            data = make_train_iterator(config.data, seq_len=case.seq_len, global_batch_size=case.rows,
                                       seed=config.train.seed, process_index=0, process_count=1)
            try:
                batch = next(data)
            finally:
                data.close()
            total = step_flops(batch, window, model, config.skyladder.mask)
            matmul = model.matmul_flops_per_token() * batch["tokens"].size
            self.flops[key] = [matmul, total - matmul]
            _write_json(self.cache_path, self.flops)
        return self.flops.get(key)

    def _work(self, case: Case, split) -> float:
        m, a = REMAT_RECOMPUTE.get(case.remat, (1.0, 1.0))
        return split[0] * m + split[1] * a

    def step_s(self, case: Case) -> float:
        split = self._split(case, compute=True)
        return self._work(case, split) / (case.gpus * self.peak * self.efficiency)

    def case_s(self, case: Case) -> float:
        if case.kind == "traffic":
            return 0.6 * self.overhead
        return self.overhead + (case.warmup + case.steps) * self.step_s(case)

    def timeout_s(self, case: Case) -> float:
        return self.args.case_timeout or max(self.args.min_case_timeout, 2 * self.case_s(case) + 60)


def pack(cases, estimator, budget: float) -> list[list[Case]]:
    """Cases in order, cut into invocations of at most `budget` estimated seconds."""
    parts, used, seen = [[]], 0.0, set()
    for case in cases:
        t = 0.0 if case.key in seen else estimator.case_s(case)  # listed twice, runs once
        seen.add(case.key)
        if parts[-1] and used + t > budget:
            parts.append([])
            used = 0.0
        parts[-1].append(case)
        used += t
    return [p for p in parts if p]


# ------------------------------------------------------------------------------------------
# Running the cases (the driver never initialises JAX's backends: each case owns its devices)
# ------------------------------------------------------------------------------------------

def _read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _write_json(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, default=str)
    os.replace(tmp, path)


def result_path(args, case: Case) -> str:
    return os.path.join(args.out, "cases", case.key + ".json")


def load_results(args) -> dict:
    folder = os.path.join(args.out, "cases")
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        if name.endswith(".json") and not name.endswith(".spec.json"):
            r = _read_json(os.path.join(folder, name), None)
            if r:
                out[r["key"]] = r
    return out


def device_pool(args) -> list[str]:
    """The device ids cases may use: CUDA_VISIBLE_DEVICES (when set) or every GPU nvidia-smi lists;
    under --dry_run, `--gpus` (default 8) simulated CPU devices."""
    if args.dry_run:
        return [str(i) for i in range(args.gpus or 8)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        pool = [x.strip() for x in visible.split(",") if x.strip()]
    else:
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            listed = ""
        pool = [str(i) for i, line in enumerate(l for l in listed.splitlines() if l.startswith("GPU "))]
    if not pool and (args.plan or args.report):  # a plan (or the tables) for a machine elsewhere
        pool = [str(i) for i in range(args.gpus or 8)]
    return pool[:args.gpus] if args.gpus else pool


def case_env(args, case: Case, pool: list[str]) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
        flags.append(f"--xla_force_host_platform_device_count={case.gpus}")
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(pool[:case.gpus])  # the first N devices
        env["NCCL_NVLS_ENABLE"] = "0"
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.mem_fraction)
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_one(args, case: Case, pool, timeout: float, capped: bool) -> dict:
    """Run one case in its own process (its own devices, clean peak memory), bounded by
    `timeout`; returns its result (also written to --out/cases/KEY.json, except when it was
    cut short by the invocation's budget (`capped`): then it stays pending)."""
    os.makedirs(os.path.join(args.out, "cases"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    spec_path = os.path.join(args.out, "cases", case.key + ".spec.json")
    out_path = result_path(args, case)
    log_path = os.path.join(args.out, "logs", case.key + ".log")
    overrides = ",".join(f"{k}={v!r}" for k, v in case.overrides(args.dry_run).items())
    _write_json(spec_path, dict(case=dataclasses.asdict(case), key=case.key, config=args.config, overrides=overrides,
                                out=out_path, hlo_dir=os.path.join(args.out, "hlo"), dry_run=args.dry_run))
    if os.path.exists(out_path):
        os.remove(out_path)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path], cwd=ROOT,
                                env=case_env(args, case, pool), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a timeout ends all of it
        try:
            proc.wait(timeout=timeout)
            killed = False
        except subprocess.TimeoutExpired:
            killed = True
            _end_group(proc)
        except BaseException:
            _end_group(proc)
            raise
    wall = time.perf_counter() - start
    result = _read_json(out_path, None) if not killed else None
    if result is None:
        if killed and capped:
            return dict(key=case.key, case=dataclasses.asdict(case), status="interrupted", wall_s=wall,
                        error=f"stopped at the invocation's budget after {wall:.0f} s; runs again next time")
        tail = _tail(log_path)
        status = "timeout" if killed else "crashed"
        error = (f"no result within its timeout of {timeout:.0f} s" if killed
                 else f"the process exited with code {proc.returncode}: {tail}")
        result = dict(key=case.key, case=dataclasses.asdict(case), status=status, error=error)
    result["driver_wall_s"] = wall
    result["log"] = os.path.relpath(log_path, args.out)
    _write_json(out_path, result)
    return result


def _end_group(proc):
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path, lines=3) -> str:
    try:
        with open(path, errors="replace") as f:
            text = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-400:]


# ------------------------------------------------------------------------------------------
# The worker: one case in this process
# ------------------------------------------------------------------------------------------

def worker(spec_path: str) -> None:
    start = time.perf_counter()
    spec = _read_json(spec_path, None)
    case = Case(**spec["case"])
    import traceback

    import jax

    import bench_train
    from ctxjax.config import load_config

    result = dict(key=case.key, case=spec["case"], overrides=spec["overrides"], status="ok")
    try:
        base = load_config(spec["config"])
        overrides = bench_train.parse_overrides(spec["overrides"])
        devices = jax.devices()
        result.update(platform=devices[0].platform, device=devices[0].device_kind, devices=len(devices),
                      jax=jax.__version__, visible=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        if len(devices) != case.gpus:
            raise RuntimeError(f"expected {case.gpus} devices, this process sees {len(devices)}")
        if case.kind == "traffic":
            result["row"] = layer_traffic(base, overrides, case, spec)
        else:
            row = bench_train.run_case(base, case.seq_len, case.rows, overrides, steps=case.steps,
                                       warmup=case.warmup, window_aware_ring=case.window_aware)
            result["row"] = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in row.items()}
    except Exception as e:  # out of memory, a failed compile: a result that says so
        text = f"{type(e).__name__}: {e}"
        oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))
        result.update(status="oom" if oom else "error", error=" ".join(text.split())[:600])
        traceback.print_exc()
    stats = [d.memory_stats() or {} for d in jax.local_devices()] if result.get("platform") == "gpu" else []
    peaks = [s.get("peak_bytes_in_use", 0) for s in stats]
    if peaks and max(peaks):
        result["peak_gib"] = max(peaks) / 2**30
    result["wall_s"] = time.perf_counter() - start
    _write_json(spec["out"], result)
    print(json.dumps({k: v for k, v in result.items() if k != "row"}), flush=True)


def layer_traffic(base, overrides: dict, case: Case, spec: dict) -> dict:
    """Compile one global layer's attention, forward and backward, as the model calls it
    (the plan's attention function, this mesh, the model's shapes and mask, the SkyLadder
    window traced), and count the bytes its collective-permutes send (ctxjax.metrics.
    permute_traffic, as the traffic test of tests/test_context_parallel.py). Nothing runs."""
    import jax
    import jax.numpy as jnp

    import bench_train
    from ctxjax import mesh as mesh_lib, parallel
    from ctxjax.metrics import collective_permutes, permute_traffic
    from ctxjax.model import ModelConfig
    from pallas_kernels.mask import MaskSpec

    config = bench_train.case_config(base, case.seq_len, case.rows, overrides, total_steps=1)
    mesh = mesh_lib.make_mesh(config.mesh)
    plan = parallel.make_plan(config, mesh, window_aware_ring=case.window_aware)
    model = ModelConfig.from_config(config.model)
    layer = model.pattern_windows().index(None)  # a global layer: the one the SkyLadder window masks
    b, length, dtype = case.rows, case.seq_len, jnp.dtype(model.dtype)

    def struct(shape, dtype, logical):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.named_sharding(mesh, logical))

    q = struct((b, length, model.n_heads, model.head_dim), dtype, ("batch", "seq", "heads", None))
    kv = struct((b, length, model.n_kv_heads, model.head_dim), dtype, ("batch", "seq", "kv_heads", None))
    rows = struct((b, length), jnp.int32, ("batch", "seq"))
    window = jax.ShapeDtypeStruct((), jnp.int32)

    def loss(q, k, v, w, token_index, segment_ids, window):
        base_mask = MaskSpec(causal=True, q_segment_ids=segment_ids if model.document_mask else None,
                             q_token_index=token_index, kv_token_index=token_index, sinks=model.sinks)
        mask = base_mask.replace(**model.layer_masks(window, config.skyladder.mask)[layer].as_fields())
        return jnp.sum(plan.attention(q, k, v, mask).astype(jnp.float32) * w)

    with mesh_lib.use_mesh(mesh):
        start = time.perf_counter()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, q, rows, rows, window).compile()
        compile_s = time.perf_counter() - start
    text = compiled.as_text()
    os.makedirs(spec["hlo_dir"], exist_ok=True)
    with gzip.open(os.path.join(spec["hlo_dir"], case.key + ".hlo.txt.gz"), "wt") as f:
        f.write(text)
    traffic = permute_traffic(text)
    ring = mesh.shape[mesh_lib.CONTEXT]
    return dict(compile_s=compile_s, fixed=traffic.fixed, branches=traffic.branches,
                unknown_trip_counts=traffic.unknown_trip_counts, permute_ops=len(collective_permutes(text)),
                ring=ring, piece_len=length // (2 * ring), n_layers=model.n_layers,
                layer_shape=f"q {list(q.shape)} {dtype}, k/v {list(kv.shape)}")


# ------------------------------------------------------------------------------------------
# Reading the results
# ------------------------------------------------------------------------------------------

def halo_branch(window: int, piece_len: int, branches: int) -> int:
    """The branch of the window-aware ring's lax.switch a SkyLadder window takes (zigzag
    layout): the ladder's plans cover look-backs of 1, 2, 4, ... pieces, the last branch is
    the full ring. A window w looks back w-1 tokens (chunk and sliding alike)."""
    need = max(1, math.ceil((window - 1) / piece_len))
    ladder = max(0, math.ceil(math.log2(need)))
    return ladder if ladder < branches - 1 else branches - 1


def traffic_bytes(traffic_row: dict, window: int) -> tuple[int, str]:
    """(bytes one layer's forward + backward sends, which branch) for a window."""
    branches = traffic_row["branches"]
    if not branches:
        return traffic_row["fixed"], "full ring"
    n = min(len(b) for b in branches)
    pick = halo_branch(window, traffic_row["piece_len"], n)
    name = "full ring (fallback)" if pick == n - 1 else f"halo plan {pick} ({2 ** pick} piece{'s' if pick else ''} back)"
    return traffic_row["fixed"] + sum(b[pick] for b in branches), name


def tokens(n: int) -> str:
    """1048576 -> '1M', 131072 -> '128K', 1000 -> '1000'."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _gib(x) -> str:
    return "—" if x is None else f"{x:.1f} GiB"


def _ok(r):
    return r is not None and r.get("status") == "ok" and "row" in r


def tables(cases: list[Case], results: dict, args) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{title: (header, rows)} of every part with results."""
    get = lambda c: results.get(c.key)
    out = {}

    def fmt(x, spec):
        return "—" if x is None else format(x, spec)

    def train_cells(r):
        row = r["row"]
        return [fmt(row["step_ms"] / 1e3, ".2f"), fmt(row["tokens_per_s_per_device"] / 1e3, ".1f") + "K",
                fmt(row["mfu_ours"], ".1%"), fmt(r.get("peak_gib"), ".1f"), fmt(row.get("memory_gib"), ".1f")]

    def status(r):
        if r is None:
            return "not run"
        if r["status"] == "skipped":
            return r.get("error", "skipped")
        return r["status"] + (f": {r.get('error', '')[:90]}" if r.get("error") else "")

    # 4. correctness
    rows = []
    for c in (c for c in cases if c.group == "check" and c.strategy != "single"):
        ref = next((x for x in cases if x.group == "check" and x.strategy == "single" and x.variant == c.variant
                    and x.seq_len == c.seq_len and x.rows == c.rows), None)
        r, rr = get(c), get(ref) if ref else None
        if _ok(r) and _ok(rr):
            a, b = r["row"]["losses"], rr["row"]["losses"]
            d = [abs(x - y) for x, y in zip(a, b)]
            rows.append([c.label, f"{tokens(c.seq_len)} x {c.rows}", f"{b[0]:.4f} / {b[-1]:.4f}",
                         f"{a[0]:.4f} / {a[-1]:.4f}", f"{d[0]:.1e}", f"{max(d):.1e}",
                         "pass" if max(d) <= args.loss_tol and len(a) == len(b) else "FAIL"])
        else:
            rows.append([c.label, f"{tokens(c.seq_len)} x {c.rows}", "", "", "", "",
                         status(r) if not _ok(r) else "reference: " + status(rr)])
    if rows:
        out["4. Correctness: losses of the first steps against one GPU (same data, same seed)"] = (
            ["case", "tokens", "1 GPU loss first / last", "loss first / last", "difference step 1",
             f"largest difference ({args.check_steps} steps)", f"within {args.loss_tol}"], rows)

    # 2. a million tokens
    rows = []
    for c in (c for c in cases if c.group == "million"):
        r = get(c)
        fits = "yes" if _ok(r) else ("no (out of memory)" if r and r["status"] == "oom" else status(r))
        cells = train_cells(r) if _ok(r) else ["—"] * 5
        rows.append([str(c.gpus), c.variant, c.strategy, c.remat, fits] + cells)
    if rows:
        out["2. A million tokens"] = (["GPUs", "model", "strategy", "remat", "fits", "step s", "tokens/s/GPU",
                                       "MFU (actual mask)", "peak GiB", "compiled GiB"], rows)

    # 3. SkyLadder: window-aware ring against the full ring
    rows = []
    traffic = {c.window_aware: get(c) for c in cases if c.group == "skyladder" and c.kind == "traffic"}
    for c in (c for c in cases if c.group == "skyladder" and c.kind == "train"):
        r = get(c)
        t = traffic.get(c.window_aware)
        sent, branch = traffic_bytes(t["row"], c.window) if _ok(t) else (None, "")
        full = next((x for x in cases if x.group == "skyladder" and x.kind == "train" and x.window == c.window
                     and not x.window_aware), None)
        speedup = ""
        if c.window_aware and _ok(r) and full is not None and _ok(get(full)):
            speedup = f"{get(full)['row']['step_ms'] / r['row']['step_ms']:.2f}x"
        rows.append([str(c.window), "window-aware" if c.window_aware else "full ring",
                     fmt(r["row"]["step_ms"], ".0f") if _ok(r) else status(r),
                     fmt(r["row"]["tokens_per_s_per_device"] / 1e3, ".1f") + "K" if _ok(r) else "—",
                     fmt(r["row"]["mfu_ours"], ".1%") if _ok(r) else "—",
                     fmt(None if sent is None else sent / MIB, ".1f"), branch, speedup])
    if rows:
        c0 = next(c for c in cases if c.group == "skyladder")
        out[f"3. SkyLadder early in the climb: {tokens(c0.seq_len)} tokens on {c0.gpus} GPUs, ring"] = (
            ["window", "ring", "step ms", "tokens/s/GPU", "MFU (actual mask)",
             "MiB sent per layer (fwd+bwd)", "branch", "full / aware step"], rows)

    # 1. weak scaling
    rows = []
    for c in (c for c in cases if c.group == "weak"):
        r = get(c)
        base = next((x for x in cases if x.group == "weak" and x.variant == c.variant and x.gpus == 1), None)
        eff = ""
        if _ok(r) and base is not None and _ok(get(base)):
            eff = f"{r['row']['tokens_per_s_per_device'] / get(base)['row']['tokens_per_s_per_device']:.0%}"
        cells = train_cells(r) if _ok(r) else [status(r)] + ["—"] * 4
        rows.append([c.variant, str(c.gpus), tokens(c.seq_len), c.strategy + (
            f" ({c.mesh_tag})" if c.strategy == "hybrid" else "")] + cells + [eff])
    if rows:
        out["1. Weak scaling: tokens per GPU fixed"] = (
            ["model", "GPUs", "sequence", "strategy", "step s", "tokens/s/GPU", "MFU (actual mask)", "peak GiB",
             "compiled GiB", "efficiency vs 1 GPU"], rows)
    return out


def render(title_rows: dict, markdown: bool) -> str:
    blocks = []
    for title, (header, rows) in title_rows.items():
        if markdown:
            lines = [f"#### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
            line = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths)).rstrip()
            lines = [title, line(header)] + [line(row) for row in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def markdown_section(args, cases, results, command: str) -> str:
    done = [r for r in results.values() if r.get("device")]
    device = done[0]["device"] if done else "?"
    jax_version = done[0].get("jax", "?") if done else "?"
    s = sizes(args)
    lines = [f"\n### {datetime.date.today()} — {device}, JAX {jax_version} (tools/bench_context_parallel.py)\n",
             f"`{command}`\n",
             f"Model `{os.path.relpath(args.config, ROOT)}` (1B), one row per step; remat `{args.remat}` unless a "
             f"table says otherwise; timed steps {args.steps} after {args.warmup} warm-up (the median), each case "
             f"in its own process on the first N GPUs. MFU counts the actual mask (ctxjax/metrics.py). Peak = "
             f"the allocator's peak over the case's devices; compiled = the step's compiled memory. Weak scaling: "
             f"{tokens(s['tokens_per_gpu'])} tokens per GPU; efficiency = tokens/s per GPU at N / at 1 GPU. "
             f"Variants: " + "; ".join(f"`{k}` {v}" for k, v in VARIANT_TEXT.items()) + ".\n",
             render(tables(cases, results, args), markdown=True), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_context_parallel"),
                   help="results folder, kept between calls (one JSON per case, logs, HLO, report)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--only", default="", help=f"groups to run, of {','.join(GROUPS)} (default: all)")
    p.add_argument("--match", action="append", default=[], help="keep only cases whose key contains one of these "
                   "(repeatable)")
    p.add_argument("--part", type=int, default=0, help="run only invocation K of --plan's estimate (default: "
                   "whatever is pending, in order, within --budget_s)")
    p.add_argument("--plan", action="store_true", help="print the cases, estimates and invocations; run nothing")
    p.add_argument("--report", action="store_true", help="print the tables from --out and append the markdown; run nothing")
    p.add_argument("--redo", action="store_true", help="run selected cases again even if --out has their result")
    p.add_argument("--retry_failed", action="store_true", help="run again cases that failed or timed out")
    p.add_argument("--gpus", type=int, default=0, help="use the first N devices (default: all; --dry_run: 8)")
    p.add_argument("--dry_run", "--cpu", action="store_true", help="CPU, simulated devices, tiny model and shapes")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--masks", default="docs,causal", help="weak-scaling model variants (causal, docs)")
    p.add_argument("--ulysses", type=int, default=2, help="hybrid: Ulysses size inside each ring rank")
    p.add_argument("--remat", default="save_attention", help="remat policy of weak scaling, SkyLadder and checks")
    p.add_argument("--million_remat", default="full,save_attention",
                   help="a million tokens: remat policies in order, the first the most frugal")
    p.add_argument("--tokens_per_gpu", type=int, default=None, help="weak scaling (default 131072; dry run 256)")
    p.add_argument("--million", type=int, default=None, help="the long sequence (default 1048576; dry run 2048)")
    p.add_argument("--check_tokens", type=int, default=None, help="correctness rows (default 32768; dry run 1024)")
    p.add_argument("--check_steps", type=int, default=10)
    p.add_argument("--loss_tol", type=float, default=0.02, help="largest |loss difference| called bf16 noise")
    p.add_argument("--sky_windows", default=None, help="SkyLadder windows (default 64,1024,8192; dry run 8,32,128)")
    p.add_argument("--sky_seq", type=int, default=0, help="SkyLadder sequence (default tokens_per_gpu x GPUs)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--one_step_from", type=int, default=524288, help="plain causal weak scaling times one step "
                   "from this many tokens (0: --steps everywhere)")
    p.add_argument("--budget_s", type=float, default=540, help="seconds one invocation may take (cases start "
                   "only while their estimate fits)")
    p.add_argument("--case_timeout", type=float, default=0, help="fixed timeout per case (default: 2 x estimate + 60)")
    p.add_argument("--min_case_timeout", type=float, default=240)
    p.add_argument("--overhead_s", type=float, default=None, help="assumed start-up + compile per case "
                   "(default 90 on GPU, 40 dry run; the measured median once two cases have run)")
    p.add_argument("--efficiency", type=float, default=0.4, help="assumed FLOP efficiency (with remat "
                   "recompute) until measured")
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--mem_fraction", type=float, default=0.92, help="XLA_PYTHON_CLIENT_MEM_FRACTION per case")
    p.add_argument("--markdown", default=None, help="append the dated tables here when the sweep is complete "
                   "(default docs/benchmarks.md, on GPUs only)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args.worker)
    start = time.perf_counter()
    if args.overhead_s is None:
        args.overhead_s = 40.0 if args.dry_run else 90.0
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    pool = device_pool(args)
    if not pool:
        sys.exit("no GPU found (nvidia-smi -L lists none, CUDA_VISIBLE_DEVICES is empty); "
                 "use --dry_run to test on this CPU.")
    gpus = len(pool)
    cases = make_cases(args, gpus)
    given = list(sys.argv[1:] if argv is None else argv)
    kept = [a for i, a in enumerate(given) if not a.startswith(("--part", "--redo", "--plan"))
            and not (i and given[i - 1] == "--part")]
    command = "python tools/bench_context_parallel.py " + " ".join(shlex.quote(a) for a in kept)
    if args.redo:  # set the selected cases' earlier results aside (kept in cases/old/)
        os.makedirs(os.path.join(args.out, "cases", "old"), exist_ok=True)
        for c in cases:
            if os.path.exists(result_path(args, c)):
                os.replace(result_path(args, c), os.path.join(args.out, "cases", "old", c.key + ".json"))
    results = load_results(args)

    def pending(c):
        r = results.get(c.key)
        return r is None or r["status"] == "interrupted" or (args.retry_failed and r["status"] not in ("ok", "skipped"))

    estimator = Estimator(args, results)
    print(f"{len(cases)} cases on {gpus} {'simulated CPU devices' if args.dry_run else 'GPUs'} "
          f"(devices {','.join(pool)}); results in {args.out}", flush=True)

    if args.plan or args.part:
        # The invocations are cut with the assumed estimates, so their numbers stay put as cases finish.
        assumed = Estimator(args, {})
        parts = pack(cases, assumed, args.budget_s)
        if args.plan:
            print(f"estimates: {assumed.overhead:.0f} s start-up + compile per case, steps at "
                  f"{assumed.efficiency:.0%} of {assumed.peak / 1e12:.1f} TFLOP/s per device (assumed)"
                  + (f"; measured so far: {estimator.overhead:.0f} s, {estimator.efficiency:.0%}"
                     if estimator.calibrated else ""))
            listed = set()
            for i, part in enumerate(parts, 1):
                total = sum(0 if c.key in listed or any(c.key == x.key for x in part[:j]) else assumed.case_s(c)
                            for j, c in enumerate(part))
                print(f"\n--part {i}: ~{total / 60:.1f} min, {sum(map(pending, part))} of {len(part)} pending")
                for c in part:
                    step = "" if c.kind == "traffic" else f", step ~{assumed.step_s(c):.1f} s"
                    again = " (the same case as an earlier one: runs once)" if c.key in listed else ""
                    listed.add(c.key)
                    print(f"  {c.group:9s} {c.key}  ~{assumed.case_s(c):.0f} s{step}{again}"
                          + ("" if pending(c) else f"  [{results[c.key]['status']}]"))
            todo = sum(map(pending, cases))
            print(f"\n{todo} of {len(cases)} cases pending; {len(parts)} parts of at most {args.budget_s / 60:.0f} min "
                  f"(estimated): {command} --part K, or without --part again until it prints 'all done'")
            return
        cases_to_run = parts[args.part - 1] if args.part <= len(parts) else []
    else:
        cases_to_run = cases
    invocation = datetime.datetime.now().isoformat(timespec="seconds")

    if not args.report:
        launched = 0
        for c in cases_to_run:
            if not pending(c):
                continue
            requires = c.requires if any(x.key == c.requires for x in cases) else ""  # unless left out
            needed = results.get(requires) if requires else None
            if requires and (needed is None or needed["status"] == "interrupted"):
                continue  # its prerequisite has not run yet
            if requires and needed["status"] != "ok":
                results[c.key] = dict(key=c.key, case=dataclasses.asdict(c), status="skipped",
                                      error=f"skipped: {needed['case']['remat']} did not fit ({needed['status']})")
                _write_json(result_path(args, c), results[c.key])
                continue
            estimate = estimator.case_s(c)
            left = args.budget_s - (time.perf_counter() - start)
            if launched and estimate > left:
                print(f"--- budget: {left:.0f} s left, the next case needs ~{estimate:.0f} s; stopping here", flush=True)
                break
            timeout = estimator.timeout_s(c)
            capped = timeout > max(left, 60)
            timeout = min(timeout, max(left, 60))
            print(f"--- {c.group}: {c.key}  (~{estimate:.0f} s, timeout {timeout:.0f} s)", flush=True)
            r = run_one(args, c, pool, timeout, capped and launched > 0)
            r["invocation"] = invocation
            if r["status"] != "interrupted":
                _write_json(result_path(args, c), r)
            launched += 1
            results[c.key] = r
            row = r.get("row") or {}
            wall = r.get("driver_wall_s", 0)
            if r["status"] == "ok" and c.kind == "train":
                print(f"    ok: step {row['step_ms'] / 1e3:.2f} s, {row['tokens_per_s_per_device'] / 1e3:.1f}K tokens/s/device, "
                      f"MFU {row['mfu_ours']:.1%}, peak {_gib(r.get('peak_gib'))}, "
                      f"compile {row['compile_s']:.0f} s, case {wall:.0f} s (estimated {estimate:.0f})", flush=True)
            elif r["status"] == "ok":
                print(f"    ok: {len(row['branches'])} switch(es), fixed {row['fixed'] / MIB:.1f} MiB, branches "
                      f"{[[round(x / MIB, 1) for x in b] for b in row['branches']]} MiB; case {wall:.0f} s", flush=True)
            else:
                print(f"    {r['status']}: {r.get('error', '')[:300]}  (log: {os.path.join(args.out, r.get('log', ''))})",
                      flush=True)
            estimator = Estimator(args, results)

    left_over = [c for c in cases if pending(c)]
    summary = dict(command=command, gpus=gpus, pool=pool, dry_run=args.dry_run, cases=[dataclasses.asdict(c) for c in cases],
                   results=results, pending=[c.key for c in left_over])
    _write_json(os.path.join(args.out, "summary.json"), summary)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(markdown_section(args, cases, results, command))
    marker = os.path.join(args.out, "markdown_appended")
    on_gpu = any(r.get("platform") == "gpu" for r in results.values())
    target = args.markdown or (os.path.join(ROOT, "docs", "benchmarks.md") if on_gpu else None)
    if target and (args.report or (not left_over and not os.path.exists(marker))):
        with open(target, "a") as f:
            f.write(markdown_section(args, cases, results, command))
        with open(marker, "w") as f:
            f.write(target + "\n")
        print(f"appended the tables to {target}")
    elif not target and not left_over:
        print("not on GPUs: the tables are in report.md only (pass --markdown PATH to append them somewhere)")
    if left_over:
        print(f"{len(left_over)} of {len(cases)} cases pending: run again: {command}")
    else:
        print(f"all done: {len(cases)} cases (results in {args.out})")
    print()
    print(render(tables(cases, results, args), markdown=False))  # the tables, last


if __name__ == "__main__":
    main()
