"""Hugging Face conversion: a ctxjax workdir <-> a transformers Llama / Mistral / Qwen2 directory.

    export_hf("runs/tiny", "hf/tiny")          # config.json, model.safetensors, generation_config.json,
                                                # tokenizer files; AutoModelForCausalLM loads it
    import_hf("path/to/Llama-3.2-1B", "runs/base")   # a workdir: config.json + checkpoints/0 (params)

Weights map one to one (RoPE is rotate-half in both, so q/k need no permutation); only the
layouts differ: ours keep heads as an axis ([d_model, heads, head_dim]) and store x @ W
kernels, HF stores nn.Linear weights [out, in] with heads flattened. Layers are stacked along
a leading axis here and numbered in HF.

Which HF architecture a model exports to: q/k/v biases -> Qwen2 (any mix of global and sliding
layers, one window size); sliding-window layers everywhere, one window -> Mistral; else Llama.

Both directions check everything first and raise one ConversionError listing every problem,
then write into a temporary directory beside the target and rename it when complete, so an
existing target is never left half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import jax
import ml_collections
import numpy as np

from ctxjax import checkpoint as ckpt_lib
from ctxjax.model import rope as rope_lib
from ctxjax.model import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
DTYPES = ("bfloat16", "float16", "float32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
# Special tokens of the exported byte tokenizer (the names tools/train_tokenizer.py uses too).
BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")

# Per-layer tensors: (our name under params["blocks"], HF name under model.layers.<i>., layout).
# Layouts: "copy" as is; "in" [d, heads, hd] <-> [heads*hd, d]; "out" [heads, hd, d] <-> [d, heads*hd];
# "bias" [heads, hd] <-> [heads*hd]; "t" [a, b] <-> [b, a].
LAYER_TENSORS = (
    ("attn_norm", "input_layernorm.weight", "copy"),
    ("wq", "self_attn.q_proj.weight", "in"),
    ("wk", "self_attn.k_proj.weight", "in"),
    ("wv", "self_attn.v_proj.weight", "in"),
    ("bq", "self_attn.q_proj.bias", "bias"),
    ("bk", "self_attn.k_proj.bias", "bias"),
    ("bv", "self_attn.v_proj.bias", "bias"),
    ("wo", "self_attn.o_proj.weight", "out"),
    ("mlp_norm", "post_attention_layernorm.weight", "copy"),
    ("w_gate", "mlp.gate_proj.weight", "t"),
    ("w_up", "mlp.up_proj.weight", "t"),
    ("w_down", "mlp.down_proj.weight", "t"),
)
# Whole-model tensors: (our name, HF name, layout).
TOP_TENSORS = (
    ("embed", "model.embed_tokens.weight", "copy"),
    ("final_norm", "model.norm.weight", "copy"),
    ("lm_head", "lm_head.weight", "t"),
)


class ConversionError(ValueError):
    """Everything wrong with a conversion's input, one problem per line."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"cannot {what}:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _require_hf(what: str):
    """torch and transformers, or one clear error naming the install line."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ModuleNotFoundError as e:
        raise ConversionError(what, [f"{e.name} is not installed; install the Hugging Face extra: "
                                     f"pip install -e \".[hf]\" (a CPU build of torch is enough: "
                                     f"pip install torch --index-url https://download.pytorch.org/whl/cpu)"]) from None


# ----------------------------------------------------------------------------------------------
# Tensor layouts
# ----------------------------------------------------------------------------------------------

def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "in":
        return x.reshape(x.shape[0], -1).T
    if layout == "out":
        return x.reshape(-1, x.shape[-1]).T
    if layout == "bias":
        return x.reshape(-1)
    return x.T if layout == "t" else x


def _from_hf(y: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout in ("in", "out", "t"):
        y = y.T
    return y.reshape(shape)


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape _to_hf gives an array of `shape`."""
    size = int(np.prod(shape))
    if layout == "in":
        return (size // shape[0], shape[0])
    if layout == "out":
        return (shape[-1], size // shape[-1])
    if layout == "bias":
        return (size,)
    return tuple(reversed(shape)) if layout == "t" else tuple(shape)


def params_to_hf(params: dict) -> dict[str, np.ndarray]:
    """Our params (pure dict, layers stacked) -> HF tensors by name (float32 NumPy, fresh copies)."""
    out = {}
    for ours, hf, layout in TOP_TENSORS:
        if ours in params:
            out[hf] = np.array(_to_hf(np.asarray(params[ours], np.float32), layout), order="C")
    for ours, hf, layout in LAYER_TENSORS:
        if ours not in params["blocks"]:
            continue
        stacked = np.asarray(params["blocks"][ours], np.float32)
        for i, x in enumerate(stacked):
            out[f"model.layers.{i}.{hf}"] = np.array(_to_hf(x, layout), order="C")
    return out


def params_from_hf(reader: "SafetensorsReader", abstract: dict, *, tied: bool) -> dict:
    """HF tensors -> our params shaped like `abstract` (a pure dict of ShapeDtypeStructs). Every
    name and shape is checked before anything is read; raises ConversionError listing every
    missing, misshapen or unexpected tensor."""
    plan, problems = [], []  # (HF name, layout, our shape, dtype, where the result goes)
    for ours, hf, layout in TOP_TENSORS:
        if ours in abstract:
            plan.append((hf, layout, abstract[ours].shape, abstract[ours].dtype, (ours, None)))
    for ours, hf, layout in LAYER_TENSORS:
        if ours in abstract["blocks"]:
            a = abstract["blocks"][ours]
            plan += [(f"model.layers.{i}.{hf}", layout, a.shape[1:], a.dtype, (ours, i)) for i in range(a.shape[0])]

    for hf, layout, shape, _, _ in plan:
        want = _hf_shape(shape, layout)
        if hf not in reader.shapes:
            problems.append(f"missing tensor {hf} (expected shape {list(want)})")
        elif reader.shapes[hf] != want:
            problems.append(f"tensor {hf} has shape {list(reader.shapes[hf])}, expected {list(want)}")
    used = {hf for hf, *_ in plan}
    ignorable = lambda name: name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")
    unexpected = sorted(n for n in reader.shapes if n not in used and not ignorable(n))
    if unexpected:
        shown = ", ".join(unexpected[:12]) + (f" and {len(unexpected) - 12} more" if len(unexpected) > 12 else "")
        problems.append(f"unexpected tensor(s) the model has no place for: {shown}")
    if problems:
        raise ConversionError("read the Hugging Face weights", problems)

    params = {"blocks": {ours: np.empty(a.shape, a.dtype) for ours, a in abstract["blocks"].items()}}
    for hf, layout, shape, dtype, (ours, layer) in plan:
        x = _from_hf(reader.read(hf).astype(dtype), layout, shape)
        if layer is None:
            params[ours] = x
        else:
            params["blocks"][ours][layer] = x
    return params


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def hf_config_kwargs(model_cfg) -> tuple[str, dict]:
    """(model_type, keyword arguments of its transformers config class) for our `config.model`.
    Raises ConversionError listing what Hugging Face cannot express."""
    m, problems = ModelConfig.from_config(model_cfg), []
    hd = m.head_dim
    try:
        rope = rope_lib.to_hf_rope_parameters(m.rope_parameters, hd)
    except ValueError as e:
        problems.append(str(e))
        rope = None
    if m.sinks:
        problems.append(f"model.sinks={m.sinks}: attention sinks have no Hugging Face Llama equivalent; "
                        "export a model trained with sinks=0.")
    windows = m.layer_windows()
    local = sorted({w for w in windows if w is not None})
    if len(local) > 1:
        problems.append(f"model.layer_pattern={tuple(m.layer_pattern)} gives sliding windows {local}: Hugging Face "
                        "Mistral and Qwen2 have one window size for every sliding layer.")
    model_type = "qwen2" if m.qkv_bias else ("mistral" if local else "llama")
    if model_type == "mistral" and None in windows:
        problems.append(f"model.layer_pattern={tuple(m.layer_pattern)} mixes global and sliding-window layers: "
                        "Llama has no sliding window and Mistral slides every layer (only Qwen2, i.e. "
                        "model.qkv_bias=True, mixes them).")
    if m.d_model % m.n_heads:
        problems.append(f"model.d_model={m.d_model} is not a multiple of model.n_heads={m.n_heads}, which "
                        "transformers' configs require (even with an explicit head_dim).")
    if problems:
        raise ConversionError("export to Hugging Face", problems)

    kwargs = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        head_dim=hd, hidden_act="silu", max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_eps, initializer_range=m.init_std, tie_word_embeddings=bool(m.tie_embeddings),
        rope_parameters=rope, architectures=[ARCHITECTURES[model_type]],
    )
    if model_type == "mistral":
        kwargs["sliding_window"] = local[0]
    if model_type == "qwen2":
        # transformers < 5 reads max_window_layers (layers from there on slide) instead of layer_types
        leading_global = next((i for i, w in enumerate(windows) if w is not None), m.n_layers)
        suffix_slides = all(w is not None for w in windows[leading_global:])
        kwargs.update(use_sliding_window=bool(local), sliding_window=local[0] if local else None,
                      max_window_layers=leading_global if suffix_slides else m.n_layers,
                      layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    return model_type, kwargs


def model_config_from_hf(hf_config, base_model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Our `config.model` for a transformers config object (Llama, Mistral or Qwen2 family);
    knobs HF does not have (dtypes, document masking, sinks) come from `base_model_cfg`.
    Raises ConversionError listing everything that does not fit."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        named = ", ".join(getattr(hf_config, "architectures", None) or [])
        raise ConversionError("import from Hugging Face", [
            f"architecture {model_type!r}{f' ({named})' if named else ''} is not supported; ctxjax imports "
            f"{', '.join(sorted(ARCHITECTURES))} (model_type in config.json)"])
    c, problems = hf_config, []
    get = lambda name, default=None: getattr(c, name, default)
    if get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r}: ctxjax's MLP is SwiGLU (silu)")
    if get("mlp_bias", False):
        problems.append("mlp_bias=True: ctxjax's MLP has no biases")
    if model_type == "llama" and get("attention_bias", False):
        problems.append("attention_bias=True: Llama then has an o_proj bias, which ctxjax does not have "
                        "(q/k/v-only biases are the Qwen2 family)")

    m = ml_collections.ConfigDict(base_model_cfg.to_dict())
    m.vocab_size, m.d_model, m.mlp_dim = c.vocab_size, c.hidden_size, c.intermediate_size
    m.n_layers, m.n_heads = c.num_hidden_layers, c.num_attention_heads
    m.n_kv_heads = get("num_key_value_heads") or c.num_attention_heads
    hd = get("head_dim") or c.hidden_size // c.num_attention_heads
    m.head_dim = 0 if hd * c.num_attention_heads == c.hidden_size else hd
    m.norm_eps = float(c.rms_norm_eps)
    m.tie_embeddings = bool(get("tie_word_embeddings", False))
    m.qkv_bias = model_type == "qwen2"
    m.max_position_embeddings = int(c.max_position_embeddings)
    m.init_std = float(get("initializer_range", m.init_std))

    rope = get("rope_parameters")
    if rope is None and get("rope_scaling"):  # transformers < 5 objects
        rope = dict(get("rope_scaling"), rope_theta=get("rope_theta", rope_lib.DEFAULT_THETA))
    rope = dict(rope or {"rope_type": "default", "rope_theta": get("rope_theta", rope_lib.DEFAULT_THETA)})
    if rope and all(isinstance(v, dict) for v in rope.values()):
        problems.append(f"rope_parameters per layer type ({sorted(rope)}) are not supported; ctxjax uses one RoPE")
    else:
        try:
            rope = rope_lib.from_hf_rope_parameters(rope)
            rope_lib.validate_rope(rope, hd, m.max_position_embeddings)
            m.rope = rope
        except ValueError as e:
            problems.append(f"RoPE: {e}")

    # Sliding windows: Mistral slides every layer; Qwen2 the layers its layer_types name.
    window = get("sliding_window")
    if model_type == "mistral":
        kinds = ["sliding_attention" if window else "full_attention"] * m.n_layers
    elif model_type == "qwen2":
        kinds = list(get("layer_types") or ["full_attention"] * m.n_layers)
    else:
        kinds = ["full_attention"] * m.n_layers
    bad = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if bad:
        problems.append(f"layer_types {bad} are not supported (only full_attention and sliding_attention)")
    elif "sliding_attention" in kinds and not window:
        problems.append("layer_types name sliding_attention layers but sliding_window is not set")
    elif "sliding_attention" not in kinds:
        m.layer_pattern = ("global",)
    else:
        pattern = tuple("local" if k == "sliding_attention" else "global" for k in kinds)
        m.layer_pattern = pattern[:1] if len(set(pattern)) == 1 else pattern
        m.local_window = int(window)
    if problems:
        raise ConversionError("import from Hugging Face", problems)
    return m


# ----------------------------------------------------------------------------------------------
# Writing a directory atomically
# ----------------------------------------------------------------------------------------------

def _check_target(target: str, overwrite: bool) -> str:
    target = os.path.abspath(target)
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose another path or pass "
                              "overwrite=True (--overwrite) to replace it.")
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is a file; choose another path.")
    return target


def _default_permissions(root: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for parent, _, files in os.walk(root):
        os.chmod(parent, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~umask)


class _AtomicDir:
    """A temporary directory beside `target`, renamed onto it on success, removed on failure."""

    def __init__(self, target: str, overwrite: bool):
        self.target, self.overwrite = target, overwrite

    def __enter__(self) -> str:
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # gone after the rename, unless something failed
        return False

    def _commit(self):
        _default_permissions(self.tmp)  # mkdtemp (and some writers) make them private
        if os.path.isdir(self.target) and os.listdir(self.target):
            _check_target(self.target, self.overwrite)  # someone wrote there meanwhile
            old = self.tmp + ".old"
            os.rename(self.target, old)  # two renames: the target is always either old or new
            try:
                os.rename(self.tmp, self.target)
            except OSError:
                os.rename(old, self.target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(self.target):
                os.rmdir(self.target)  # an empty directory made beforehand
            os.rename(self.tmp, self.target)


def save_workdir(workdir: str, config: ml_collections.ConfigDict, params, *, meta: dict | None = None,
                 extra_files: dict[str, str] | None = None, extra_texts: dict[str, str] | None = None,
                 overwrite: bool = False) -> str:
    """Writes a ctxjax workdir holding `params` at step 0: config.json and checkpoints/0 with the
    items 'params', 'meta' and 'config' (no optimizer state: start runs from it with
    checkpoint.init_from). `extra_files` maps a path inside the workdir to a file to copy there,
    `extra_texts` to the text to write there."""
    import orbax.checkpoint as ocp

    target = _check_target(workdir, overwrite)
    with _AtomicDir(target, overwrite) as tmp:
        for rel, src in (extra_files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copyfile(src, os.path.join(tmp, rel))
        for rel, text in (extra_texts or {}).items():
            with open(os.path.join(tmp, rel), "w") as f:
                f.write(text)
        ckpt_lib.write_config(tmp, config)
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        with ocp.CheckpointManager(ckpt_lib.checkpoint_dir(tmp), options=options) as manager:
            manager.save(0, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave({"step": 0, **(meta or {})}),
                config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))
            manager.wait_until_finished()
    return target


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of tokenizers' ByteLevel."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_hf(add_bos: bool = True, model_max_length: int | None = None):
    """A transformers tokenizer equal to ctxjax's byte tokenizer: a byte-level BPE without merges
    whose 256 byte tokens have ids 0..255, then <|bos|> 256, <|eos|> 257, <|pad|> 258. Special
    tokens written in the text stay bytes (as in ctxjax); `add_bos` prepends BOS like training."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # no splitting
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    bos, eos, pad = BYTE_SPECIALS
    kwargs = dict(model_max_length=model_max_length) if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   add_bos_token=add_bos, split_special_tokens=True, **kwargs)


def _export_tokenizer(config, out: str) -> dict:
    """Writes the run's tokenizer files into `out` when HF can load them; returns the special ids."""
    from ctxjax.data.tokenizer import check_vocab, make_tokenizer

    spec = str(config.data.tokenizer)
    try:
        tokenizer = make_tokenizer(config.data)
        check_vocab(tokenizer, config.model.vocab_size)
    except (OSError, ValueError) as e:
        warnings.warn(f"tokenizer not exported ({e}); copy the tokenizer files into the output yourself.")
        return dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if spec == "byte":
        byte_tokenizer_hf(bool(config.data.add_bos), config.model.max_position_embeddings).save_pretrained(out)
    elif spec.endswith(".json"):
        source = os.path.dirname(os.path.abspath(spec))
        if os.path.exists(os.path.join(source, "tokenizer_config.json")):  # saved by transformers: copy all
            for name in TOKENIZER_FILES[1:]:
                if os.path.exists(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
        else:  # a bare tokenizer.json (tools/train_tokenizer.py): name its specials for transformers
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast
            vocab = Tokenizer.from_file(spec)
            name = lambda i: None if i is None else vocab.id_to_token(i)
            PreTrainedTokenizerFast(tokenizer_file=spec, bos_token=name(tokenizer.bos_id),
                                    eos_token=name(tokenizer.eos_id), pad_token=name(tokenizer.pad_id),
                                    model_max_length=config.model.max_position_embeddings).save_pretrained(out)
        shutil.copyfile(spec, os.path.join(out, "tokenizer.json"))  # the exact file, byte for byte
    else:
        warnings.warn(f"tokenizer {spec!r} (SentencePiece) is not exported: transformers' conversion of it "
                      "may not encode identically; copy it and check encodings yourself.")
    return ids


# ----------------------------------------------------------------------------------------------
# Export and import
# ----------------------------------------------------------------------------------------------

def export_hf(workdir: str, out_dir: str, *, step: int | None = None, dtype: str = "bfloat16",
              max_shard_size: int | str = "5GB", overwrite: bool = False) -> str:
    """Writes the params of `workdir` (step `step`, latest by default) as a Hugging Face
    directory that `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads: config.json,
    model.safetensors (sharded with an index above `max_shard_size`), generation_config.json and
    the tokenizer files. Returns the absolute path of `out_dir`."""
    _require_hf("export to Hugging Face")
    import torch
    import transformers
    from huggingface_hub import save_torch_state_dict

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {DTYPES}.")
    target = _check_target(out_dir, overwrite)
    config = ckpt_lib.read_config(workdir)
    model_type, kwargs = hf_config_kwargs(config.model)
    _, abstract = ckpt_lib.abstract_params(ModelConfig.from_config(config.model))
    params, _ = ckpt_lib.restore_params(workdir, abstract, step)
    tensors = params_to_hf(jax.device_get(params))
    del params
    torch_dtype = getattr(torch, dtype)
    state = {name: torch.from_numpy(tensors.pop(name)).to(torch_dtype) for name in list(tensors)}  # one copy at a time

    with _AtomicDir(target, overwrite) as tmp:
        special_ids = _export_tokenizer(config, tmp)
        config_cls = getattr(transformers, CONFIG_CLASSES[model_type])
        config_cls(**kwargs, **special_ids, dtype=dtype).save_pretrained(tmp)
        transformers.GenerationConfig(**special_ids).save_pretrained(tmp)
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
    return target


class SafetensorsReader:
    """The tensors of a HF directory's model.safetensors (or shards named by its index):
    `shapes` (name -> shape, read from the headers) and `read(name)` -> NumPy array."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise ConversionError("import from Hugging Face", [
                f"no model.safetensors or model.safetensors.index.json in {hf_dir} (.bin weights are not read: "
                "load and re-save the model with transformers' save_pretrained)"])
        missing = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
        if missing:
            raise ConversionError("import from Hugging Face", [f"shard {f} named by the index is missing"
                                                               for f in missing])
        # framework="flax" because NumPy has no bfloat16 here.
        self._files = {f: safe_open(os.path.join(hf_dir, f), framework="flax") for f in files}
        self._file_of = {name: f for f, handle in self._files.items() for name in handle.keys()}
        self.shapes = {name: tuple(self._files[f].get_slice(name).get_shape()) for name, f in self._file_of.items()}

    def read(self, name: str) -> np.ndarray:
        with jax.default_device(jax.local_devices(backend="cpu")[0]):  # never through an accelerator
            return np.asarray(self._files[self._file_of[name]].get_tensor(name))


def _load_base_config(base_config) -> ml_collections.ConfigDict:
    if base_config is None:
        from ctxjax.config import get_config
        return get_config()
    if isinstance(base_config, str):
        from ctxjax.config import load_config
        return load_config(base_config)
    return ml_collections.ConfigDict(base_config.to_dict())


_CONFIG_PY = '''"""The config of the model imported into this workdir from {source}
(ctxjax's defaults with the model section filled, checkpoint.init_from set here). Train from it:

    python -m ctxjax.train --config={workdir}/config.py --workdir=runs/next
"""
import os

from ctxjax.checkpoint import read_config


def get_config():
    return read_config(os.path.dirname(os.path.abspath(__file__)))
'''


def import_hf(hf_dir: str, workdir: str, *, base_config=None, overwrite: bool = False) -> str:
    """Makes a ctxjax workdir from a Hugging Face Llama, Mistral or Qwen2-family directory
    (safetensors, sharded or not): WORKDIR/config.json (`base_config` -- a ConfigDict, a config
    file path, or ctxjax.config.get_config() by default -- with the model section filled and
    checkpoint.init_from = WORKDIR), checkpoints/0 with the params, and the tokenizer files
    under WORKDIR/tokenizer/ (config.data.tokenizer points there). Start training from it with
    `--config.checkpoint.init_from=WORKDIR`; `ctxjax.load_model(WORKDIR)` loads it."""
    _require_hf("import from Hugging Face")
    import transformers

    from ctxjax.config import validate_config
    from ctxjax.data.tokenizer import HFTokenizer, check_vocab

    hf_dir = os.path.abspath(hf_dir)
    target = _check_target(workdir, overwrite)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise ConversionError("import from Hugging Face", [f"{hf_dir} has no config.json: is it a Hugging Face "
                                                           "model directory (save_pretrained)?"])
    try:
        hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError("import from Hugging Face", [f"transformers cannot read {hf_dir}/config.json: {e}"]
                              ) from None
    config = _load_base_config(base_config)
    config.model = model_config_from_hf(hf_config, config.model)
    config.checkpoint.init_from = target
    config.checkpoint.init_step = -1

    extra_files = {}
    if os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
        extra_files = {f"tokenizer/{n}": os.path.join(hf_dir, n) for n in TOKENIZER_FILES
                       if os.path.exists(os.path.join(hf_dir, n))}
        config.data.tokenizer = os.path.join(target, "tokenizer", "tokenizer.json")
        for key in ("bos_token", "eos_token", "pad_token"):
            config.data[key] = ""
        tokenizer = HFTokenizer(os.path.join(hf_dir, "tokenizer.json"))  # specials from its tokenizer_config.json
        check_vocab(tokenizer, config.model.vocab_size)
        config.data.add_bos = config.data.add_bos and tokenizer.bos_id is not None  # Qwen2 has no BOS
        config.data.add_eos = config.data.add_eos and tokenizer.eos_id is not None
    else:
        warnings.warn(f"{hf_dir} has no tokenizer.json: config.data.tokenizer stays {config.data.tokenizer!r}; "
                      "set it to the model's tokenizer before training.")
    validate_config(config)

    _, abstract = ckpt_lib.abstract_params(ModelConfig.from_config(config.model))
    params = params_from_hf(SafetensorsReader(hf_dir), abstract, tied=config.model.tie_embeddings)
    return save_workdir(target, config, params, meta={"imported_from": hf_dir}, extra_files=extra_files,
                        extra_texts={"config.py": _CONFIG_PY.format(source=hf_dir, workdir=target)},
                        overwrite=overwrite)
