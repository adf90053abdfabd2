"""Sampling text from a trained or imported model:

    python -m ctxjax.sample --workdir=runs/tiny --prompt="def fib(n):" [--max_new_tokens=200
        --temperature=0.8 --top_k=50 --top_p=0.95 --seed=0 --step=N --num_samples=1]

and, for notebooks, `generate(model, prompt_tokens, max_new_tokens=...)` on a model from
`ctxjax.load_model`.

How it runs. The prompt is run through the model once (prefill) into an empty KVCache; then
each new token is one step of the model over that token alone, against the cache. Both are
compiled with jax.jit:

- prefill: one program per (batch, padded prompt length, cache length). Prompts are padded on
  the right to a multiple of `pad_to` tokens so that prompts of nearby lengths share it; the
  padding cannot leak into the result: causal masking hides keys past the prompt from every
  query until a decode step overwrites them (the cache's length is set back to the prompt's),
  the logits are read at the last real token, and RoPE positions of the padding are clamped so
  that length-dependent RoPE (dynamic NTK, LongRoPE) sees the real prompt length.
- decode: ONE compiled `lax.while_loop` over the new tokens; its body (choose a token from the
  logits, write it, run the model on it against the cache) is compiled once per (batch, cache
  length) and reused for every token. The number of new tokens, the prompt length, the
  temperature, top_k, top_p, the seed and EOS are all traced, so changing them within a cache
  bucket never recompiles (the top-k/top-p sort sits behind a lax.cond and runs only when a
  filter is on). One loop inside one program rather than a Python loop over a jitted step: no
  host round trip per token (for the 3M-parameter demo model on 2 CPU cores, a Python loop over
  a jitted step cost ~1 ms more per token, ~25%), and the loop ends as soon as every row has
  produced EOS. The price: no token streaming.

Sampling follows Hugging Face's `generate`: temperature, then top-k (`TopKLogitsWarper`: keep
the logits >= the k-th largest), then top-p (`TopPLogitsWarper`: keep the smallest set of most
likely tokens whose probability sums to >= top_p, at least one), then a categorical draw;
temperature 0 is greedy (argmax, top-k/top-p ignored). A batch is several prompts of one
length (e.g. one prompt repeated for several samples); each row stops at EOS and is padded with
EOS after it.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctxjax.model.llama import KVCache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def filter_logits(logits, top_k, top_p):
    """`logits` [B, V] (float32, already divided by the temperature) with the tokens outside
    top-k and then top-p set to -inf, as HF's TopKLogitsWarper followed by TopPLogitsWarper.
    `top_k` <= 0 or >= V and `top_p` >= 1 keep every token; both may be traced."""
    v = logits.shape[-1]
    k = jnp.where((top_k <= 0) | (top_k > v), v, top_k).astype(jnp.int32)
    ranked = -jnp.sort(-logits, axis=-1)  # descending
    kth = jax.lax.dynamic_index_in_dim(ranked, k - 1, axis=-1, keepdims=True)
    ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)  # ties with the k-th stay, as in HF
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    keep = (before < top_p) | (top_p >= 1.0)
    keep = keep.at[..., 0].set(True)  # at least one token
    threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= jnp.maximum(threshold, kth), logits, -jnp.inf)


def _choose(logits, key, temperature, top_k, top_p):
    """Next tokens [B] from logits [B, V] float32: greedy when temperature == 0, else a draw
    after the temperature and (when top_k > 0 or top_p < 1) the top-k / top-p filter. All
    traced: one compiled program serves every setting; the filter's sort runs only when on."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), lambda x: filter_logits(x, top_k, top_p), lambda x: x,
                          scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, tokens, prompt_len, *, cache_len):
    """(cache holding the prompt, logits [B, V] at its last token). `tokens` [B, P_padded]."""
    model = nnx.merge(graphdef, state)
    b, padded = tokens.shape
    cache = KVCache.empty(model.cfg, b, cache_len)
    positions = jnp.minimum(jnp.arange(padded, dtype=jnp.int32), prompt_len - 1)
    hidden, cache = model.hidden_states(tokens, rope_positions=jnp.broadcast_to(positions, (b, padded)),
                                        cache=cache)
    last = jax.lax.dynamic_slice_in_dim(hidden, prompt_len - 1, 1, axis=1)
    return cache._replace(length=jnp.asarray(prompt_len, jnp.int32)), model.logits(last)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "return_logits"))
def _decode(graphdef, state, cache, logits, seq, num_tokens, key, temperature, top_k, top_p, eos_id, *,
            return_logits):
    """The decode loop. `seq` [B, S] holds the prompt and the fill value after it; token i is
    written at position cache.length + i. Returns (seq, the logits each token was chosen from
    [B, S, V] or None, the number of steps run: fewer than num_tokens when every row stopped)."""
    model = nnx.merge(graphdef, state)
    start = cache.length
    b = seq.shape[0]
    record = jnp.zeros(seq.shape + logits.shape[-1:], jnp.float32) if return_logits else None

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < num_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, seq, done, record = carry
        token = _choose(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
        token = jnp.where(done, eos_id, token)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, token[:, None], start + step, axis=1)
        if record is not None:
            record = jax.lax.dynamic_update_slice_in_dim(record, logits[:, None], start + step, axis=1)
        done = done | ((token == eos_id) & (eos_id >= 0))
        hidden, cache = model.hidden_states(token[:, None], cache=cache)
        return step + 1, cache, model.logits(hidden)[:, 0], seq, done, record

    carry = (jnp.int32(0), cache, logits, seq, jnp.zeros((b,), bool), record)
    step, _, _, seq, _, record = jax.lax.while_loop(cond, body, carry)
    return seq, record, step


def generate(model, prompt_tokens, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, pad_to: int = 64,
             return_logits: bool = False):
    """Continue `prompt_tokens` with `model` (a ctxjax Llama, e.g. from `ctxjax.load_model`).

    prompt_tokens: one prompt (a list / 1-D array of ids) or a batch of prompts of one length
        ([B, P]); P >= 1 (prepend BOS yourself if the model was trained with it).
    max_new_tokens: how many tokens to generate per row.
    temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0: all). top_p: nucleus sampling (1.0: all).
    seed: the sampling seed (rows draw independently).
    eos_id: a row stops at this token and is filled with it afterwards (None: never stops).
    pad_to: prompt and cache lengths are rounded up to a multiple of this, so prompts of nearby
        lengths reuse the compiled programs (1: no padding).
    return_logits: also return the float32 logits each new token was chosen from (before the
        temperature and filtering), [.., max_new_tokens, vocab]; zeros for the steps not run
        because every row had stopped at EOS.

    Returns the new tokens as int32 NumPy, [max_new_tokens] for one prompt or
    [B, max_new_tokens] for a batch (and the logits with `return_logits`). The model runs with
    its own attention function and compute dtype (config.model.dtype).
    """
    try:
        prompt = np.asarray(prompt_tokens)
    except ValueError:  # ragged
        prompt = np.empty(0)
    single = prompt.ndim == 1
    prompt = prompt[None] if single else prompt
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_tokens must be a non-empty list of ids or a [batch, length] array of prompts "
                         f"of one length; got shape {np.shape(prompt_tokens)}.")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be integer token ids, got dtype {prompt.dtype}.")
    cfg = model.cfg
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}) (the model's vocab_size); "
                         f"got {prompt.min()}..{prompt.max()}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy).")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1: no nucleus filtering).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0: no top-k filtering).")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id={eos_id} is not a token id of this model (vocab_size {cfg.vocab_size}).")
    pad_to = max(int(pad_to), 1)
    b, p = prompt.shape
    total = p + max_new_tokens
    if total > cfg.max_position_embeddings:
        warnings.warn(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) = {total} tokens is more than the "
                      f"model's max_position_embeddings ({cfg.max_position_embeddings}): positions past it "
                      f"are beyond what it was trained on unless its RoPE scaling extends it.", stacklevel=2)

    cache_len = _round_up(total, pad_to)
    padded = min(_round_up(p, pad_to), cache_len)
    tokens = np.zeros((b, padded), np.int32)
    tokens[:, :p] = prompt
    fill = -1 if eos_id is None else int(eos_id)
    seq = np.full((b, cache_len), max(fill, 0), np.int32)
    seq[:, :p] = prompt

    graphdef, state = nnx.split(model)
    cache, logits = _prefill(graphdef, state, jnp.asarray(tokens), jnp.int32(p), cache_len=cache_len)
    seq, record, _ = _decode(graphdef, state, cache, logits, jnp.asarray(seq), jnp.int32(max_new_tokens),
                             jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                             jnp.int32(fill), return_logits=return_logits)
    new = np.asarray(seq)[:, p:total]
    new = new[0] if single else new
    if not return_logits:
        return new
    record = np.asarray(record)[:, p:total]
    return new, (record[0] if single else record)


def continuation_text(tokenizer, tokens, eos_id=None) -> str:
    """The text of generated `tokens`, cut before the first EOS."""
    tokens = [int(t) for t in tokens]
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[:tokens.index(eos_id)]
    return tokenizer.decode(tokens)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def _fail(message: str):
    sys.exit(f"ctxjax.sample: error: {message}")


def sample_run(workdir: str, prompt: str, *, step=None, num_samples: int = 1, attention: str = "xla_blockwise",
               **sampling) -> tuple[list[str], object]:
    """(continuations of `prompt`, the run's config) from the model of `workdir`."""
    from ctxjax.checkpoint import load_model
    from ctxjax.data import make_tokenizer

    model, config = load_model(workdir, step, attention=attention)
    tokenizer = make_tokenizer(config.data)
    ids = tokenizer.encode(prompt)
    if config.data.get("add_bos", False) and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids  # documents began with BOS in training
    prompts = np.tile(np.asarray(ids, np.int32), (num_samples, 1))
    tokens = generate(model, prompts, eos_id=tokenizer.eos_id, **sampling)
    return [continuation_text(tokenizer, row, tokenizer.eos_id) for row in tokens], config


def argument_error(workdir, prompt, num_samples: int = 1) -> str | None:
    """What is wrong with the command line's workdir / prompt, in one line (None: nothing)."""
    if not workdir:
        return ("--workdir=DIR is required (a directory written by python -m ctxjax.train or "
                "tools/convert_from_hf.py).")
    if not os.path.isdir(workdir):
        return f"--workdir={workdir}: no such directory."
    if not os.path.exists(os.path.join(workdir, "config.json")):
        return f"--workdir={workdir} has no config.json: not a ctxjax workdir (python -m ctxjax.train --workdir=...)."
    if not prompt:
        return '--prompt is empty; give the text to continue, e.g. --prompt="def fib(n):".'
    if num_samples < 1:
        return f"--num_samples={num_samples} must be >= 1."
    return None


def main(argv):
    from absl import flags, logging
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; pass the prompt as --prompt=\"...\".")
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # keep Orbax/JAX info chatter off the text
        logging.set_verbosity(logging.WARNING)
    problem = argument_error(FLAGS.workdir, FLAGS.prompt, FLAGS.num_samples)
    if problem:
        _fail(problem)
    try:
        texts, _ = sample_run(FLAGS.workdir, FLAGS.prompt, step=FLAGS.step, num_samples=FLAGS.num_samples,
                              attention=FLAGS.attention, max_new_tokens=FLAGS.max_new_tokens,
                              temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                              seed=FLAGS.seed)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e).split("\n")[0])
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} of {len(texts)} ---")
        print(FLAGS.prompt + text, flush=True)


def define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "A ctxjax workdir (trained, or imported from Hugging Face).")
    flags.DEFINE_string("prompt", None, "The text to continue.")
    flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 for greedy decoding.")
    flags.DEFINE_integer("top_k", 50, "Sample from the k most likely tokens only (0: all).")
    flags.DEFINE_float("top_p", 0.95, "Nucleus sampling: the smallest set of most likely tokens with this much "
                      "probability (1: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("num_samples", 1, "Independent samples of the prompt (one batch).")
    flags.DEFINE_string("attention", "xla_blockwise",
                        "Attention backend. xla_blockwise runs any query length on every platform (a decode "
                        "step is one query against the cache); 'auto' picks the device's training kernel "
                        "(Pallas on Hopper GPUs and TPUs), not tested on decode steps.")


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
