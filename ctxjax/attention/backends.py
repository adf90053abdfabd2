"""The attention backends: one table, name -> how to call it and what it supports.

`auto`, the context-parallel halves and every refusal message are derived from this table
(ctxjax/parallel.py reads it once at start-up). Every backend implements the mask algebra of
`pallas_kernels.mask` (docs/architecture.md, "The mask algebra") for the terms it lists:

  documents    segment ids (packed documents)
  window       a sliding window
  chunk        a chunked (block-wise) window
  sinks        the first n keys visible to every query
  traced       window / chunk / sinks as traced scalars (a SkyLadder schedule)
  positions    explicit token_index arrays (the zigzag order of context parallelism); without
               it the backend needs rows in natural order, 0..L-1

Kernels are imported only when a backend is used.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.mask import MaskSpec

TERMS = frozenset({"documents", "window", "chunk", "sinks", "traced", "positions"})
# Names of attention's residuals (output and logsumexp) in every custom VJP that wraps a backend:
# the 'save_attention' remat policy keeps them, so the backward never reruns the forward.
RESIDUAL_NAMES = ("attention_out", "attention_lse")


class Functions(NamedTuple):
    """A backend's callables for one platform.
    attention(q, k, v, mask, *, scale) -> out (differentiable);
    forward(q, k, v, mask, *, scale) -> (out, lse [B, Hq, T] float32);
    backward(q, k, v, mask, out, lse, dout, *, scale) -> (dq, dk, dv), with out/lse possibly
    merged over several K/V shards (ring attention). forward/backward are None when the
    backend has no halves (it cannot run under context parallelism)."""
    attention: Callable
    forward: Callable | None
    backward: Callable | None


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    platforms: tuple[str, ...]  # device platforms it runs on
    terms: frozenset  # mask terms it can apply (see the module docstring)
    has_halves: bool  # forward/backward halves: usable under context parallelism
    mosaic: bool  # a Mosaic kernel: XLA cannot partition it, so it runs inside shard_map
    build: Callable[[str, bool], Functions]  # (platform, deterministic) -> Functions
    dtypes: tuple[str, ...] | None = None  # input dtypes it takes; None = any
    head_dims: tuple[int, ...] | None = None  # None = any
    hopper_only: bool = False

    def problems(self, *, platform: str, hopper: bool, dtype, head_dim: int, terms, halves: bool) -> list[str]:
        """Why this backend cannot run these inputs (empty when it can)."""
        out = []
        if platform not in self.platforms:
            out.append(f"it runs on {'/'.join(self.platforms)}, not {platform}")
        elif self.hopper_only and not hopper:
            out.append("it needs a Hopper GPU (H100/H200, compute capability 9.0)")
        if self.dtypes is not None and jnp.dtype(dtype).name not in self.dtypes:
            out.append(f"it takes {'/'.join(self.dtypes)} inputs, not {jnp.dtype(dtype).name} "
                       f"(set model.dtype)")
        if self.head_dims is not None and head_dim not in self.head_dims:
            out.append(f"it takes head_dim {' or '.join(map(str, self.head_dims))}, not {head_dim}")
        missing = sorted(set(terms) - self.terms)
        if missing:
            out.append("it cannot apply " + ", ".join(_TERM_WORDS[t] for t in missing))
        if halves and not self.has_halves:
            out.append("it has no forward/backward halves for context parallelism")
        return out


_TERM_WORDS = {
    "documents": "document masks (model.document_mask)",
    "window": "sliding windows (local layers or skyladder.mask='sliding')",
    "chunk": "chunked windows (SkyLadder, skyladder.mask='chunk')",
    "sinks": "attention sinks (model.sinks)",
    "traced": "a window that changes during training (skyladder.enabled)",
    "positions": "explicit token positions (the zigzag order of context parallelism)",
}


# ---------------------------------------------------------------------------------- builders

def _xla(platform, deterministic):
    from pallas_kernels.reference import attention_reference
    forward = functools.partial(attention_reference, return_lse=True)
    return Functions(attention_reference, forward, None)


def _blockwise(platform, deterministic):
    from pallas_kernels import blockwise
    return Functions(blockwise.blockwise_attention, blockwise.blockwise_attention_fwd,
                     blockwise.blockwise_attention_bwd)


def _cudnn(platform, deterministic):
    def attention(q, k, v, mask: MaskSpec, *, scale=None):
        window = mask.window
        window = None if window is None else (window - 1, 0 if mask.causal else window - 1)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=mask.causal,
                                            local_window_size=window, implementation="cudnn")
    return Functions(attention, None, None)


def _pallas_gpu(platform, deterministic):
    from pallas_kernels import gpu
    return Functions(functools.partial(gpu.flash_attention, deterministic=deterministic), gpu.flash_attention_fwd,
                     functools.partial(gpu.flash_attention_bwd, deterministic=deterministic))


def _tpu_interpret(platform):
    """Compile for the TPU when the devices are TPUs (also ahead of time from a CPU host), else
    run the kernel in TPU interpret mode (tests on CPU)."""
    from jax.experimental.pallas import tpu as pltpu
    return False if platform == "tpu" else pltpu.InterpretParams()


def _pallas_tpu(platform, deterministic):
    from pallas_kernels import tpu
    interpret = _tpu_interpret(platform)
    bind = lambda f: functools.partial(f, interpret=interpret)
    return Functions(bind(tpu.flash_attention), bind(tpu.flash_attention_fwd), bind(tpu.flash_attention_bwd))


def _splash(platform, deterministic):
    from pallas_kernels.tpu import splash
    return Functions(functools.partial(splash.splash_attention, interpret=_tpu_interpret(platform)), None, None)


BACKENDS = {b.name: b for b in (
    Backend("xla", "dense XLA attention over a materialised mask (O(T*S) memory; for checks)",
            platforms=("cpu", "gpu", "tpu"), terms=TERMS, has_halves=False, mosaic=False, build=_xla),
    Backend("xla_blockwise", "XLA online-softmax attention over key blocks, skipping empty blocks",
            platforms=("cpu", "gpu", "tpu"), terms=TERMS, has_halves=True, mosaic=False, build=_blockwise),
    Backend("cudnn", "cuDNN flash attention via jax.nn.dot_product_attention",
            platforms=("gpu",), terms=frozenset({"window"}), has_halves=False, mosaic=False, build=_cudnn,
            dtypes=("bfloat16", "float16")),
    Backend("pallas_gpu", "the Hopper flash kernel (Pallas Mosaic GPU), block skipping",
            platforms=("gpu",), terms=TERMS, has_halves=True, mosaic=True, build=_pallas_gpu,
            dtypes=("bfloat16", "float16"), head_dims=(64, 128), hopper_only=True),
    Backend("pallas_tpu", "the Pallas TPU flash kernel, block skipping",
            platforms=("tpu", "cpu"), terms=TERMS, has_halves=True, mosaic=True, build=_pallas_tpu,
            dtypes=("bfloat16", "float32")),
    Backend("splash", "JAX's splash attention (static masks only)",
            platforms=("tpu", "cpu"), terms=frozenset({"documents", "window"}), has_halves=False, mosaic=True,
            build=_splash),
)}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)


def is_hopper(device) -> bool:
    """sm_90 exactly: the Mosaic GPU kernels use Hopper-only wgmma."""
    return device.platform == "gpu" and getattr(device, "compute_capability", "") == "9.0"


def resolve(name: str, *, device, dtype, head_dim: int, terms=(), halves: bool = False) -> Backend:
    """The backend `name` ('auto' chosen from the device and inputs) after checking that it can
    run them; raises one ValueError naming every reason and what to choose instead."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKEND_NAMES}.")
    facts = dict(platform=device.platform, hopper=is_hopper(device), dtype=dtype, head_dim=head_dim,
                 terms=frozenset(terms), halves=halves)
    if name == "auto":
        preferred = {"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",)}.get(device.platform, ())
        for candidate in preferred + ("xla_blockwise",):
            if not BACKENDS[candidate].problems(**facts):
                return BACKENDS[candidate]
        raise AssertionError("xla_blockwise runs everything")
    backend = BACKENDS[name]
    problems = backend.problems(**facts)
    if problems:
        usable = [b for b in BACKENDS if not BACKENDS[b].problems(**facts)]
        raise ValueError(f"attention backend {name!r} cannot run this model here: " + "; ".join(problems)
                         + f". Backends that can: {usable} (or 'auto').")
    return backend


def mask_terms(mask: MaskSpec) -> frozenset:
    """The terms a MaskSpec uses (for single calls; the trainer derives them from its config)."""
    static = lambda x: x is None or isinstance(x, int)
    terms = set()
    if mask.has_segments:
        terms.add("documents")
    if mask.window is not None:
        terms.add("window")
    if mask.chunk is not None:
        terms.add("chunk")
    if not (isinstance(mask.sinks, int) and mask.sinks == 0):
        terms.add("sinks")
    if not all(static(x) for x in (mask.window, mask.chunk, mask.sinks)):
        terms.add("traced")
    if mask.q_token_index is not None or mask.kv_token_index is not None:
        terms.add("positions")
    return frozenset(terms)


def attend(q, k, v, mask: MaskSpec | None = None, *, backend: str = "auto", scale=None,
           deterministic: bool = True):
    """One attention call on the default device (no mesh): q [B,T,Hq,D], k/v [B,S,Hkv,D] -> out.
    For notebooks, tests and benchmarks; training builds its attention in ctxjax.parallel."""
    mask = MaskSpec() if mask is None else mask
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q [B,T,Hq,D] and k = v [B,S,Hkv,D] with the same B and D; "
                         f"got {q.shape}, {k.shape}, {v.shape}.")
    device = jax.devices()[0]
    chosen = resolve(backend, device=device, dtype=q.dtype, head_dim=q.shape[-1], terms=mask_terms(mask))
    return chosen.build(device.platform, deterministic).attention(q, k, v, mask, scale=scale)
