"""Development probe for the Hopper kernels: where does the time of one kernel go?

One device call runs, for chosen shapes and masks: (1) variants given as `Tuning` fields
(`name:field=value;field=value`, e.g. `bk64:block_kv=64;num_stages=3`; `deterministic` is
passed to the backward instead, e.g. `fused:deterministic=False`), each optionally checked
against the float32 reference (--check); (2) timings of the backward, also with parts
dropped (`Tuning.ablate`, names in `pallas_kernels.gpu.ABLATIONS`: results then wrong,
timing only) and of the forward per block configuration (--fwd); (3) Mosaic GPU's in-kernel
profiler on one kernel (--profile-kernel) over a chosen grid, summarised per named region
and warpgroup (--profile). Prints a short table last; full logs under --out. Not a benchmark
of record: tools/bench_attention.py is.

    python tools/probe_hopper.py --out $OUT --check --masks causal,window --ablations none,exp
    python tools/probe_hopper.py --seq 32768 --masks causal,chunk --ablations '' --fwd \
        --fwd-configs '128,2;64,3'
"""
from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import functools
import glob
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.gpu import Tuning, flash_attention, flash_attention_bwd, flash_attention_fwd  # noqa: E402
from pallas_kernels.mask import MaskSpec, allowed_flops  # noqa: E402
from tools.bench_attention import mask_args, mask_spec, timed  # noqa: E402


def median_ms(fn, args):
    return 1e3 * timed(fn, args, budget_s=0.5)[0]


def inputs(batch, seq, heads, dim=128, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, (batch, seq, heads, dim), jnp.float32).astype(jnp.bfloat16) for k in ks]


def bench_mask(name, batch, seq):
    """The benchmark's masks (tools/bench_attention.py), so probe and benchmark agree, and
    "noncausal" (every tile full)."""
    if name == "noncausal":
        return MaskSpec(causal=False)
    return mask_spec(name, mask_args(name, batch, seq))


def time_bwd(q, k, v, do, mask, ablate=(), tuning=Tuning(), **bwd_kw):
    """The backward alone, with the parts named in `ablate` dropped (timing only)."""
    out, lse = jax.jit(lambda q, k, v: flash_attention_fwd(q, k, v, mask, tuning=tuning))(q, k, v)
    ablated = dataclasses.replace(tuning, ablate=tuning.ablate | frozenset(ablate))
    f = jax.jit(lambda q, k, v, out, lse, do: flash_attention_bwd(q, k, v, mask, out, lse, do,
                                                                  tuning=ablated, **bwd_kw))
    return median_ms(f, (q, k, v, out, lse, do))


def time_fwd(q, k, v, mask, tuning=Tuning()):
    f = jax.jit(lambda q, k, v: flash_attention_fwd(q, k, v, mask, tuning=tuning))
    return median_ms(f, (q, k, v))


def check_grads(seed=0, tuning=Tuning(), **bwd_kw):
    """Max relative error of (dq, dk, dv, out) against the float32 reference on small random
    problems (GQA, a length that needs padding, causal and a documents+window mask)."""
    from pallas_kernels.reference import attention_reference
    errs = []
    for d, mask_kind in ((128, "causal"), (64, "docs"), (128, "docs")):
        b, t, hq, hkv = 2, 1000, 4, 2
        ks = jax.random.split(jax.random.key(seed + d), 4)
        q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(jnp.bfloat16)
        k, v = (jax.random.normal(kk, (b, t, hkv, d), jnp.float32).astype(jnp.bfloat16) for kk in ks[1:3])
        do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(jnp.bfloat16)
        seg = jnp.broadcast_to(1 + jnp.arange(t, dtype=jnp.int32) // 300, (b, t))

        def mask_of(seg):
            return MaskSpec() if mask_kind == "causal" else MaskSpec(q_segment_ids=seg, window=200)

        def grads(fn, q, k, v, do, seg):
            m = mask_of(seg)
            return jax.vjp(lambda q, k, v: fn(q, k, v, m).astype(jnp.float32), q, k, v)[1](
                do.astype(jnp.float32))
        ref_fn = lambda q, k, v, m: attention_reference(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), m)
        kernel = functools.partial(flash_attention, tuning=tuning, **bwd_kw)
        got = jax.jit(functools.partial(grads, kernel))(q, k, v, do, seg)
        ref = jax.jit(functools.partial(grads, ref_fn))(q, k, v, do, seg)
        m = mask_of(seg)
        got = (*got, jax.jit(lambda q, k, v: kernel(q, k, v, m))(q, k, v))
        ref = (*ref, ref_fn(q, k, v, m))
        for name, g, r in zip("qkvo", got, ref):
            g, r = g.astype(jnp.float32), r.astype(jnp.float32)
            err = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
            errs.append(err if bool(jnp.isfinite(g).all()) else float("nan"))
    return max(errs)


def summarise_trace(path):
    """Per (warpgroup, region): total and per-call mean time in microseconds, and the
    mean wall time per CTA, from a Mosaic GPU profiler trace (Chrome trace JSON)."""
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_tid = collections.defaultdict(list)
    for e in events:
        if e.get("ph") in ("B", "E"):
            by_tid[e["tid"]].append(e)
    per = collections.defaultdict(list)
    spans = collections.defaultdict(list)
    for tid, evs in by_tid.items():
        wg = (tid - 1) % 3
        stack = []
        for e in evs:
            if e["ph"] == "B":
                stack.append(e)
            elif stack:
                b = stack.pop()
                per[(wg, b["name"])].append(e["ts"] - b["ts"])
        if evs:
            spans[wg].append(evs[-1]["ts"] - evs[0]["ts"])
    rows = []
    for (wg, name), ds in sorted(per.items()):
        rows.append(dict(wg=wg, region=name, calls=len(ds), mean_us=statistics.mean(ds),
                         total_ms=sum(ds) / 1e3))
    return rows, {wg: statistics.mean(s) for wg, s in spans.items()}


def profile(mask_name, kernel="dkdv", seq=8192, heads=2, batch=1, ablate=(), space=128,
            tuning=Tuning(), **bwd_kw):
    """Run `kernel` ("fwd", "dq" or "dkdv") once with Mosaic GPU's in-kernel profiler on;
    returns summarise_trace of its trace."""
    q, k, v, do = inputs(batch, seq, heads)
    mask = bench_mask(mask_name, batch, seq)
    out, lse = jax.jit(lambda q, k, v: flash_attention_fwd(q, k, v, mask, tuning=tuning))(q, k, v)
    prof = os.path.join("/tmp/probe_traces", f"prof_{kernel}_{mask_name}")  # traces are large
    os.makedirs(prof, exist_ok=True)
    profiled = dataclasses.replace(tuning, profile_dir=prof, profile_kernel=kernel,
                                   profile_space=space, ablate=tuning.ablate | frozenset(ablate))
    if kernel == "fwd":
        f = jax.jit(lambda q, k, v, out, lse, do: flash_attention_fwd(q, k, v, mask, tuning=profiled))
    else:
        f = jax.jit(lambda q, k, v, out, lse, do: flash_attention_bwd(q, k, v, mask, out, lse, do,
                                                                      tuning=profiled, **bwd_kw))
    jax.block_until_ready(f(q, k, v, out, lse, do))
    files = sorted(glob.glob(os.path.join(prof, "*.json")), key=os.path.getmtime)
    return summarise_trace(files[-1]) if files else ([], {})


def parse_variant(variant):
    """'name:field=value;field=value' -> (name, Tuning with those fields, bwd_kw). Values are
    Python literals; `deterministic` is not a Tuning field but a keyword of the backward."""
    name, _, assigns = variant.partition(":")
    fields, bwd_kw = {}, {}
    for a in filter(None, assigns.split(";")):
        field, _, val = a.partition("=")
        (bwd_kw if field == "deterministic" else fields)[field] = ast.literal_eval(val)
    return name, Tuning(**fields), bwd_kw


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="/tmp/probe")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=0, help="sequences (default: 64K tokens)")
    p.add_argument("--masks", default="causal")
    p.add_argument("--ablations", default="none")
    p.add_argument("--variants", default="base:", help="'|'-separated name:field=value;... (Tuning fields, deterministic)")
    p.add_argument("--check", action="store_true", help="check gradients of every variant")
    p.add_argument("--profile", default="", help="masks to profile ('' = none)")
    p.add_argument("--profile-ablate", default="none", help="ablations to profile with")
    p.add_argument("--profile-kernel", default="dkdv", help="fwd, dq or dkdv")
    p.add_argument("--profile-shape", default="1,2", help="batch,heads of the profiled run")
    p.add_argument("--profile-space", type=int, default=128, help="regions recorded per warpgroup")
    p.add_argument("--fwd", action="store_true", help="also time the forward per mask")
    p.add_argument("--fwd-configs", default="128,2", help="forward 'block_kv,num_stages[,num_ctas]' list, ';'-separated")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "probe.jsonl"), "a")
    emit = lambda row: (print(json.dumps(row), flush=True), log.write(json.dumps(row) + "\n"), log.flush())
    batch = args.batch or max(1, 65536 // args.seq)
    q, k, v, do = inputs(batch, args.seq, 16)
    table = []
    for variant in args.variants.split("|"):
        vname = variant.partition(":")[0]
        try:
            vname, tuning, bwd_kw = parse_variant(variant)
            err = check_grads(tuning=tuning, **bwd_kw) if args.check else float("nan")
            if args.check:
                emit(dict(variant=vname, max_rel_err=err))
            for name in args.masks.split(","):
                mask = bench_mask(name, batch, args.seq)
                flops = float(allowed_flops(mask, batch, args.seq, args.seq, 16, 128))
                for cfg in (args.fwd_configs.split(";") if args.fwd else []):
                    bk, stages, *ctas = map(int, cfg.split(","))
                    ms = time_fwd(q, k, v, mask, dataclasses.replace(
                        tuning, block_kv=bk, num_stages=stages, num_ctas=ctas[0] if ctas else None))
                    table.append((vname, name, "fwd", f"bk{bk} st{stages}" + (f" ctas{ctas[0]}" if ctas else ""), ms, flops / ms / 1e9, err))
                    emit(dict(variant=vname, mask=name, mode="fwd", block_kv=bk, stages=stages, ms=ms))
                for ab in filter(None, args.ablations.split(",")):
                    ablate = () if ab == "none" else tuple(ab.split("+"))
                    ms = time_bwd(q, k, v, do, mask, ablate, tuning, **bwd_kw)
                    table.append((vname, name, "bwd", ab, ms, 2.5 * flops / ms / 1e9, err))
                    emit(dict(variant=vname, mask=name, mode="bwd", ablate=ab, ms=ms))
            for name, ab in [(n, a) for n in filter(None, args.profile.split(","))
                             for a in args.profile_ablate.split(",")]:
                ablate = () if ab == "none" else tuple(ab.split("+"))
                pb, ph = map(int, args.profile_shape.split(","))
                rows, spans = profile(name, args.profile_kernel, seq=args.seq, batch=pb, heads=ph,
                                      ablate=ablate, space=args.profile_space, tuning=tuning,
                                      **bwd_kw)
                for r in rows:
                    emit(dict(variant=vname, profile=name, ablate=ab, **r))
                print(f"\nprofile {args.profile_kernel} {vname} {name} ablate={ab} (S={args.seq}, "
                      f"B,H={args.profile_shape}; mean us per call):")
                for r in rows:
                    print(f"  wg{r['wg']} {r['region']:<12} calls {r['calls']:>6}  mean {r['mean_us']:8.3f} us"
                          f"  total {r['total_ms']:9.3f} ms")
                print("  mean span per CTA (us):", {k_: round(v_, 1) for k_, v_ in spans.items()})
        except Exception as e:  # one variant failing must not stop the others
            emit(dict(variant=vname, error=f"{type(e).__name__}: {str(e)[:2000]}"))
            table.append((vname, "-", "-", "error", float("nan"), float("nan"), float("nan")))
    print(f"\n{jax.devices()[0].device_kind}, JAX {jax.__version__}, S={args.seq}, B={batch}, H=16, D=128")
    print("| variant | mask | mode | ablation | ms | TFLOP/s (allowed area) | max rel err |")
    for row in table:
        print("| %s | %s | %s | %s | %.2f | %.0f | %.1e |" % row)


if __name__ == "__main__":
    main()
