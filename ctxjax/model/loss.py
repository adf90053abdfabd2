"""Cross-entropy without materialising [tokens, vocab] logits: the vocabulary is processed in
chunks with an online logsumexp, and each chunk's logits are recomputed in the backward pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def next_token_targets(tokens, segment_ids):
    """Targets and weights for next-token prediction inside each document of a packed row.

    Position i predicts tokens[i+1] when both lie in the same (non-padding) document. Works on
    NumPy arrays (host side, before zigzag reordering) and jax arrays alike."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    targets = xp.concatenate([tokens[:, 1:], xp.zeros_like(tokens[:, :1])], axis=1)
    next_segment = xp.concatenate([segment_ids[:, 1:], xp.zeros_like(segment_ids[:, :1])], axis=1)
    weights = (segment_ids != 0) & (next_segment == segment_ids)
    return targets, weights.astype(xp.float32)


@jax.custom_vjp
def head_logits(hidden, weight):
    """hidden [..., d] @ weight [d, V] -> float32 logits, the matmul in hidden's dtype with
    float32 accumulation; weight may be float32 (cast here).

    The backward casts the float32 cotangent to hidden's dtype before its two matmuls, as the
    backward of a bfloat16 matmul would: left to autodiff, the float32 cotangent would run
    both in float32 (TF32 on GPUs), the slowest matmuls of a large-vocabulary step
    (docs/benchmarks.md). The weight's gradient is accumulated and returned in float32."""
    return jnp.einsum("...d,dv->...v", hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _head_logits_fwd(hidden, weight):
    return head_logits(hidden, weight), (hidden, weight)


def _einsum_f32(spec, a, b):
    """einsum with float32 accumulation and output. XLA's CPU runtime has no bf16 x bf16 -> f32
    dot for every operand layout, so there the operands are widened first (the same values)."""
    accumulate = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    widened = lambda a, b: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jax.lax.platform_dependent(a, b, cpu=widened, default=accumulate)


def _head_logits_bwd(residuals, g):
    hidden, weight = residuals
    g = g.astype(hidden.dtype)
    d_hidden = _einsum_f32("...v,dv->...d", g, weight.astype(hidden.dtype))
    d_weight = _einsum_f32("...d,...v->dv", hidden, g)
    return d_hidden.astype(hidden.dtype), d_weight.astype(weight.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def chunked_cross_entropy(hidden, head_weight, targets, *, vocab_chunk: int = 8192):
    """Per-token (loss, logsumexp), float32 [B, T]; hidden [B, T, d], head_weight [d, V].

    Peak memory is [B, T, vocab_chunk] instead of [B, T, V], for one more pass over the head
    matmul in the backward (each chunk's logits are recomputed). `vocab_chunk=0` computes the
    whole [B, T, V] logits in one matmul instead: faster where the memory is there."""
    d, vocab = head_weight.shape
    if vocab_chunk <= 0 or vocab_chunk >= vocab:
        logits = head_logits(hidden, head_weight)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0], lse
    vocab_chunk = min(vocab_chunk, vocab)
    pad = (-vocab) % vocab_chunk
    w = jnp.pad(head_weight, ((0, 0), (0, pad)))  # cast per chunk: its gradient stays float32
    n_chunks = (vocab + pad) // vocab_chunk
    w = w.reshape(d, n_chunks, vocab_chunk).transpose(1, 0, 2)  # [n_chunks, d, chunk]

    @jax.checkpoint  # keep only the running statistics; recompute each chunk's logits backward
    def step(carry, xs):
        running_max, running_sum, target_logit = carry
        w_chunk, start = xs
        logits = head_logits(hidden, w_chunk)
        column = start + jnp.arange(vocab_chunk)
        logits = jnp.where(column < vocab, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
        in_chunk = (targets >= start) & (targets < start + vocab_chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(targets - start, 0, vocab_chunk - 1)[..., None], -1)[..., 0]
        target_logit = jnp.where(in_chunk, picked, target_logit)
        return (new_max, running_sum, target_logit), None

    b, t = targets.shape
    init = (jnp.full((b, t), -jnp.inf, jnp.float32), jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), jnp.float32))
    (m, s, target_logit), _ = jax.lax.scan(step, init, (w, jnp.arange(n_chunks) * vocab_chunk))
    lse = m + jnp.log(s)
    return lse - target_logit, lse


def lm_loss(hidden, head_weight, targets, weights, *, vocab_chunk: int = 8192, z_loss: float = 0.0):
    """Weighted mean next-token loss (targets and weights from `next_token_targets`, computed
    before any reordering of the sequence), plus the optional z-loss; returns (total, metrics)."""
    per_token, lse = chunked_cross_entropy(hidden, head_weight, targets, vocab_chunk=vocab_chunk)
    n = jnp.maximum(weights.sum(), 1.0)
    ce = (per_token * weights).sum() / n
    z = (jnp.square(lse) * weights).sum() / n
    return ce + z_loss * z, {"loss": ce, "z_loss": z, "tokens": weights.sum()}
