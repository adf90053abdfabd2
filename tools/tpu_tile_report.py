"""How much of the attention matrix the TPU kernel computes, read from its own skip tables.

For the standard masks (causal, causal + window 1024, causal + chunk 1024, causal + 8
documents per row) at 8K and 32K tokens, this builds the kernel's tile classes and work lists
(`pallas_kernels.tpu.tile_schedule_stats`, the same code the kernel runs inside jit) and
reports the fraction of tiles computed and the matmul FLOPs per call, next to the FLOPs of
the allowed area (`pallas_kernels.mask.allowed_flops`). No TPU needed:
the numbers depend only on the mask and the block sizes.

    python tools/tpu_tile_report.py                  # print and append to docs/benchmarks.md
    python tools/tpu_tile_report.py --no-write --lengths 8192
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib

import jax
import jax.numpy as jnp

from pallas_kernels.mask import MaskSpec, allowed_flops
from pallas_kernels.tpu import BlockSizes, tile_schedule_stats

# Per computed tile the kernels run 2 matmuls forward (QK^T, PV) and 7 backward
# (dq kernel: QK^T, dO V^T, dS K; dk/dv kernel: K Q^T, P^T dO, V dO^T, dS^T Q).
FWD_MATMULS, BWD_MATMULS = 2, 7
# bf16 peak per chip (one TensorCore each), from pltpu.get_tpu_info_for_chip: a lower bound on time.
PEAK_FLOPS = {"v5e": 197e12, "v6e": 920e12}
DOCS_PATH = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nResults appended by `tools/*.py`, newest last; each section says how it was measured.\n"


def standard_masks(length: int, docs: int = 8):
    segments = (jnp.arange(length, dtype=jnp.int32) // (length // docs) + 1)[None]
    return {
        "causal": MaskSpec(),
        "window 1024": MaskSpec(window=1024),
        "chunk 1024": MaskSpec(chunk=1024),
        f"{docs} documents": MaskSpec(q_segment_ids=segments),
    }


def report(lengths, blocks, heads, head_dim):
    rows = []
    for length in lengths:
        for name, mask in standard_masks(length).items():
            allowed = float(allowed_flops(mask, 1, length, length, heads, head_dim))
            for block in blocks:
                s = tile_schedule_stats(mask, 1, length, length, BlockSizes(block, block))
                computed = s["full"] + s["partial"]
                tile_flops = 2.0 * block * block * head_dim * heads * computed
                rows.append(dict(length=length, mask=name, block=block, frac=computed / s["tiles"],
                                 full=s["full"], partial=s["partial"],
                                 fwd=FWD_MATMULS * tile_flops, fwd_bwd=(FWD_MATMULS + BWD_MATMULS) * tile_flops,
                                 allowed=allowed))
    return rows


def to_markdown(rows, heads, head_dim):
    lines = [
        f"Batch 1, {heads} query heads, head dim {head_dim} (one Llama-3-8B layer); blocks are block_q = block_kv.",
        "`computed` = non-empty tiles / all tiles (FULL + PARTIAL; EMPTY tiles are never visited). "
        "FLOPs count matmuls over computed tiles: forward 2, forward + backward 9 per tile. "
        "`vs allowed` = kernel forward FLOPs / FLOPs over the allowed (query, key) pairs "
        "(1.00x = no waste at tile edges). `ms at peak` = forward + backward FLOPs / bf16 peak "
        "of one v5e / v6e chip: a lower bound, not a measurement.",
        "",
        "| T | mask | block | computed | FULL / PARTIAL | fwd TFLOP | fwd+bwd TFLOP | vs allowed | ms at peak v5e / v6e |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['length'] // 1024}K | {r['mask']} | {r['block']} | {r['frac']:.2%} | "
                     f"{r['full']} / {r['partial']} | {r['fwd'] / 1e12:.3f} | {r['fwd_bwd'] / 1e12:.3f} | "
                     f"{r['fwd'] / r['allowed']:.2f}x | {1e3 * r['fwd_bwd'] / PEAK_FLOPS['v5e']:.1f} / "
                     f"{1e3 * r['fwd_bwd'] / PEAK_FLOPS['v6e']:.1f} |")
    return "\n".join(lines)


def append_section(text: str, path: pathlib.Path = DOCS_PATH):
    """Append to docs/benchmarks.md (created with a header if absent), via a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else HEADER
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 512, 1024],
                        help="block_q = block_kv sizes to tabulate (the kernel's default is 512)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    args = parser.parse_args()

    rows = report(args.lengths, args.blocks, args.heads, args.head_dim)
    table = to_markdown(rows, args.heads, args.head_dim)
    print(table)
    if not args.no_write:
        date = datetime.date.today().isoformat()
        append_section(f"## TPU flash attention: tiles computed (`tools/tpu_tile_report.py`)\n\n"
                       f"{date}, JAX {jax.__version__}, computed on {jax.devices()[0].platform.upper()} from the "
                       f"kernel's own skip tables (device-independent; no TPU timing).\n\n{table}\n")
        print(f"\nappended to {DOCS_PATH}")


if __name__ == "__main__":
    main()
