"""Every default and every check of a ctxjax run, in one place.

An experiment is a small Python file whose `get_config()` starts from `ctxjax.config.get_config()`
and changes a few values (see configs/). On the command line, `--config=configs/x.py
--config.a.b=v` overrides values; a key that does not exist or a value of the wrong type is
rejected, naming the key. `validate_config` then checks the values against each other, before
anything is written. Option names are defined once, here or by the module that implements them,
and imported everywhere else.

Sections:
  model       the architecture (what a checkpoint holds); `ModelConfig.from_config` types it
  parallel    how it runs: attention backend, determinism, context-parallel strategy, remat,
              layer loop
  mesh        device mesh sizes
  data        sources, tokenizer, packing, positions, curriculum
  optim       AdamW, learning-rate schedule, clipping, accumulation, z-loss
  skyladder   the context-window schedule (off by default)
  train       sequence length, batch, steps, logging, profiling
  checkpoint  saving, keeping, starting from another run
  eval        validation loss during and after training
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from ctxjax.attention.backends import BACKEND_NAMES
from ctxjax.attention.context_parallel import STRATEGIES
from ctxjax.data.sources import KINDS as SOURCE_KINDS

REMAT_POLICIES = ("none", "full", "save_matmuls", "save_attention", "offload")
LAYER_LOOPS = ("auto", "scan", "unrolled")
PACKINGS = ("first_fit", "concat")
ROPE_POSITIONS = ("reset", "continuous", "pose")
LONG_DOCUMENTS = ("split_keep", "split_drop")
SOURCE_KEYS = ("kind", "path", "text_field", "weight")
FREE_FORM = ("model.rope",)  # dicts whose keys depend on their type (checked by their owner)

# Keys of earlier versions -> where they live now (config files and saved config.json of
# existing runs keep loading).
LEGACY_KEYS = {
    "model.attention_impl": "parallel.attention",
    "model.attention_deterministic": "parallel.deterministic",
    "model.context_strategy": "parallel.context_strategy",
    "model.remat": "parallel.remat",
}


def get_config() -> ml_collections.ConfigDict:
    """The defaults of every knob, each documented once."""
    config = ml_collections.ConfigDict()

    # ------------------------------------------------------------------ model (architecture)
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=259,  # byte tokenizer: 256 bytes + BOS/EOS/PAD (configs set it from their tokenizer)
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,  # GQA: n_heads must be a multiple
        head_dim=0,  # 0 = d_model // n_heads; may differ (e.g. Gemma-style 256)
        mlp_dim=768,  # SwiGLU hidden size
        norm_eps=1e-5,
        tie_embeddings=False,
        qkv_bias=False,  # biases on the q/k/v projections (Qwen2 family)
        init_std=0.02,
        max_position_embeddings=2048,  # the length RoPE scalings are relative to
        rope={"rope_type": "default", "rope_theta": 10000.0},  # HF transformers 5.x `rope_parameters`
        layer_pattern=("global",),  # repeating; entries 'global', 'local' or 'local:<window>'
        local_window=1024,  # window of 'local' layers
        document_mask=True,  # attend only within a document of a packed row
        sinks=0,  # first n tokens of each row visible to every later query (Λ-shape / anchor)
        param_dtype="float32",
        dtype="bfloat16",  # compute dtype
    ))

    # ------------------------------------------------------------------ parallel (how it runs)
    config.parallel = ml_collections.ConfigDict(dict(
        # Attention backend: 'auto' (Pallas TPU kernel on TPU, the Hopper kernel on H100/H200 for
        # the inputs it takes, XLA blockwise otherwise) or one of BACKEND_NAMES. A backend that
        # cannot run this model's masks on this mesh is refused at start-up, naming the reason.
        attention="auto",
        # False lets the Hopper kernel fuse its backward (dQ reduce-added in float32: faster
        # for causal masks, gradients vary in the last bits between runs).
        deterministic=True,
        # With mesh.context > 1: 'ring' (zigzag load-balanced; moves only the keys a bounded
        # window needs), 'all_gather', 'ulysses' (all-to-all to heads), or 'hybrid' (Ulysses over
        # mesh.ulysses inside the ring over mesh.context). docs/context_parallel.md compares them.
        context_strategy="ring",
        # Activation rematerialisation per layer: 'none', 'full', 'save_attention' (keep
        # attention's output and logsumexp, so the backward never reruns the attention forward),
        # 'save_matmuls' (keep those and every matmul output), 'offload' (matmul outputs to host
        # memory).
        remat="full",
        # How the layers run: 'scan' (a loop over one compiled block of the layer pattern: fast
        # compiles), 'unrolled' (each layer compiled in place: what a remat policy keeps is not
        # copied in and out of the loop's stacked buffers, and on GPUs XLA then keeps attention's
        # saved output instead of rerunning the kernel; compiles take longer), or 'auto':
        # unrolled on GPUs when the remat policy keeps activations (all but 'full'), where it
        # measured faster; scan otherwise ('full' ran as fast scanned, in less memory).
        layer_loop="auto",
    ))

    # ------------------------------------------------------------------ mesh
    # The product must equal the number of devices; one axis may be -1 (the rest).
    config.mesh = ml_collections.ConfigDict(dict(
        data=1, fsdp=-1, tensor=1, context=1,
        ulysses=1,  # hybrid context parallelism: the all-to-all axis inside each ring rank
        dcn_data=1, dcn_fsdp=1,  # multi-slice pods: slices along data / fsdp over DCN
    ))

    # ------------------------------------------------------------------ data
    config.data = data = ml_collections.ConfigDict()
    # A list of dicts, mixed by `weight`. Each source is packed on its own, so weights are shares
    # of packed rows, i.e. of training tokens (e.g. ProLong's 0.6 long code/books + 0.4 short).
    #   kind: 'stdlib'      the Python standard library's own .py files (no download, one
    #                       document per file; many are longer than 8K tokens)
    #         'python_packages'  every .py file of this Python: the standard library and every
    #                       site-/dist-packages directory, each content once (no download; ~300 MB
    #                       with torch, transformers and jax; the file set differs between machines:
    #                       record ctxjax.data.source_fingerprint). Held out by content hash.
    #         'text'        one document per file
    #         'jsonl'       one document per line, the text in `text_field`
    #         'parquet'     streamed row groups, the text in column `text_field`
    #         'arrayrecord' random access: token ids written by tools/build_corpus.py (a
    #                       corpus.json beside the shards), or else UTF-8 text records
    #   path: a file, a directory (every file below it), a glob ('**' recurses) or a list of
    #         them; ignored for 'stdlib'; for 'python_packages', top-level package or module
    #         names to keep (e.g. ['numpy', 'json']), empty for all
    data.sources = (dict(kind="stdlib", path="", text_field="text", weight=1.0),)
    # 'byte' (256 bytes + BOS/EOS/PAD = 259 ids), a Hugging Face tokenizer.json
    # (tools/train_tokenizer.py trains one), or a SentencePiece .model.
    data.tokenizer = "byte"
    # Special tokens of a tokenizer.json, when neither tokenizer_config.json beside it nor the
    # usual spellings (<s>, </s>, <|endoftext|>, ...) find them. Empty: look them up.
    data.bos_token = ""
    data.eos_token = ""
    data.pad_token = ""
    data.add_bos = True  # prepend BOS to every document
    data.add_eos = True  # append EOS to every document
    # 'first_fit': whole documents into the first of `packing_bins` open rows with room, the
    # rest padded (segment_ids 0); 'concat': concatenate and cut every seq_len tokens (no
    # padding; a document may continue in the next row).
    data.packing = "first_fit"
    data.packing_bins = 16  # rows open at once for first_fit: more bins, less padding, more memory
    # Documents longer than seq_len are cut into seq_len pieces (separate segments). The last,
    # shorter piece is kept ('split_keep') or dropped ('split_drop'); with 'concat', split_drop
    # trims each long document to a multiple of seq_len.
    data.long_documents = "split_keep"
    # What RoPE sees: 'reset' (0.. within each document), 'continuous' (= token_index, 0..L-1
    # along the row), 'pose' (PoSE: each document cut into `pose_chunks` chunks whose positions
    # skip ahead at random so they span up to pose_target_length; train short, attend long).
    data.rope_positions = "reset"
    data.pose_target_length = 0  # required for 'pose': the context length to simulate (> seq_len)
    data.pose_chunks = 2
    data.seed = 0  # mixed with the run's seed: change data order alone
    data.shuffle = True  # global shuffle of random-access sources, reshuffled every epoch
    data.shuffle_window = 1024  # documents: window shuffle for streaming (parquet) sources
    data.parquet_cycle_length = 4  # parquet files read at once per host
    data.read_threads = 8  # threads reading and tokenizing documents, per source
    data.read_buffer = 64  # documents read ahead per source
    # Processes per source reading + tokenizing (Grain mp_prefetch); 0: in this process. Worth it
    # when online tokenization is the bottleneck and cores are free; >1 changes the document order.
    data.worker_count = 0
    data.worker_buffer_size = 8  # documents buffered per worker process
    data.prefetch = 2  # batches assembled ahead in a background thread; 0: none
    # Sequence-length curriculum: stages ((start_step, seq_len, global_batch_size), ...), the
    # first at step 0, each keeping seq_len * global_batch_size equal to the run's tokens per
    # step. A new stage goes on with the next unread document. Empty: one stage.
    data.curriculum = ()
    # Documents held out of training by a stable hash of their key (path, line, record), the same
    # on every machine. Evaluation reads them, or `validation_sources` (same format as
    # `sources`, nothing held out) when given.
    data.validation_fraction = 0.05
    data.validation_sources = ()

    # ------------------------------------------------------------------ optim
    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 3e-4  # peak learning rate, reached at the end of warmup
    optim.warmup_steps = 100  # linear warmup from 0 (0 = none; must be < train.steps)
    # 'cosine': warmup, then cosine decay to min_lr_ratio * lr at the last step.
    # 'wsd': warmup-stable-decay: hold lr, then decay over the last decay_fraction of training.
    # 'constant': warmup, then hold lr.
    optim.schedule = "cosine"
    optim.decay_fraction = 0.2  # 'wsd' only: the fraction of all steps spent decaying, in (0, 1]
    optim.decay_shape = "1-sqrt"  # 'wsd' only: 'linear' or '1-sqrt' (Hägele et al. 2024)
    optim.min_lr_ratio = 0.1  # the final learning rate as a fraction of lr, in [0, 1]
    optim.b1 = 0.9
    optim.b2 = 0.95
    optim.eps = 1e-8
    optim.weight_decay = 0.1  # decoupled (AdamW), on matrices only
    optim.grad_clip_norm = 1.0  # clip the global gradient norm; 0 = no clipping
    optim.grad_accum_steps = 1  # micro-batches per optimizer step
    optim.z_loss = 0.0  # z_loss * logsumexp(logits)**2 per token (PaLM uses 1e-4); 0 = off

    # ------------------------------------------------------------------ skyladder
    config.skyladder = sky = ml_collections.ConfigDict()
    # Schedule the attention window of the global layers (SkyLadder). False = no window term:
    # full causal attention (within documents when document masking is on), unless
    # constant_window is set.
    sky.enabled = False
    sky.start = 32  # first window w_s in tokens (the paper uses 32)
    sky.alpha = 1 / 8  # tokens added per step (the paper's default); ignored with climb_fraction
    # Shape of the climb: 'linear' (the paper's default), 'sinusoidal', 'exponential',
    # 'cosine', 'logarithmic' or 'stepwise'.
    sky.kind = "linear"
    # Instead of alpha: reach the full sequence length at step round(climb_fraction * steps).
    sky.climb_fraction = config_dict.placeholder(float)
    # Round the window down to a multiple of this (e.g. the kernel's block size); never below
    # start or above seq_len. None = off.
    sky.multiple_of = config_dict.placeholder(int)
    # kind='stepwise' only: the jump in tokens (the paper's code uses 1024 at 8K). None = seq_len // 8.
    sky.step_size = config_dict.placeholder(int)
    # 'chunk' (block-wise, as in the paper: query i sees keys from the start of its window-sized
    # chunk) or 'sliding' (the last `window` keys). Always intersected with documents.
    sky.mask = "chunk"
    # A fixed window for every step: the constant-window baseline, used when enabled=False.
    sky.constant_window = config_dict.placeholder(int)

    # ------------------------------------------------------------------ train
    config.train = ml_collections.ConfigDict(dict(
        seq_len=512,  # packed row length L (a data curriculum may override per stage)
        global_batch_size=8,  # rows per optimizer step, across all hosts
        steps=1000,  # optimizer steps
        seed=0,
        vocab_chunk=8192,  # vocabulary chunk of the cross-entropy (memory vs. speed); 0 = whole logits at once
        log_every=10,  # steps between metrics lines (metrics.jsonl, TensorBoard, progress bar)
        peak_tflops=0.0,  # per-device peak for MFU; 0 = look it up from the device kind
        plot=True,  # write loss/window PNG at the end
        distributed=False,  # call jax.distributed.initialize (pods, multi-node GPU)
        profile_steps=(),  # (first, last): write a jax.profiler trace of these steps to WORKDIR/profile
        wandb_project="",  # also log to Weights & Biases (pip install wandb); empty = off
    ))

    # ------------------------------------------------------------------ checkpoint
    config.checkpoint = ml_collections.ConfigDict(dict(
        every=500,  # steps between saves (and always at the end)
        keep=3,  # checkpoints kept
        async_save=True,
        init_from="",  # a ctxjax workdir (or checkpoint dir) to start from: params only (extension)
        init_step=-1,  # its step to load; -1 = latest
    ))

    # ------------------------------------------------------------------ eval
    config.eval = ml_collections.ConfigDict(dict(
        every=0,  # steps between validation losses; 0 = only at the end
        batches=4,
        batch_size=4,
        seq_len=0,  # 0 = train.seq_len
    ))
    return config


# ----------------------------------------------------------------------------------------------
# Loading: config files, overrides, saved configs of earlier versions
# ----------------------------------------------------------------------------------------------

def load_config(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """get_config() of a config file, old keys translated, with dotted-key overrides
    ({"model.d_model": 512})."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found; pass e.g. configs/tiny_cpu.py.")
    spec = importlib.util.spec_from_file_location(f"_ctxjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = translate_legacy(module.get_config())
    for key, value in (overrides or {}).items():
        set_by_path(config, key, value)
    return config


def set_by_path(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Set config.a.b = value, rejecting unknown keys and wrong types with the key named."""
    *parents, leaf = dotted.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise KeyError(f"config has no key {'.'.join(parents[:i + 1])!r} (while setting {dotted!r}).")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"config has no key {dotted!r}; see ctxjax/config.py for the available keys.")
    try:
        node[leaf] = value
    except TypeError as e:
        raise TypeError(f"config key {dotted!r}: {e}") from None


def _pop(tree: dict, dotted: str):
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree.get(name) if isinstance(tree, dict) else None
        if tree is None:
            return None, False
    if not isinstance(tree, dict) or leaf not in tree:
        return None, False
    return tree.pop(leaf), True


def translate_legacy(config):
    """Move keys of earlier versions (LEGACY_KEYS) to where they live now. Works on a ConfigDict
    (returns a new one) or a plain dict from a saved config.json (returns a new dict)."""
    is_config = isinstance(config, ml_collections.ConfigDict)
    tree = config.to_dict() if is_config else _copy(config)
    for old, new in LEGACY_KEYS.items():
        value, found = _pop(tree, old)
        if found:
            section, key = new.split(".")
            tree.setdefault(section, {})[key] = value
    return ml_collections.ConfigDict(tree) if is_config else tree


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def merge_saved(saved: dict) -> ml_collections.ConfigDict:
    """Today's defaults overlaid with a saved config (a run written before a knob existed still
    loads; old keys are translated)."""
    config = get_config()
    _merge(config, translate_legacy(saved))
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
            _merge(config[key], value)
        else:
            with config.unlocked():
                config[key] = value


# ----------------------------------------------------------------------------------------------
# Checks (run before anything is written)
# ----------------------------------------------------------------------------------------------

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _unknown_key(name: str, key: str, known) -> KeyError:
    close = difflib.get_close_matches(key, list(known), n=1)
    return KeyError(f"config has no key {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                    + " See ctxjax/config.py for every knob.")


def check_known_keys(config: ml_collections.ConfigDict) -> None:
    """Every key must exist in get_config() (a typo in a config file would otherwise be ignored)."""
    def walk(node, reference, prefix):
        for key in node.keys():
            name = f"{prefix}{key}"
            if key not in reference:
                raise _unknown_key(name, key, reference.keys())
            if (isinstance(reference[key], ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict)
                    and name not in FREE_FORM):
                walk(node[key], reference[key], f"{name}.")
    walk(config, get_config(), "")


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every section and the values against each other; returns the config unchanged.
    Errors name the key and the fix."""
    from ctxjax import schedules
    from ctxjax.model.config import ModelConfig
    from ctxjax.model import rope as rope_lib

    check_known_keys(config)
    m, p, t = config.model, config.parallel, config.train
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_position_embeddings"):
        _require(_is_int(m[key]) and m[key] >= 1, f"model.{key}={m[key]!r} must be a positive integer.")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}.")
    _require(m.head_dim or m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim.")
    model = ModelConfig.from_config(m)
    _require(model.head_dim % 2 == 0, f"the head dim ({model.head_dim}) must be even for RoPE; set model.head_dim.")
    for name in ("dtype", "param_dtype"):
        import jax.numpy as jnp
        try:
            jnp.dtype(m[name])
        except TypeError:
            raise ValueError(f"invalid config: model.{name}={m[name]!r} is not a dtype (e.g. 'bfloat16').") from None
    _require(m.sinks >= 0, f"model.sinks={m.sinks} must be >= 0.")
    model.layer_windows()  # raises on a bad layer_pattern entry
    rope_lib.validate_rope(model.rope_parameters, model.head_dim, model.max_position_embeddings)

    _require(p.attention in BACKEND_NAMES, f"parallel.attention={p.attention!r}; choose one of {BACKEND_NAMES}.")
    _require(isinstance(p.deterministic, bool), f"parallel.deterministic={p.deterministic!r} must be True or False.")
    _require(p.context_strategy in STRATEGIES,
             f"parallel.context_strategy={p.context_strategy!r}; choose one of {STRATEGIES}.")
    _require(p.remat in REMAT_POLICIES, f"parallel.remat={p.remat!r}; choose one of {REMAT_POLICIES}.")
    _require(p.layer_loop in LAYER_LOOPS, f"parallel.layer_loop={p.layer_loop!r}; choose one of {LAYER_LOOPS}.")

    for axis in ("data", "fsdp", "tensor", "context", "ulysses"):
        size = config.mesh[axis]
        _require(_is_int(size) and (size >= 1 or size == -1),
                 f"mesh.{axis}={size!r}; use a positive int or -1 (the rest of the devices).")
    _require(config.mesh.ulysses == 1 or p.context_strategy == "hybrid",
             f"mesh.ulysses={config.mesh.ulysses} is only used by parallel.context_strategy='hybrid'; "
             "set it to 1 or choose 'hybrid'.")

    _require(t.steps > 0, f"train.steps={t.steps} must be positive.")
    _require(t.seq_len > 1, f"train.seq_len={t.seq_len} must be at least 2.")
    _require(t.log_every > 0, f"train.log_every={t.log_every} must be positive.")
    profile = tuple(t.profile_steps)
    _require(not profile or (len(profile) == 2 and all(_is_int(s) and s >= 1 for s in profile)
                             and profile[0] <= profile[1]),
             f"train.profile_steps={profile!r}: give (first, last) steps, 1 <= first <= last, or () for none.")
    accum = config.optim.grad_accum_steps
    _require(_is_int(accum) and accum >= 1 and t.global_batch_size % accum == 0,
             f"train.global_batch_size={t.global_batch_size} must be divisible by optim.grad_accum_steps={accum}.")
    _require(config.checkpoint.keep >= 1, f"checkpoint.keep={config.checkpoint.keep} must be >= 1.")
    _require(config.eval.batches >= 1 and config.eval.batch_size >= 1,
             f"eval.batches={config.eval.batches} and eval.batch_size={config.eval.batch_size} must be >= 1.")
    validate_data(config.data)
    schedules.make_lr_schedule(config.optim, t.steps)  # checks the optim section
    schedules.make_window_schedule(config.skyladder, seq_len=t.seq_len, total_steps=t.steps)  # and skyladder
    return config


def validate_data(cfg) -> None:
    """The `data` section: known keys, choices, ranges and the source lists."""
    known = get_config().data.keys()
    for key in cfg.keys():
        if key not in known:
            raise _unknown_key(f"data.{key}", key, known)
    def choice(key, options):
        _require(cfg[key] in options, f"data.{key}={cfg[key]!r}: expected one of {options}.")

    choice("packing", PACKINGS)
    choice("rope_positions", ROPE_POSITIONS)
    choice("long_documents", LONG_DOCUMENTS)
    for key, low in (("packing_bins", 1), ("read_threads", 1), ("read_buffer", 1), ("worker_count", 0),
                     ("worker_buffer_size", 1), ("prefetch", 0), ("pose_chunks", 1), ("shuffle_window", 1),
                     ("parquet_cycle_length", 1)):
        _require(int(cfg[key]) >= low, f"data.{key}={cfg[key]} must be >= {low}.")
    _require(0.0 <= float(cfg.validation_fraction) < 1.0,
             f"data.validation_fraction={cfg.validation_fraction} must be in [0, 1).")
    for list_key in ("sources", "validation_sources"):
        entries = list(cfg[list_key])
        _require(list_key != "sources" or entries,
                 "data.sources is empty; add at least one source, e.g. dict(kind='stdlib').")
        for i, src in enumerate(entries):
            unknown = set(src) - set(SOURCE_KEYS)
            _require(not unknown, f"data.{list_key}[{i}] has unknown keys {sorted(unknown)}; allowed: {SOURCE_KEYS}.")
            _require(src.get("kind") in SOURCE_KINDS,
                     f"data.{list_key}[{i}].kind={src.get('kind')!r}: expected one of {SOURCE_KINDS}.")


def check_mesh_fits(config, mesh) -> None:
    """The batch and sequence of every curriculum stage must split evenly over the mesh."""
    from ctxjax import mesh as mesh_lib
    from ctxjax.data import curriculum_stages
    batch_ways, context = mesh_lib.batch_ways(mesh), mesh_lib.sequence_ways(mesh)
    shards = mesh_lib.zigzag_shards(mesh, config.parallel.context_strategy)
    multiple = 2 * shards if shards > 1 else context
    accum = config.optim.grad_accum_steps
    for stage in curriculum_stages(config.data, seq_len=config.train.seq_len,
                                   global_batch_size=config.train.global_batch_size):
        where = f"at step {stage.start_step} (data.curriculum)" if config.data.curriculum else ""
        _require(stage.batch_size % accum == 0 and (stage.batch_size // accum) % batch_ways == 0,
                 f"the micro-batch of {stage.batch_size} / {accum} rows (global batch / optim.grad_accum_steps) "
                 f"{where} does not split over data x fsdp = {batch_ways} devices; make it a multiple of {batch_ways}.")
        _require(stage.seq_len % multiple == 0,
                 f"sequence length {stage.seq_len} {where} must be a multiple of {multiple} "
                 f"(context parallelism over {context} devices"
                 + (f"; zigzag load balancing cuts each row into 2 x {shards} chunks)." if shards > 1 else ")."))
    eval_len = config.eval.seq_len or config.train.seq_len
    _require(eval_len % multiple == 0, f"eval sequence length {eval_len} must be a multiple of {multiple}.")
    _require(config.eval.batch_size % batch_ways == 0,
             f"eval.batch_size={config.eval.batch_size} does not split over data x fsdp = {batch_ways} devices; "
             f"make it a multiple of {batch_ways}.")
    tensor = mesh.shape[mesh_lib.TENSOR]
    _require(config.model.n_kv_heads % tensor == 0,
             f"model.n_kv_heads={config.model.n_kv_heads} does not split over tensor={tensor} devices.")


def as_plain(value: Any):
    """ConfigDicts and tuples as plain dicts and lists (for JSON and comparisons)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
