"""Hugging Face conversion: logits of exported / imported tiny random models against transformers
(torch CPU, float32), bit-exact round trips, the byte tokenizer, and errors on bad input."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from flax import nnx  # noqa: E402

from ctxjax import checkpoint as ckpt_lib  # noqa: E402
from ctxjax.convert import ConversionError, export_hf, import_hf  # noqa: E402
from ctxjax.convert import hf as conv  # noqa: E402
from ctxjax.data.tokenizer import ByteTokenizer, make_tokenizer  # noqa: E402
from ctxjax.config import get_config  # noqa: E402
from ctxjax.model import ModelConfig  # noqa: E402

T = 24  # tokens per row: longer than every original context length and window below
HD = 16  # head_dim != d_model / n_heads = 8


def tiny_config(**model) -> ml_collections.ConfigDict:
    config = get_config()
    config.model.update(dict(vocab_size=ByteTokenizer().vocab_size + 5, d_model=32, n_layers=2, n_heads=4,
                             n_kv_heads=2, head_dim=HD, mlp_dim=48, max_position_embeddings=16, dtype="float32"))
    config.model.update(model)
    return config


def random_params(model_cfg, seed):
    """Every parameter random (norm scales around 1, biases nonzero), as float32 NumPy."""
    _, abstract = ckpt_lib.abstract_params(ModelConfig.from_config(model_cfg))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(abstract)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    values = [(1.0 + 0.3 * rng.standard_normal(a.shape) if "norm" in p else 0.3 * rng.standard_normal(a.shape))
              .astype(np.float32) for p, a in zip(paths, leaves)]
    return jax.tree.unflatten(treedef, values)


def ctxjax_logits(model_cfg, params, tokens):
    graphdef, _ = ckpt_lib.abstract_params(ModelConfig.from_config(model_cfg))
    return np.asarray(nnx.merge(graphdef, jax.tree.map(np.asarray, params))(tokens))


def hf_logits(path_or_model, tokens):
    model = path_or_model
    if isinstance(model, str):
        model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy(), model


def assert_close(got, want, tol=1e-4):
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < tol, f"relative error {err:.2e} >= {tol}"


def tokens_for(vocab, seed):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, T)).astype(np.int32)


LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=8,
                short_factor=[1.0 + 0.1 * i for i in range(HD // 2)],
                long_factor=[1.5 + 0.4 * i for i in range(HD // 2)])
EXPORT_CASES = {  # name: (model overrides, expected architecture)
    "default_gqa_untied_sharded": (dict(rope={"rope_type": "default", "rope_theta": 500.0}), "LlamaForCausalLM"),
    "linear_tied": (dict(tie_embeddings=True, rope={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
                    "LlamaForCausalLM"),
    "dynamic": (dict(rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "LlamaForCausalLM"),
    "yarn": (dict(max_position_embeddings=32, rope={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                     "original_max_position_embeddings": 8}), "LlamaForCausalLM"),
    "longrope": (dict(max_position_embeddings=32, rope=LONGROPE), "LlamaForCausalLM"),
    "llama3": (dict(rope={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), "LlamaForCausalLM"),
    "ntk": (dict(rope={"rope_type": "ntk", "rope_theta": 10000.0, "factor": 4.0}), "LlamaForCausalLM"),
    "mistral_sliding": (dict(layer_pattern=("local",), local_window=6, n_kv_heads=1), "MistralForCausalLM"),
    "qwen2_bias_mixed": (dict(qkv_bias=True, tie_embeddings=True, layer_pattern=("global", "local:5")),
                         "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_matches_transformers_and_round_trips(name, tmp_path):
    overrides, architecture = EXPORT_CASES[name]
    config = tiny_config(**overrides)
    seed = list(EXPORT_CASES).index(name)
    params = random_params(config.model, seed)
    workdir = conv.save_workdir(str(tmp_path / "run"), config, params)
    sharded = "sharded" in name
    out = export_hf(workdir, str(tmp_path / "hf"), dtype="float32", max_shard_size="40KB" if sharded else "5GB")

    assert os.path.exists(os.path.join(out, "model.safetensors.index.json")) == sharded
    hf_config = json.load(open(os.path.join(out, "config.json")))
    assert hf_config["architectures"] == [architecture]
    assert hf_config["rope_parameters"]["rope_theta"] > 0
    tokens = tokens_for(config.model.vocab_size, seed)
    want = ctxjax_logits(config.model, params, tokens)
    got, hf_model = hf_logits(out, tokens)
    assert type(hf_model).__name__ == architecture
    assert_close(got, want)

    # Back again: the same params bit for bit, and a model config that computes the same.
    back = import_hf(out, str(tmp_path / "back"))
    restored, back_config = ckpt_lib.load_model(back)
    back_params = nnx.to_pure_dict(nnx.state(restored, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back_params, params)
    m, b = config.model, back_config.model
    assert ModelConfig.from_config(b).layer_windows() == ModelConfig.from_config(m).layer_windows()
    assert (b.tie_embeddings, b.qkv_bias, b.head_dim, b.n_kv_heads) == (m.tie_embeddings, m.qkv_bias, HD, m.n_kv_heads)
    if m.rope.rope_type != "ntk":  # exported as "default" with the NTK-scaled theta
        as_json = lambda rope: json.loads(json.dumps(rope))  # a workdir's config.json has lists as tuples
        assert as_json(b.rope.to_dict()) == as_json(conv.rope_lib.validate_rope(m.rope.to_dict(), HD, 1))


def _randomize_(model, seed):
    """transformers initialises norms to 1 and biases to 0: make every tensor random instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.3 * noise)


SHAPE = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5)
IMPORT_CASES = {
    "llama_yarn_sharded": lambda: transformers.LlamaConfig(
        **SHAPE, head_dim=HD, max_position_embeddings=32, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                         "original_max_position_embeddings": 8, "beta_fast": 16.0}),
    "mistral_tied_sliding": lambda: transformers.MistralConfig(
        **SHAPE, head_dim=HD, max_position_embeddings=64, tie_word_embeddings=True, sliding_window=7),
    "qwen2_sliding_top_layer": lambda: transformers.Qwen2Config(
        **SHAPE, max_position_embeddings=64, use_sliding_window=True, sliding_window=5, max_window_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


@pytest.mark.parametrize("name", list(IMPORT_CASES))
def test_import_matches_transformers(name, tmp_path):
    hf_config = IMPORT_CASES[name]()
    seed = 100 + list(IMPORT_CASES).index(name)
    torch.manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    _randomize_(hf_model, seed)
    if hf_config.tie_word_embeddings:
        hf_model.tie_weights()
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB" if "sharded" in name else "5GB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json") == ("sharded" in name)
    tokens = tokens_for(80, seed)
    want, _ = hf_logits(hf_model.eval(), tokens)

    with pytest.warns(UserWarning, match="no tokenizer.json"):
        workdir = import_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    model, config = ckpt_lib.load_model(workdir)
    config.model.dtype = "float32"  # base config computes in bfloat16
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert_close(ctxjax_logits(config.model, params, tokens), want)
    assert os.path.exists(os.path.join(workdir, "config.py"))


def test_byte_tokenizer_and_bfloat16_export(tmp_path):
    config = tiny_config()
    params = random_params(config.model, 7)
    workdir = conv.save_workdir(str(tmp_path / "run"), config, params)
    out = export_hf(workdir, str(tmp_path / "hf"))  # bfloat16 by default

    tok, ours = transformers.AutoTokenizer.from_pretrained(out), ByteTokenizer()
    text = "def f(x):\n\treturn x  # héllo wörld 日本語 🙂 <|bos|> \x00\x7f\r\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert tok(text)["input_ids"] == [ours.bos_id] + ours.encode(text)  # BOS first, as in training
    ids = np.random.default_rng(0).integers(0, config.model.vocab_size, size=300).tolist()  # cuts through characters
    assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert generation["eos_token_id"] == ours.eos_id

    back = import_hf(out, str(tmp_path / "back"))
    restored, back_config = ckpt_lib.load_model(back)
    rounded = jax.tree.map(lambda x: np.asarray(x.astype(jax.numpy.bfloat16).astype(np.float32)), params)
    got = nnx.to_pure_dict(nnx.state(restored, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, rounded)
    assert back_config.data.tokenizer == os.path.join(back, "tokenizer", "tokenizer.json")
    plain = text.replace("<|bos|>", "")  # ctxjax's HFTokenizer matches special tokens written in the text
    assert make_tokenizer(back_config.data).encode(plain) == ours.encode(plain)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def _save_tiny_llama(path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
def test_import_lists_every_bad_tensor_and_leaves_target_alone(tmp_path):
    hf_dir = _save_tiny_llama(tmp_path / "hf")
    file = os.path.join(hf_dir, "model.safetensors")
    tensors = safetensors_torch.load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})

    target = tmp_path / "run"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        import_hf(hf_dir, str(target))
    with pytest.raises(ConversionError) as e:
        import_hf(hf_dir, str(target), overwrite=True)
    message = str(e.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.0.self_attn.k_proj.weight has shape [8, 32], expected [16, 32]" in message
    assert "model.layers.0.self_attn.o_proj.bias" in message and len(e.value.problems) == 3
    assert os.listdir(target) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["hf", "run"]


def test_import_rejects_unsupported_architecture_and_rope(tmp_path):
    transformers.GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConversionError, match="'gpt2'.*llama, mistral, qwen2"):
        import_hf(str(tmp_path / "gpt2"), str(tmp_path / "a"))

    hf_dir = _save_tiny_llama(tmp_path / "hf")
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg.update(hidden_act="gelu", attention_bias=True,
               rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0})
    json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(ConversionError) as e:
        import_hf(hf_dir, str(tmp_path / "b"))
    assert len(e.value.problems) == 3, e.value
    assert "hidden_act='gelu'" in str(e.value) and "o_proj bias" in str(e.value) and "proportional" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["gpt2", "hf"]


def test_export_lists_what_hf_cannot_express(tmp_path):
    config = tiny_config(sinks=4, layer_pattern=("local:4", "local:8"))
    workdir = conv.save_workdir(str(tmp_path / "run"), config, random_params(config.model, 0))
    config.model.rope = {"rope_type": "xpos", "rope_theta": 10000.0}  # as if hand-edited
    ckpt_lib.write_config(workdir, config)
    with pytest.raises(ConversionError) as e:
        export_hf(workdir, str(tmp_path / "hf"))
    assert len(e.value.problems) == 3, e.value
    assert "xpos" in str(e.value) and "sinks=4" in str(e.value) and "[4, 8]" in str(e.value)

    config = tiny_config(layer_pattern=("local", "global"))
    with pytest.raises(ConversionError, match="mixes global and sliding"):
        conv.hf_config_kwargs(config.model)
    assert sorted(os.listdir(tmp_path)) == ["run"]
