"""Sampling (ctxjax/sample.py): the KV cache against full recomputation, the sampling
distribution and the top-k / top-p filters, greedy parity with transformers on an imported
model, and the command line on a run trained in seconds."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ctxjax import parallel, sample
from ctxjax.checkpoint import abstract_params
from ctxjax.config import get_config
from ctxjax.model import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**model):
    config = get_config()
    config.model.update(dict(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=48,
                             dtype="float32", max_position_embeddings=64))
    config.model.update(model)
    return config


def small_model(config, seed=0, attention=None):
    """A model with random parameters drawn in NumPy (no compiles), far from uniform logits:
    weights N(0, 0.3^2), norm scales 1 + N(0, 0.3^2)."""
    runtime = {} if attention is None else dict(attention=attention)
    graphdef, abstract = abstract_params(ModelConfig.from_config(config.model), **runtime)
    rng = np.random.default_rng(seed)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    values = [((1.0 if "norm" in jax.tree_util.keystr(path) else 0.0) + 0.3 * rng.standard_normal(a.shape))
              .astype(np.float32) for path, a in paths]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))


def test_kv_cache_greedy_equals_full_recompute():
    """Local (window 6) and global layers, documents on, a pattern that leaves a remainder layer
    (3 layers, period 2), a prompt padded from 5 to 8 tokens and 12 new tokens (past the
    window): greedy decoding with the cache gives the tokens of greedy decoding by recomputing
    the whole sequence every step, and the logits each token was chosen from agree to 1e-5.
    The cached model runs the attention load_model gives on this machine (xla_blockwise); the
    recomputing one the dense reference."""
    config = small_config(layer_pattern=("local:6", "global"), sinks=0, document_mask=True)
    cached = small_model(config, attention=parallel.single_device_plan(config, "xla_blockwise").attention)
    full = small_model(config)  # the same parameters (same seed), dense reference attention
    prompt = np.array([[1, 2, 3, 4, 5], [7, 7, 30, 12, 39]], np.int32)
    b, p, n = *prompt.shape, 12
    tokens, logits = sample.generate(cached, prompt, max_new_tokens=n, temperature=0, pad_to=8,
                                     return_logits=True)
    assert tokens.shape == (b, n) and logits.shape == (b, n, 40)

    # Full recomputation: the whole sequence through the model at every step. One compiled
    # length: what follows the current token is random junk, unseen by a causal model.
    forward = jax.jit(lambda t: full(t, segment_ids=jax.numpy.ones_like(t)))
    seq = np.random.default_rng(0).integers(0, 40, size=(b, p + n)).astype(np.int32)
    seq[:, :p] = prompt
    want_logits = []
    for i in range(n):
        step_logits = np.asarray(forward(seq))[:, p - 1 + i]
        seq[:, p + i] = step_logits.argmax(-1)
        want_logits.append(step_logits)
    want_logits = np.stack(want_logits, 1)
    np.testing.assert_array_equal(tokens, seq[:, p:])
    assert len(set(tokens.ravel().tolist())) > 4  # not a degenerate repetition
    scale = np.abs(want_logits).max()
    assert np.abs(logits - want_logits).max() <= 1e-5 * scale, (np.abs(logits - want_logits).max(), scale)


def _tv(p, q):
    return 0.5 * np.abs(p - q).sum()


def _hf_allowed(logits, temperature, top_k, top_p):
    """The tokens HF's TopKLogitsWarper then TopPLogitsWarper keep, [B, V] bool."""
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    scores = torch.from_numpy(np.asarray(logits, np.float32) / temperature)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return np.isfinite(scores.numpy())


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_sampling_distribution_and_filters():
    """A batch of 4096 copies of one prompt. Temperature sampling: the empirical distribution of
    the first new token is within a total-variation bound of softmax(logits / T), a bound that
    the T = 1 distribution breaks. top-k / top-p: every token of every row, at every step, is one
    HF's warpers keep for the logits it was drawn from, and the first token follows the
    renormalised distribution. top_k = vocab and top_p = 1 through the filter change nothing."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    config = small_config(n_layers=2, vocab_size=24)
    model = small_model(config, seed=1)
    rows, t, n, v = 4096, 0.6, 5, 24
    prompts = np.tile(np.array([3, 1, 4], np.int32), (rows, 1))
    bound = 0.04  # expected TV of 4096 draws over 24 tokens is about 0.02
    run = lambda **kw: sample.generate(model, prompts, max_new_tokens=n, temperature=t, seed=7, pad_to=8,
                                       return_logits=True, **kw)

    tokens, logits = run()
    first = logits[0, 0]
    np.testing.assert_allclose(logits[:, 0], np.broadcast_to(first, (rows, v)), rtol=1e-6, atol=1e-6)
    empirical = np.bincount(tokens[:, 0], minlength=v) / rows
    want = _softmax(first / t)
    assert _tv(empirical, want) < bound
    assert _tv(empirical, _softmax(first)) > 3 * bound  # the check can fail: T = 1 is far off
    assert len(set(tokens[:, 1].tolist())) > 5  # rows diverge

    # (6, 0.9): top-p over the top-6 renormalised keeps 4 tokens here, over all tokens it would keep 5.
    for top_k, top_p, kept in ((4, 1.0, 4), (0, 0.7, 3), (6, 0.9, 4)):
        tokens, logits = run(top_k=top_k, top_p=top_p)
        allowed = _hf_allowed(logits.reshape(-1, v), t, top_k, top_p).reshape(rows, n, v)
        assert np.take_along_axis(allowed, tokens[..., None], -1).all(), (top_k, top_p)
        keep = allowed[0, 0]
        assert keep.sum() == kept
        np.testing.assert_array_equal(np.unique(tokens[:, 0]), np.flatnonzero(keep))  # each has p > 0.06
        filtered = np.where(keep, first / t, -np.inf)
        empirical = np.bincount(tokens[:, 0], minlength=v) / rows
        assert _tv(empirical, _softmax(filtered)) < bound, (top_k, top_p)

    # top_k = vocab goes through the filter (a sort, a threshold) yet keeps every logit: the
    # same draws as no filter, token for token.
    plain, _ = run()
    through_filter, _ = run(top_k=v, top_p=1.0)
    np.testing.assert_array_equal(through_filter, plain)
    np.testing.assert_array_equal(run(top_k=0, top_p=1.0)[0], plain)


@pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
def test_greedy_matches_transformers_on_an_imported_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ctxjax.checkpoint import load_model
    from ctxjax.convert import import_hf
    from test_convert import _randomize_  # every HF tensor random, norms around 1

    hf_config = transformers.LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).to(torch.float32)
    _randomize_(hf_model, 0)
    hf_model.save_pretrained(tmp_path / "hf")
    base = get_config()
    base.model.dtype = "float32"  # the default base config computes in bfloat16
    workdir = import_hf(str(tmp_path / "hf"), str(tmp_path / "run"), base_config=base)
    # Dense attention: quicker to compile than xla_blockwise, which the KV-cache test covers.
    model, _ = load_model(workdir, attention="xla")

    prompt = np.array([[5, 17, 3, 60, 22, 9, 41], [1, 2, 3, 4, 5, 6, 7]], np.int32)
    n = 16
    hf_model.eval()

    def hf_generate(eos):
        hf_model.generation_config.eos_token_id = eos
        with torch.no_grad():
            out = hf_model.generate(torch.from_numpy(prompt).long(), attention_mask=torch.ones(prompt.shape).long(),
                                    do_sample=False, max_new_tokens=n, pad_token_id=0 if eos is None else eos)
        out = out.numpy()[:, prompt.shape[1]:]
        return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=-1 if eos is None else eos)

    ours = sample.generate(model, prompt, max_new_tokens=n, temperature=0)
    np.testing.assert_array_equal(ours, hf_generate(None))
    assert len(set(ours.ravel().tolist())) > 4
    # An EOS that row 0 produces at step 4: that row stops there and is filled with EOS, as HF does.
    eos = int(ours[0, 4])
    stopped = sample.generate(model, prompt, max_new_tokens=n, temperature=0, eos_id=eos)
    np.testing.assert_array_equal(stopped, hf_generate(eos))
    assert (stopped[0, list(ours[0]).index(eos):] == eos).all()


CLI_TEST = "test_cli_on_a_run_trained_in_seconds"
_xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
ONE_DEVICE = dict(os.environ, XLA_FLAGS=" ".join(_xla_flags + ["--xla_force_host_platform_device_count=1"]))


@pytest.fixture(scope="module", autouse=True)
def tiny_run(request, tmp_path_factory):
    """(workdir, training process) for the CLI test: the demo's config shrunk as in
    tests/test_train.py, one step on one device, in a subprocess started before the other tests
    of this file so that it overlaps them (XLA compiles mostly on one core; a sharded compile on
    this process's 8 simulated devices would cost more). None when the CLI test is not run."""
    if not any(getattr(item, "originalname", "") == CLI_TEST for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("cli")
    overrides = dict(model=dict(d_model=32, n_layers=2, mlp_dim=64), train=dict(seq_len=64, global_batch_size=4,
                     steps=1, plot=False), optim=dict(warmup_steps=0), skyladder=dict(enabled=False),
                     eval=dict(batches=1, batch_size=4), checkpoint=dict(async_save=False))
    flags = [f"--config.{section}.{k}={v}" for section, kv in overrides.items() for k, v in kv.items()]
    log = open(root / "train.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "ctxjax.train", "--config=configs/tiny_cpu.py",
                                f"--workdir={root / 'tiny'}", *flags], cwd=REPO, env=ONE_DEVICE, stdout=log,
                               stderr=subprocess.STDOUT)
    yield str(root / "tiny"), process
    if process.poll() is None:
        process.kill()
    process.wait()
    log.close()


def test_cli_on_a_run_trained_in_seconds(tiny_run, tmp_path):
    """The command line on a run trained for one step: it prints the prompt and its
    continuations, and nothing else."""
    workdir, training = tiny_run
    training.wait(timeout=300)
    log = open(os.path.join(os.path.dirname(workdir), "train.log")).read()
    assert training.returncode == 0, log[-3000:]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]

    out = subprocess.run([sys.executable, "-m", "ctxjax.sample", f"--workdir={workdir}", "--prompt=def fib(n):",
                          "--max_new_tokens=8", "--num_samples=2"], cwd=REPO, env=ONE_DEVICE, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = out.stdout.split("--- sample ")
    assert samples[0] == "" and len(samples) == 3, out.stdout
    for i, text in enumerate(samples[1:]):
        header, text = text.split(" ---\n", 1)
        assert header == f"{i + 1} of 2" and text.startswith("def fib(n):") and len(text) > len("def fib(n):\n")
    assert "INFO" not in out.stderr and "\nI0" not in out.stderr  # quiet

    # Errors are one line naming the fix (checked here without starting a process).
    assert "no such directory" in sample.argument_error(str(tmp_path / "nowhere"), "x")
    assert "not a ctxjax workdir" in sample.argument_error(str(tmp_path), "x")
    assert sample.argument_error(workdir, "").startswith("--prompt is empty")
    assert sample.argument_error(workdir, "x") is None
