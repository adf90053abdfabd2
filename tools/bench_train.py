"""Time the real train step (the jitted function `python -m ctxjax.train` runs, fed by the real
data pipeline) for a config, at given lengths and batches, after compilation.

For each case (sequence length x rows) and variant (a named set of config overrides) it builds
the run exactly as ctxjax.train does (config checks, mesh, plan, sharded state, data iterator),
compiles, runs `--warmup` steps, then times `--steps` steps and prints: tokens/s per device,
step time, the compiled step's memory per device, and MFU counted both ways:
  ours     the FLOPs of the actual mask of each layer (ctxjax/metrics.py: step_flops)
  maxtext  MaxText's count: 6 x matmul params x tokens + causal attention at half of dense, every
           layer, no remat recompute (metrics.maxtext_flops), for side-by-side numbers
against the device's bf16 peak (989 TFLOP/s for H100/H200). The losses of every step are kept,
so variants can be compared step by step. Appends a dated table to --markdown.

    python tools/bench_train.py --config=configs/llama_1b_32k_skyladder.py --cases=8192x4,32768x1 \\
        --set model.layer_pattern="('global',)" --set model.document_mask=False --set skyladder.enabled=False \\
        --set mesh.context=1 --variant "full:parallel.remat='full'" \\
        --variant "fast:parallel.remat='none',train.vocab_chunk=0,parallel.deterministic=False"
"""
from __future__ import annotations

import argparse
import ast
import datetime
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ctxjax import mesh as mesh_lib, metrics as metrics_lib, parallel, train  # noqa: E402
from ctxjax.config import check_mesh_fits, load_config, set_by_path, validate_config  # noqa: E402
from ctxjax.data import check_vocab, make_tokenizer, make_train_iterator  # noqa: E402
from ctxjax.model import ModelConfig  # noqa: E402
from ctxjax.schedules import make_window_schedule  # noqa: E402


def parse_overrides(text: str) -> dict:
    """'a.b=1,c.d=(1, 2)' -> {'a.b': 1, 'c.d': (1, 2)}; values are Python literals (strings may
    be bare words)."""
    out, depth, start = {}, 0, 0
    parts = []
    for i, ch in enumerate(text + ","):
        depth += ch in "([{" and 1 or (-1 if ch in ")]}" else 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    for part in filter(None, (p.strip() for p in parts)):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def case_config(base_config, seq_len: int, rows: int, overrides: dict, *, total_steps: int):
    """The validated config of one case: the base with the overrides, this length and batch,
    and room for `total_steps` steps (learning-rate warmup within them)."""
    config = base_config.copy_and_resolve_references()
    for key, value in overrides.items():
        set_by_path(config, key, value)
    config.train.seq_len, config.train.global_batch_size = seq_len, rows
    config.train.steps = max(config.train.steps, total_steps + 1)
    config.optim.warmup_steps = min(config.optim.warmup_steps, total_steps)
    return validate_config(config)


def run_case(base_config, seq_len: int, rows: int, overrides: dict, *, steps: int, warmup: int,
             window_aware_ring: bool = True, profile_dir: str = "") -> dict:
    """One case: build as ctxjax.train does, compile, time. Returns a result row.
    `window_aware_ring=False` forces the full ring for bounded masks (parallel.make_plan).
    `profile_dir`: also trace two more steps there (jax.profiler), after the timed ones."""
    config = case_config(base_config, seq_len, rows, overrides, total_steps=warmup + steps)
    mesh = mesh_lib.make_mesh(config.mesh)
    check_mesh_fits(config, mesh)
    check_vocab(make_tokenizer(config.data), config.model.vocab_size)
    plan = parallel.make_plan(config, mesh, window_aware_ring=window_aware_ring)
    model = ModelConfig.from_config(config.model)
    tx, lr = train.make_optimizer(config.optim, config.train.steps)
    window_at = make_window_schedule(config.skyladder, seq_len=seq_len, total_steps=config.train.steps)
    data = make_train_iterator(config.data, seq_len=seq_len, global_batch_size=rows, seed=config.train.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    row = dict(seq_len=seq_len, rows=rows, tokens_per_step=seq_len * rows, plan=plan.describe(
        model, skyladder=bool(config.skyladder.enabled), window_mask=config.skyladder.mask, seq_len=seq_len))
    print("\n".join(row["plan"]), flush=True)
    with mesh_lib.use_mesh(mesh):
        graphdef, params_abstract, opt_abstract = train.abstract_state(model, plan, tx, mesh)
        params, opt_state = train.init_state(model, plan, tx, config.train.seed, params_abstract, opt_abstract)
        jitted = train.jit_train_step(graphdef, tx, lr, config, mesh, params_abstract, opt_abstract)
        traced = 2 if profile_dir else 0
        host = [next(data) for _ in range(warmup + steps + traced)]  # read ahead: the timing is the device's
        batches = [parallel.shard_inputs(train.with_targets(b), mesh, plan) for b in host]
        window = window_at(0, seq_len)
        window_arg = None if window is None else jnp.int32(window)
        start = time.perf_counter()
        compiled = jitted.lower(params, opt_state, batches[0], jnp.int32(0), window_arg).compile()
        row["compile_s"] = time.perf_counter() - start
        row["memory"] = metrics_lib.describe_memory(compiled.memory_analysis())
        analysis = compiled.memory_analysis()
        if analysis is not None:
            row["memory_gib"] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                 + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes) / 2**30
        losses, times = [], []
        for i, batch in enumerate(batches[:warmup + steps]):
            if i == warmup:
                jax.block_until_ready(params)
            t0 = time.perf_counter()
            params, opt_state, m = compiled(params, opt_state, batch, jnp.int32(i), window_arg)
            losses.append(m["loss"])
            if i >= warmup:  # synchronised one by one (dispatch is microseconds against step times)
                jax.block_until_ready(m["loss"])
                times.append(time.perf_counter() - t0)
        step_s = float(np.median(times))
        losses = [float(x) for x in jax.device_get(losses)]
        if traced:
            with jax.profiler.trace(profile_dir):
                for i, batch in enumerate(batches[warmup + steps:], warmup + steps):
                    params, opt_state, m = compiled(params, opt_state, batch, jnp.int32(i), window_arg)
                jax.block_until_ready(m["loss"])
            row["profile"] = profile_dir
    devices = mesh.size
    peak = metrics_lib.peak_flops_per_device(mesh.devices.flat[0], config.train.peak_tflops)
    ours = np.mean([metrics_lib.step_flops(b, window, model, config.skyladder.mask)
                    for b in host[warmup:warmup + steps]])
    maxtext = metrics_lib.maxtext_flops(model, seq_len, rows)
    row.update(step_ms=step_s * 1e3, tokens_per_s_per_device=seq_len * rows / step_s / devices,
               mfu_ours=ours / step_s / devices / peak, mfu_maxtext=maxtext / step_s / devices / peak,
               tflops_maxtext=maxtext / step_s / devices / 1e12, losses=losses, device=str(mesh.devices.flat[0].device_kind),
               devices=devices)
    del params, opt_state, batches, compiled
    gc.collect()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--cases", default="8192x4,32768x1", help="SEQxROWS list")
    p.add_argument("--set", action="append", default=[], help="overrides for every variant: a.b=v[,c.d=w]")
    p.add_argument("--variant", action="append", default=[], help="NAME:a.b=v[,c.d=w] (default: one, 'config')")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="", help="also write every row (with per-step losses) here")
    p.add_argument("--markdown", default=os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"))
    p.add_argument("--no_markdown", action="store_true")
    p.add_argument("--profile", default="", help="trace two more steps of each case into DIR/SEQxROWS_VARIANT "
                   "(jax.profiler; open with TensorBoard's profile plugin or xprof)")
    args = p.parse_args()

    base = load_config(args.config)
    for text in args.set:
        for key, value in parse_overrides(text).items():
            set_by_path(base, key, value)
    variants = [v.partition(":") for v in args.variant] or [("config", ":", "")]
    rows = []
    for case in args.cases.split(","):
        seq_len, n = (int(x) for x in case.lower().split("x"))
        for name, _, text in variants:
            print(f"--- {seq_len} x {n}, {name}", flush=True)
            try:
                profile_dir = os.path.join(args.profile, f"{seq_len}x{n}_{name}") if args.profile else ""
                row = run_case(base, seq_len, n, parse_overrides(text), steps=args.steps, warmup=args.warmup,
                               profile_dir=profile_dir)
            except Exception as e:  # e.g. out of memory: a row that says so, and go on
                row = dict(seq_len=seq_len, rows=n, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            row["variant"], row["overrides"] = name, text
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "plan")}), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    table = markdown(args, rows)
    print(table)
    if not args.no_markdown:
        with open(args.markdown, "a") as f:
            f.write(table)


def markdown(args, rows) -> str:
    device = next((r["device"] for r in rows if "device" in r), jax.devices()[0].device_kind)
    lines = [f"\n### {datetime.date.today()} — {device}, JAX {jax.__version__} (tools/bench_train.py)\n",
             f"`python tools/bench_train.py --config={args.config} --cases={args.cases} "
             + " ".join(f"--set {s!r}" for s in args.set) + " " + " ".join(f"--variant {v!r}" for v in args.variant)
             + f" --steps={args.steps} --warmup={args.warmup}`\n",
             "| seq x rows | variant | step ms | tokens/s/device | TFLOP/s (MaxText count) | MFU MaxText count "
             "| MFU actual mask | memory/device | compile s | loss (first/last) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        case = f"{r['seq_len'] // 1024}K x {r['rows']}"
        if "error" in r:
            lines.append(f"| {case} | {r['variant']} | — | — | — | — | — | — | — | {r['error'][:120]} |")
            continue
        lines.append(f"| {case} | {r['variant']} | {r['step_ms']:.0f} | {r['tokens_per_s_per_device'] / 1e3:.1f}K "
                     f"| {r['tflops_maxtext']:.0f} | {r['mfu_maxtext']:.1%} | {r['mfu_ours']:.1%} "
                     f"| {r.get('memory_gib', float('nan')):.1f} GiB | {r['compile_s']:.0f} "
                     f"| {r['losses'][0]:.3f} / {r['losses'][-1]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
