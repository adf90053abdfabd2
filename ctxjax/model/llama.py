"""A Llama-family decoder-only LM in Flax NNX.

embedding -> N x [RMSNorm -> attention (GQA, RoPE) -> residual -> RMSNorm -> SwiGLU -> residual]
-> final RMSNorm -> LM head (tied or not). Layers are stacked along a leading 'layers' axis and
run with lax.scan under a rematerialisation policy. Every parameter and activation names its
logical axes; ctxjax.mesh maps them to devices, so this file knows nothing about meshes.

Per-layer attention pattern: each layer is 'global' or 'local' (a sliding window), repeating,
e.g. ('local', 'local', 'global'); 'local:2048' gives a layer its own window size. The
SkyLadder window (a traced scalar) applies to the global layers, as a chunked (default) or
sliding window.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import ml_collections

from ctxjax.attention import MaskSpec, attention
from ctxjax.mesh import constrain
from ctxjax.model import rope as rope_lib

NO_LIMIT = 1 << 30  # a window/chunk that never binds, for layers without that term


def head_dim_of(cfg) -> int:
    return cfg.head_dim or cfg.d_model // cfg.n_heads


def _param(rngs, shape, logical_axes, dtype, std):
    init = jax.random.normal(rngs.params(), shape, dtype) * std if std else jnp.ones(shape, dtype)
    return nnx.Param(init, logical_axes=logical_axes)


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def layer_windows(cfg) -> list[int | None]:
    """Sliding-window size of each layer from cfg.layer_pattern (None for global layers)."""
    pattern = tuple(cfg.layer_pattern)
    windows = []
    for i in range(cfg.n_layers):
        kind = pattern[i % len(pattern)]
        if kind == "global":
            windows.append(None)
        elif kind == "local":
            windows.append(int(cfg.local_window))
        elif isinstance(kind, str) and kind.startswith("local:"):
            windows.append(int(kind.split(":", 1)[1]))
        else:
            raise ValueError(f"layer_pattern entry {kind!r} is not 'global', 'local' or 'local:<window>'.")
    return windows


class Block(nnx.Module):
    """One transformer layer: pre-norm GQA attention and a SwiGLU MLP."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        d, h, kvh, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim_of(cfg), cfg.mlp_dim
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

    def __call__(self, x, cos, sin, mask: MaskSpec):
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
        o = attention(q, k, v, mask, implementation=cfg.attention_impl,
                      context_strategy=cfg.context_strategy,
                      deterministic=cfg.attention_deterministic)
        x = x + constrain(jnp.einsum("bthk,hkd->btd", o, w(self.wo)), ("batch", "seq", "act_embed"))
        y = rms_norm(x, self.mlp_norm[...], cfg.norm_eps)
        hidden = jax.nn.silu(y @ w(self.w_gate)) * (y @ w(self.w_up))
        hidden = constrain(hidden, ("batch", "seq", "mlp"))
        return x + constrain(hidden @ w(self.w_down), ("batch", "seq", "act_embed"))


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "offload":
        if jax.default_backend() == "cpu":  # host memory is device memory: keep the matmul outputs
            return jax.checkpoint(fn, policy=_REMAT_POLICIES["save_matmuls"])
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.offload_dot_with_no_batch_dims(
            "device", "pinned_host"))
    if policy not in _REMAT_POLICIES:
        raise ValueError(f"model.remat={policy!r}; choose 'none', 'full', 'save_matmuls' or 'offload'.")
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy])


class Llama(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: it is static graph data
        self.cfg = cfg
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

    def _per_layer_mask_terms(self, window, window_mask):
        """Per-layer (window, chunk) arrays [n_layers] and which terms exist at all (static)."""
        cfg = self.cfg
        local = layer_windows(cfg)
        sky_sliding = window is not None and window_mask == "sliding"
        sky_chunk = window is not None and window_mask == "chunk"
        if window is not None and window_mask not in ("chunk", "sliding"):
            raise ValueError(f"window_mask={window_mask!r}; choose 'chunk' or 'sliding'.")
        has_window = any(w is not None for w in local) or sky_sliding
        windows = chunks = None
        if has_window:
            windows = jnp.stack([jnp.int32(w) if w is not None else
                                 (jnp.asarray(window, jnp.int32) if sky_sliding else jnp.int32(NO_LIMIT))
                                 for w in local])
        if sky_chunk:
            chunks = jnp.stack([jnp.int32(NO_LIMIT) if w is not None else jnp.asarray(window, jnp.int32)
                                for w in local])
        return windows, chunks

    def hidden_states(self, tokens, segment_ids=None, token_index=None, rope_positions=None, window=None,
                      window_mask: str = "chunk"):
        """Final-normed hidden states [B, T, d_model] in the compute dtype. `window` is the SkyLadder
        context window of the global layers (a traced scalar, or None), applied as a 'chunk'
        (block-wise) or 'sliding' mask."""
        cfg = self.cfg
        b, t = tokens.shape
        if token_index is None:
            token_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if rope_positions is None:
            rope_positions = token_index
        cos, sin = rope_lib.rope_cos_sin(rope_positions, cfg.rope.to_dict(), head_dim_of(cfg),
                                         cfg.max_position_embeddings)
        table = constrain(self.embed[...], (None, None))  # gathered whole for the lookup, as FSDP does
        x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(cfg.dtype))
        x = constrain(x, ("batch", "seq", "act_embed"))
        windows, chunks = self._per_layer_mask_terms(window, window_mask)
        base_mask = MaskSpec(causal=True, q_segment_ids=segment_ids if cfg.document_mask else None,
                             q_token_index=token_index, kv_token_index=token_index, sinks=cfg.sinks)
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, xs):
            params, layer_window, layer_chunk = xs
            mask = base_mask.replace(window=layer_window, chunk=layer_chunk)
            return nnx.merge(graphdef, params)(x, cos, sin, mask), None

        x, _ = jax.lax.scan(_remat(layer, cfg.remat), x, (stacked, windows, chunks))
        return rms_norm(x, self.final_norm[...], cfg.norm_eps)

    def __call__(self, tokens, segment_ids=None, token_index=None, rope_positions=None, window=None,
                 window_mask: str = "chunk"):
        """Logits [B, T, vocab] in float32. (Training uses the vocab-chunked loss instead.)"""
        h = self.hidden_states(tokens, segment_ids, token_index, rope_positions, window, window_mask)
        logits = jnp.einsum("btd,dv->btv", h, self.head_weight().astype(h.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))


def logical_axes(model: nnx.Module):
    """The pytree (matching nnx.state(model, nnx.Param)) of each parameter's logical axes."""
    params = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def count_params(cfg, *, embedding: bool = True) -> int:
    d, hd, f, L = cfg.d_model, head_dim_of(cfg), cfg.mlp_dim, cfg.n_layers
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * f + 2 * d
    per_layer += hd * (cfg.n_heads + 2 * cfg.n_kv_heads) if cfg.qkv_bias else 0
    total = L * per_layer + d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    return total + head + (cfg.vocab_size * d if embedding else 0)


def matmul_flops_per_token(cfg) -> float:
    """Training FLOPs per token of the dense matmuls (6 x the matmul parameters; attention's
    score/value products are counted separately, over the actual mask)."""
    biases = head_dim_of(cfg) * (cfg.n_heads + 2 * cfg.n_kv_heads) if cfg.qkv_bias else 0
    matmul_params = count_params(cfg, embedding=False) - cfg.n_layers * (2 * cfg.d_model + biases) - cfg.d_model
    if cfg.tie_embeddings:
        matmul_params += cfg.vocab_size * cfg.d_model  # the tied head is still a matmul
    return 6.0 * matmul_params


def init_params(cfg, seed: int = 0, shardings=None):
    """(graphdef, params as a pure dict), created under jit: fast, and directly in `shardings`
    (a matching tree of shardings) when given, so no device ever holds the whole model."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(seed))))
    create = lambda: nnx.to_pure_dict(nnx.state(Llama(cfg, nnx.Rngs(seed)), nnx.Param))
    return graphdef, jax.jit(create, out_shardings=shardings)()
