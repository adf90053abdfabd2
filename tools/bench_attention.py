"""Benchmark attention on a GPU: our Pallas Mosaic GPU kernel vs cuDNN vs tokamax vs XLA.

`ours` is the default (deterministic) backward; `ours_fused` is `deterministic=False`, the
fused one-kernel backward (dQ reduce-added in float32, as FlashAttention-2/3 do; for window
and chunk masks the kernel keeps the two-kernel one), timed in forward+backward only (its
forward is ours).

bf16, head_dim 128, 16 heads, B x S = 64K tokens (B = 1 at S = 128K), masks: causal, sliding
window 1024, SkyLadder chunk 1024, 8 equal documents per row; forward and forward+backward.
TFLOP/s count the matmul FLOPs of the allowed area only (`pallas_kernels.mask.allowed_flops`),
so a kernel that skips masked tiles is not credited for work it avoids. Ratios are against
cuDNN measured in the same run. Appends a Markdown table (date, GPU, JAX version) to
--markdown (docs/benchmarks.md by default).

    python tools/bench_attention.py                       # the full table
    python tools/bench_attention.py --seq 8192 --impls ours,cudnn --modes fwd
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.mask import MaskSpec, allowed_flops  # noqa: E402

HEADS, HEAD_DIM, TOKENS, WINDOW = 16, 128, 65536, 1024
MASKS = ("causal", "window", "chunk", "documents")
IMPLS = ("ours", "ours_fused", "cudnn", "tokamax", "xla")


def mask_args(name, batch, seq):
    """The int arrays a benchmark mask needs, passed to the jitted functions as arguments."""
    if name == "documents":   # 8 equal documents per row
        return {"seg": jnp.broadcast_to(1 + jnp.arange(seq, dtype=jnp.int32) // (seq // 8), (batch, seq))}
    return {}


def mask_spec(name, aux):
    return {"causal": lambda: MaskSpec(), "window": lambda: MaskSpec(window=WINDOW),
            "chunk": lambda: MaskSpec(chunk=WINDOW),
            "documents": lambda: MaskSpec(q_segment_ids=aux["seg"])}[name]()


def make_impl(impl, name):
    """fn(q, k, v, aux) -> out, or a string saying why the backend cannot run this mask."""
    if impl in ("ours", "ours_fused"):
        from pallas_kernels.gpu import flash_attention
        deterministic = impl == "ours"
        return lambda q, k, v, aux: flash_attention(q, k, v, mask_spec(name, aux),
                                                    deterministic=deterministic)
    if impl in ("cudnn", "tokamax"):
        if name not in ("causal", "window"):
            return "cannot express" if impl == "cudnn" else "needs a dense mask"
        window = (WINDOW - 1, 0) if name == "window" else None
        if impl == "cudnn":
            return lambda q, k, v, aux: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=window, implementation="cudnn")
        try:
            import tokamax
        except ImportError as e:
            return f"not installed ({e.__class__.__name__})"
        return lambda q, k, v, aux: tokamax.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=window, implementation="mosaic")
    if impl == "xla":
        from pallas_kernels.blockwise import blockwise_attention
        return lambda q, k, v, aux: blockwise_attention(q, k, v, mask_spec(name, aux))
    raise ValueError(impl)


def timed(fn, args, budget_s, batch_s=0.02):
    """Median time of one fn(*args), after a compile + warm-up call. Calls are dispatched
    back to back in batches of about `batch_s` and synchronised once per batch, so the
    host's dispatch and synchronisation latency (tens of microseconds, a tenth of the
    shortest cells here) stays out of the number: this measures the device. Returns
    (median seconds per call over the batches, number of timed calls)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    per_batch = max(1, min(50, int(batch_s / max(first, 1e-5))))
    batches = max(3, min(30, int(budget_s / max(first * per_batch, 1e-4))))
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / per_batch)
    return statistics.median(times), batches * per_batch


def run(args):
    dev = jax.devices()[0]
    results = []
    for seq in args.seq:
        batch = max(1, TOKENS // seq)
        ks = jax.random.split(jax.random.key(seq), 4)
        shape = (batch, seq, HEADS, HEAD_DIM)
        q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16) for kk in ks)
        for name in args.masks:
            aux = mask_args(name, batch, seq)
            count = jax.jit(lambda aux: allowed_flops(mask_spec(name, aux), batch, seq, seq, HEADS, HEAD_DIM))
            fwd_flops = float(count(aux))
            outs = {}
            for impl in args.impls:
                fn = make_impl(impl, name)
                for mode in args.modes:
                    row = dict(seq=seq, batch=batch, mask=name, impl=impl, mode=mode)
                    flops = fwd_flops * (3.5 if mode == "fwdbwd" else 1.0)
                    if isinstance(fn, str):
                        results.append(dict(row, note=fn))
                        continue
                    if impl == "ours_fused" and mode == "fwd":
                        continue   # the same forward as ours
                    if mode == "fwd":
                        f = jax.jit(fn)
                    else:
                        def f_bwd(q, k, v, aux, do, fn=fn):
                            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, aux), q, k, v)
                            return vjp(do)
                        f = jax.jit(f_bwd)
                    call_args = (q, k, v, aux) if mode == "fwd" else (q, k, v, aux, do)
                    try:
                        t0 = time.perf_counter()
                        sec, reps = timed(f, call_args, args.budget)
                        row.update(ms=sec * 1e3, tflops=flops / sec / 1e12, reps=reps,
                                   wall_s=round(time.perf_counter() - t0, 1))
                        if mode == "fwd" and impl in ("ours", "cudnn", "tokamax"):
                            outs[impl] = f(*call_args)
                    except Exception as e:  # a backend failing must not stop the table
                        row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    results.append(row)
                    print(json.dumps(row), flush=True)
            if "ours" in outs and "cudnn" in outs:   # same function, two implementations
                a, b = (x.astype(jnp.float32) for x in (outs["ours"], outs["cudnn"]))
                rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                print(json.dumps(dict(seq=seq, mask=name, rel_diff_ours_vs_cudnn=rel)), flush=True)
                results.append(dict(seq=seq, mask=name, rel_diff_ours_vs_cudnn=rel))
    return dev, results


def table(dev, results):
    by = {(r["seq"], r["mask"], r["impl"], r["mode"]): r for r in results if "impl" in r}
    lines = [f"### {datetime.date.today()} — {dev.device_kind}, JAX {jax.__version__}",
             "",
             f"bf16, D={HEAD_DIM}, H={HEADS}, B x S = {TOKENS // 1024}K tokens (B=1 at 128K); "
             "TFLOP/s over the allowed area; ratio = ours / cuDNN TFLOP/s; ms per call = median "
             "over batches of back-to-back calls, one synchronisation per batch.",
             "",
             "| S | mask | mode | ours ms | ours TFLOP/s | ours fused ms | ours fused TFLOP/s | "
             "cuDNN ms | cuDNN TFLOP/s | tokamax ms | tokamax TFLOP/s | XLA ms | XLA TFLOP/s | "
             "ours/cuDNN | ours fused/cuDNN | ours/tokamax |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["seq"], r["mask"], r["mode"]) for r in results if "impl" in r},
                  key=lambda x: (x[0], MASKS.index(x[1]), x[2]))
    for seq, name, mode in keys:
        cells = []
        for impl in IMPLS:
            r = by.get((seq, name, impl, mode))
            if r is None:
                cells += ["-", "-"]
            elif "ms" in r:
                cells += [f"{r['ms']:.2f}", f"{r['tflops']:.0f}"]
            else:
                cells += [r["note"], ""]
        ratio = lambda mine, other: (
            f"{by[(seq, name, mine, mode)]['tflops'] / by[(seq, name, other, mode)]['tflops']:.2f}"
            if "ms" in by.get((seq, name, mine, mode), {})
            and "ms" in by.get((seq, name, other, mode), {}) else "n/a")
        lines.append(f"| {seq // 1024}K | {name} | {mode} | " + " | ".join(cells)
                     + f" | {ratio('ours', 'cudnn')} | {ratio('ours_fused', 'cudnn')}"
                     f" | {ratio('ours', 'tokamax')} |")
    ours = {(r["seq"], r["mask"], r["mode"]): r for r in results if r.get("impl") == "ours" and "ms" in r}
    goals = []
    for (seq, name, mode), r in sorted(ours.items()):
        causal = ours.get((seq, "causal", mode))
        if causal is None or name == "causal":
            continue
        if name in ("window", "chunk"):
            goals.append(f"{seq // 1024}K {name} {mode}: {r['tflops'] / causal['tflops']:.0%} of causal TFLOP/s")
        if name == "documents":
            goals.append(f"{seq // 1024}K documents {mode}: {causal['ms'] / r['ms']:.1f}x faster than causal")
    if goals:
        lines += ["", "Ours, mask vs dense causal: " + "; ".join(goals) + "."]
    diffs = [r for r in results if "rel_diff_ours_vs_cudnn" in r]
    if diffs:
        lines += ["", "Relative difference of outputs, ours vs cuDNN: " + ", ".join(
            f"{r['seq'] // 1024}K {r['mask']} {r['rel_diff_ours_vs_cudnn']:.1e}" for r in diffs) + "."]
    return "\n".join(lines) + "\n"


SECTION = "## Hopper Pallas attention (tools/bench_attention.py)"


def append_markdown(path, text):
    """Add `text` at the end of our section (created if absent), before the next `## `
    section; written to a temporary file, then renamed."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION not in old:
        old = old.rstrip("\n") + f"\n\n{SECTION}\n\nWritten by tools/bench_attention.py; newest last.\n"
    start = old.index(SECTION) + len(SECTION)
    end = old.find("\n## ", start)
    end = len(old) if end < 0 else end + 1
    new = old[:end].rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n" + ("\n" + old[end:] if end < len(old) else "")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda kind: (lambda s: [kind(x) for x in s.split(",") if x])
    p.add_argument("--seq", type=csv(int), default=[8192, 32768, 131072])
    p.add_argument("--masks", type=csv(str), default=list(MASKS))
    p.add_argument("--impls", type=csv(str), default=list(IMPLS))
    p.add_argument("--modes", type=csv(str), default=["fwd", "fwdbwd"])
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per cell")
    p.add_argument("--markdown", default="docs/benchmarks.md", help="append the table here ('' = no)")
    p.add_argument("--json", default="", help="write all rows here")
    args = p.parse_args()
    for what, allowed in (("masks", MASKS), ("impls", IMPLS), ("modes", ("fwd", "fwdbwd"))):
        bad = set(getattr(args, what)) - set(allowed)
        if bad:
            p.error(f"--{what}: unknown {sorted(bad)}; choose from {list(allowed)}")
    if jax.default_backend() != "gpu":
        p.error("needs a GPU (jax.default_backend() is %r)" % jax.default_backend())
    dev, results = run(args)
    text = table(dev, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        append_markdown(args.markdown, text)
    print(text)


if __name__ == "__main__":
    main()
