"""A Llama-family decoder-only LM in Flax NNX.

embedding -> N x [RMSNorm -> attention (GQA, RoPE) -> residual -> RMSNorm -> SwiGLU -> residual]
-> final RMSNorm -> LM head (tied or not).

The model names the logical axes of its parameters and activations and calls the attention
function it was given; it knows no mesh and no kernel (ctxjax/parallel.py builds the attention
function, the remat policy and the layer loop from the config and the mesh). Layers are stored
stacked along a leading 'layers' axis and run in blocks of the layer pattern, with lax.scan or
unrolled: with a pattern like ('local', 'local', 'global') one block runs three layers, each
with its own fixed mask terms, so a global layer carries no window term unless the SkyLadder
schedule gives one.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctxjax.mesh import constrain
from ctxjax.model import rope as rope_lib
from ctxjax.model.config import ModelConfig
from pallas_kernels.mask import MaskSpec
from pallas_kernels.reference import attention_reference

AttentionFn = Callable  # (q [B,T,Hq,D], k [B,S,Hkv,D], v, mask: MaskSpec) -> out [B,T,Hq,D]


def _reference_attention(q, k, v, mask):
    return attention_reference(q, k, v, mask)


class KVCache(NamedTuple):
    """Keys and values of every layer for generation: k/v [n_layers, B, S_max, Hkv, D], and
    `length`, the number of positions already filled (an int32 scalar)."""
    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return cls(zeros, zeros, jnp.int32(0))


def _param(rngs, shape, logical_axes, dtype, std):
    init = jax.random.normal(rngs.params(), shape, dtype) * std if std else jnp.ones(shape, dtype)
    return nnx.Param(init, logical_axes=logical_axes)


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


class Block(nnx.Module):
    """One transformer layer: pre-norm GQA attention and a SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kvh, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        out_std = std / np.sqrt(2 * cfg.n_layers)  # GPT-2 style scaled init of residual outputs
        self.cfg = cfg
        self.attn_norm = _param(rngs, (d,), ("norm",), pd, None)
        self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, std)
        self.wk = _param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pd, std)
        self.wv = _param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pd, std)
        self.wo = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, out_std)
        if cfg.qkv_bias:  # Qwen2-family checkpoints have biases on q, k and v
            self.bq = nnx.Param(jnp.zeros((h, hd), pd), logical_axes=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((kvh, hd), pd), logical_axes=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((kvh, hd), pd), logical_axes=("kv_heads", "head_dim"))
        self.mlp_norm = _param(rngs, (d,), ("norm",), pd, None)
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), pd, out_std)

    def __call__(self, x, cos, sin, mask: MaskSpec, attention: AttentionFn, cache=None):
        """x [B, T, d] -> x. With `cache` = (k, v, length) of this layer ([B, S_max, Hkv, D]),
        the new keys/values are written at `length` and attention reads the whole cache;
        returns (x, (k, v)) then."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        w = lambda p: p[...].astype(dt)
        y = rms_norm(x, self.attn_norm[...], cfg.norm_eps)
        q = jnp.einsum("btd,dhk->bthk", y, w(self.wq))
        k = jnp.einsum("btd,dhk->bthk", y, w(self.wk))
        v = jnp.einsum("btd,dhk->bthk", y, w(self.wv))
        if cfg.qkv_bias:
            q, k, v = q + w(self.bq), k + w(self.bk), v + w(self.bv)
        q = constrain(rope_lib.apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
        k = constrain(rope_lib.apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        if cache is not None:
            cache_k, cache_v, length = cache
            k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), length, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), length, axis=1)
        o = attention(q, k, v, mask)
        x = x + constrain(jnp.einsum("bthk,hkd->btd", o, w(self.wo)), ("batch", "seq", "act_embed"))
        y = rms_norm(x, self.mlp_norm[...], cfg.norm_eps)
        hidden = jax.nn.silu(y @ w(self.w_gate)) * (y @ w(self.w_up))
        hidden = constrain(hidden, ("batch", "seq", "mlp"))
        x = x + constrain(hidden @ w(self.w_down), ("batch", "seq", "act_embed"))
        return x if cache is None else (x, (k, v))


class Llama(nnx.Module):
    """The model. `attention` is the function every layer calls (default: the dense reference,
    for checks on one device); `remat_policy` a jax.checkpoint policy per layer (None: none);
    `scan_layers` False unrolls the loop over the layer pattern's repetitions."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, attention: AttentionFn = _reference_attention,
                 remat_policy=None, scan_layers: bool = True):
        self.cfg = cfg
        self.attention = attention
        self.remat_policy = remat_policy
        self.scan_layers = scan_layers
        d, v, pd = cfg.d_model, cfg.vocab_size, jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), pd, cfg.init_std)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        for _, var in nnx.iter_graph(self.blocks):  # stacked params gain a leading 'layers' axis
            if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
                var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"]))
        self.final_norm = _param(rngs, (d,), ("norm",), pd, None)
        self.lm_head = None if cfg.tie_embeddings else _param(rngs, (d, v), ("embed", "vocab"), pd, cfg.init_std)

    def head_weight(self):
        """[d_model, vocab] output projection (the embedding transposed when tied)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def hidden_states(self, tokens, segment_ids=None, token_index=None, rope_positions=None, window=None,
                      window_mask: str = "chunk", cache: KVCache | None = None):
        """Final-normed hidden states [B, T, d_model] in the compute dtype.

        `token_index` (what masks use; default 0..T-1) and `rope_positions` (what RoPE uses;
        default token_index) come from the data pipeline. `window` is the SkyLadder window of
        the global layers (a traced int32 scalar, or None for no window term), applied as a
        'chunk' (block-wise) or 'sliding' mask. With a `cache`, `tokens` continue the cached
        sequence (one document) and (hidden, new cache) is returned.
        """
        cfg = self.cfg
        b, t = tokens.shape
        kv_index = None
        if cache is not None:
            token_index = cache.length + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_index = jnp.broadcast_to(jnp.arange(cache.k.shape[2], dtype=jnp.int32), (b, cache.k.shape[2]))
            segment_ids = None
        elif token_index is None:
            token_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if rope_positions is None:
            rope_positions = token_index
        cos, sin = rope_lib.rope_cos_sin(rope_positions, cfg.rope_parameters, cfg.head_dim,
                                         cfg.max_position_embeddings)
        table = constrain(self.embed[...], (None, None))  # gathered whole for the lookup, as FSDP does
        x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(cfg.dtype))
        x = constrain(x, ("batch", "seq", "act_embed"))
        base = MaskSpec(causal=True, q_segment_ids=segment_ids if cfg.document_mask else None,
                        q_token_index=token_index, kv_token_index=token_index if kv_index is None else kv_index,
                        sinks=cfg.sinks)
        masks = [base.replace(**m.as_fields()) for m in cfg.layer_masks(window, window_mask)]
        graphdef, stacked = nnx.split(self.blocks)
        attention = self.attention

        def layer(position, x, params, layer_cache):
            block = nnx.merge(graphdef, params)
            if layer_cache is None:
                return block(x, cos, sin, masks[position], attention), None
            return block(x, cos, sin, masks[position], attention, (*layer_cache, cache.length))

        if self.remat_policy is not None:
            layer = jax.checkpoint(layer, policy=self.remat_policy, static_argnums=(0,))

        def run_group(x, group):
            """The layers of one repetition of the pattern (or the remainder), in order."""
            params, group_cache = group
            new_cache = []
            for position in range(jax.tree.leaves(params)[0].shape[0]):
                pick = lambda tree: jax.tree.map(lambda a: a[position], tree)
                x, kv = layer(position, x, pick(params), None if group_cache is None else pick(group_cache))
                new_cache.append(kv)
            stack = None if group_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_cache)
            return x, stack

        period = len(cfg.layer_pattern)
        repeats, rest = divmod(cfg.n_layers, period)
        layers_cache = None if cache is None else (cache.k, cache.v)
        head = lambda a: a[:repeats * period].reshape(repeats, period, *a.shape[1:])
        new_cache = []
        if repeats:
            groups = jax.tree.map(head, (stacked, layers_cache))
            if self.scan_layers:
                x, ys = jax.lax.scan(run_group, x, groups)
            else:  # the same groups in a Python loop: what a layer saves for the backward stays in place
                outputs = []
                for r in range(repeats):
                    x, y = run_group(x, jax.tree.map(lambda a: a[r], groups))
                    outputs.append(y)
                ys = None if outputs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outputs)
            new_cache.append(None if ys is None else jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), ys))
        if rest:  # layers that do not fill a whole pattern
            x, ys = run_group(x, jax.tree.map(lambda a: a[repeats * period:], (stacked, layers_cache)))
            new_cache.append(ys)
        hidden = rms_norm(x, self.final_norm[...], cfg.norm_eps)
        if cache is None:
            return hidden
        k, v = (jnp.concatenate(parts) for parts in zip(*new_cache))
        return hidden, KVCache(k, v, cache.length + t)

    def __call__(self, tokens, segment_ids=None, token_index=None, rope_positions=None, window=None,
                 window_mask: str = "chunk"):
        """Logits [B, T, vocab] in float32. (Training uses the vocab-chunked loss instead.)"""
        h = self.hidden_states(tokens, segment_ids, token_index, rope_positions, window, window_mask)
        return self.logits(h)

    def logits(self, hidden):
        logits = jnp.einsum("btd,dv->btv", hidden, self.head_weight().astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))


def logical_axes(model: nnx.Module):
    """The pytree (matching nnx.state(model, nnx.Param)) of each parameter's logical axes."""
    params = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(cfg: ModelConfig, **runtime) -> Llama:
    """The model with ShapeDtypeStructs for parameters (no memory, no compute)."""
    return nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0), **runtime))


def init_params(cfg: ModelConfig, seed: int = 0, shardings=None, **runtime):
    """(graphdef, params as a pure dict), created under jit: fast, and directly in `shardings`
    (a matching tree of shardings) when given, so no device ever holds the whole model.
    `runtime`: the model's attention, remat_policy and scan_layers."""
    graphdef = nnx.graphdef(abstract_model(cfg, **runtime))
    create = lambda: nnx.to_pure_dict(nnx.state(Llama(cfg, nnx.Rngs(seed), **runtime), nnx.Param))
    return graphdef, jax.jit(create, out_shardings=shardings)()
