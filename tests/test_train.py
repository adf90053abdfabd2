"""The main job: exact resume, no recompilation on a new window, outputs, the loss and FLOPs
helpers, config errors, and two processes training together."""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ctxjax
from ctxjax import train
from ctxjax.config import load_config, set_by_path
from ctxjax.model import chunked_cross_entropy
from pallas_kernels.mask import MaskSpec, allowed_pair_count, count_allowed_pairs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(steps=6, **overrides):
    config = load_config(os.path.join(REPO, "configs", "tiny_cpu.py"))
    config.model.update(dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64))
    config.train.update(dict(seq_len=64, global_batch_size=4, steps=steps, log_every=1, plot=False))
    config.optim.warmup_steps = 1
    config.checkpoint.update(dict(every=3, async_save=False))
    config.eval.update(dict(every=0, batches=1, batch_size=4))
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    for key, value in overrides.items():
        set_by_path(config, key, value)
    return config


def read_metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_exact_resume_is_bit_identical(tmp_path):
    """2N steps straight == N steps, stop, resume to 2N: same params and losses, bit for bit."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.train_and_evaluate(tiny_config(), straight)
    train.train_and_evaluate(tiny_config(), split, stop_after=3)
    assert sorted(os.listdir(os.path.join(split, "checkpoints"))) == ["3"]
    train.train_and_evaluate(tiny_config(), split)

    losses = lambda w: [(r["step"], r["loss"]) for r in read_metrics(w) if "loss" in r]
    assert losses(straight) == losses(split) and len(losses(straight)) == 6
    (model_a, config_a), (model_b, _) = ctxjax.load_model(straight), ctxjax.load_model(split)
    for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
        np.testing.assert_array_equal(a, b)

    # load_model gives a model whose logits reproduce the run's final eval loss
    from ctxjax.data import make_eval_batches
    from ctxjax.model import lm_loss, next_token_targets
    batch = make_eval_batches(config_a.data, seq_len=64, batch_size=4, num_batches=1)[0]
    logits = model_a(batch["tokens"])
    assert logits.shape == (4, 64, config_a.model.vocab_size)
    hidden = model_a.hidden_states(batch["tokens"], batch["segment_ids"], batch["token_index"],
                                   batch["rope_positions"])
    loss = lm_loss(hidden, model_a.head_weight(), *next_token_targets(batch["tokens"], batch["segment_ids"]))[0]
    assert np.isclose(float(loss), read_metrics(straight)[-1]["eval_loss"], rtol=1e-4)


def test_resume_onto_a_different_mesh_reshards(tmp_path):
    """Stop on a (2 data, 2 fsdp, 2 tensor) mesh, resume on (1, 4, 1, 2 context): the restore
    reshards params and optimizer state, and training continues as it would have."""
    straight, moved = str(tmp_path / "straight"), str(tmp_path / "moved")
    train.train_and_evaluate(tiny_config(steps=4), straight)
    train.train_and_evaluate(tiny_config(steps=4), moved, stop_after=2)
    other_mesh = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1, "mesh.context": 2}
    train.train_and_evaluate(tiny_config(steps=4, **other_mesh), moved)
    losses = lambda w: [r["loss"] for r in read_metrics(w) if "loss" in r]
    np.testing.assert_allclose(losses(moved), losses(straight), rtol=1e-4)


def test_length_curriculum_with_context_parallel_zigzag(tmp_path):
    """A two-stage curriculum (64 x 4 rows, then 128 x 2 rows) on a mesh with a context axis
    (zigzag-ordered rows, ring attention): the loop follows the stage shapes. (That zigzag rows
    train exactly like natural-order ones is checked by the mesh-change resume test.)"""
    stages = ((0, 64, 4), (2, 128, 2))
    mesh = {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2, "mesh.context": 2}
    workdir = str(tmp_path / "cp")
    train.train_and_evaluate(tiny_config(steps=4, **{"data.curriculum": stages, **mesh}), workdir)
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["seq_len"] for r in rows] == [64, 64, 128, 128]
    assert all(np.isfinite(r["loss"]) for r in rows)
    with pytest.raises(ValueError, match="at step 2"):  # a stage that does not fit the mesh is named
        train.train_and_evaluate(tiny_config(steps=4, **{"data.curriculum": ((0, 64, 4), (2, 256, 1)), **mesh}),
                                 str(tmp_path / "bad"))


def interrupt_a_run(workdir, signum, extra_args=()):
    """Start a long CLI run, send `signum` once it has logged two steps; -> (returncode, output,
    the checkpointed steps)."""
    import time
    args = [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny_cpu.py", f"--workdir={workdir}",
            "--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.mlp_dim=64",
            "--config.train.seq_len=64", "--config.train.log_every=1", "--config.train.steps=100000",
            "--config.eval.batches=1", "--config.eval.batch_size=8", "--config.mesh.fsdp=1", "--config.mesh.data=-1",
            *extra_args]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signum)
    out = proc.communicate(timeout=120)[0]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    return proc.returncode, out, saved


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """Preemption: SIGTERM mid-run saves the current step and exits 0; a rerun resumes there."""
    import signal
    workdir = str(tmp_path / "preempted")
    returncode, out, saved = interrupt_a_run(workdir, signal.SIGTERM)
    assert returncode == 0, out[-3000:]
    assert len(saved) == 1 and 2 <= saved[0] < 100000 and "checkpoint saved" in out and "final:" not in out
    assert json.loads(open(os.path.join(workdir, "metrics.jsonl")).readlines()[-1])["step"] <= saved[0]


def test_outputs_and_falling_loss(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(steps=12, **{"train.plot": True, "optim.lr": 3e-3})
    final = train.train_and_evaluate(config, workdir)
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    for key in ("step", "loss", "lr", "window", "tokens_per_s", "mfu", "elapsed_s"):
        assert key in rows[0]
    elapsed = [r["elapsed_s"] for r in rows]  # training seconds, compiling left out: grows every step
    assert 0 < elapsed[0] and all(a < b for a, b in zip(elapsed, elapsed[1:]))
    assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]]) - 0.5
    windows = [r["window"] for r in rows]
    assert windows == sorted(windows) and windows[0] < windows[-1] == 64  # SkyLadder climbs to L
    assert os.path.getsize(os.path.join(workdir, "metrics.png")) > 10_000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert np.isfinite(final["eval_loss"])


def test_new_window_does_not_recompile():
    config = tiny_config()
    from ctxjax import mesh as mesh_lib, parallel
    from ctxjax.model import ModelConfig
    mesh = mesh_lib.make_mesh(config.mesh)
    tx, lr = train.make_optimizer(config.optim, config.train.steps)
    plan = parallel.make_plan(config, mesh)
    model_cfg = ModelConfig.from_config(config.model)
    with mesh_lib.use_mesh(mesh):
        graphdef, params_abstract, opt_abstract = train.abstract_state(model_cfg, plan, tx, mesh)
        params, opt_state = train.init_state(model_cfg, plan, tx, 0, params_abstract, opt_abstract)
        step_fn = train.jit_train_step(graphdef, tx, lr, config, mesh, params_abstract, opt_abstract)
        rng = np.random.default_rng()
        batch = dict(tokens=rng.integers(0, 259, (4, 64)), segment_ids=np.ones((4, 64)),
                     token_index=np.tile(np.arange(64), (4, 1)), rope_positions=np.tile(np.arange(64), (4, 1)))
        batch = parallel.shard_inputs(train.with_targets({k: v.astype(np.int32) for k, v in batch.items()}), mesh, plan)
        losses = []
        for step, window in enumerate([8, 16, 24, 40, 64]):
            params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(step), jnp.int32(window))
            losses.append(float(metrics["loss"]))
    assert step_fn._cache_size() == 1
    assert len(set(losses)) == 5  # the window really changed the computation


def test_attended_pairs_matches_the_mask_algebra():
    """The O(L) FLOP count used for MFU equals a dense count of the same mask."""
    rng = np.random.default_rng()
    b, t = 3, 96
    seg = np.sort(rng.integers(1, 5, (b, t)), axis=1).astype(np.int32)
    seg[0, -7:] = 0
    idx = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    for window, chunk, sinks in [(None, None, 0), (9, None, 0), (None, 16, 2), (13, 32, 3)]:
        for documents in (True, False):
            got = count_allowed_pairs(idx, seg, window=window, chunk=chunk, sinks=sinks, documents=documents)
            spec = MaskSpec(q_segment_ids=jnp.asarray(seg) if documents else None, window=window, chunk=chunk,
                            sinks=sinks)
            assert got == float(allowed_pair_count(spec, b, t, t)), (window, chunk, sinks, documents)


@pytest.mark.parametrize("vocab_chunk", [16, 0])  # chunks of the vocabulary, or the whole logits
def test_chunked_cross_entropy_matches_float64(vocab_chunk):
    rng = np.random.default_rng()
    hidden, w = rng.standard_normal((2, 10, 16)), rng.standard_normal((16, 77)) * 0.3
    targets = rng.integers(0, 77, (2, 10))
    loss, lse = chunked_cross_entropy(jnp.asarray(hidden, jnp.float32), jnp.asarray(w, jnp.float32),
                                      jnp.asarray(targets), vocab_chunk=vocab_chunk)
    logits = hidden @ w
    want_lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = want_lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
    grad = jax.grad(lambda h: chunked_cross_entropy(h, jnp.asarray(w, jnp.float32), jnp.asarray(targets),
                                                    vocab_chunk=vocab_chunk)[0].sum())(jnp.asarray(hidden, jnp.float32))
    p = np.exp(logits - want_lse[..., None])
    p[np.arange(2)[:, None], np.arange(10)[None], targets] -= 1
    np.testing.assert_allclose(grad, p @ w.T, rtol=1e-4, atol=1e-6)


def _dot_operand_types(stablehlo: str) -> set:
    """The (lhs, rhs) element types of every dot_general in a StableHLO module."""
    import re
    return set(re.findall(r"stablehlo\.dot_general.*?: \(tensor<(?:\d+x)*(\w+)>, tensor<(?:\d+x)*(\w+)>\)", stablehlo))


@pytest.mark.parametrize("vocab_chunk", [16, 0])
def test_head_gradient_runs_in_the_compute_dtype(vocab_chunk):
    """bf16 hidden states, float32 head: on a GPU every matmul (forward and backward) takes bf16
    operands, the weight's gradient comes back float32, and both gradients match float64
    computed from the bf16-rounded inputs within bf16's rounding of the cotangent."""
    rng = np.random.default_rng()
    hidden = jnp.asarray(rng.standard_normal((2, 10, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((16, 77)) * 0.3, jnp.float32)
    targets = rng.integers(0, 77, (2, 10))
    loss = lambda h, w: chunked_cross_entropy(h, w, jnp.asarray(targets), vocab_chunk=vocab_chunk)[0].sum()
    grad = jax.grad(loss, argnums=(0, 1))
    # as compiled for a GPU (lowered here, no GPU needed); on CPU the backward's operands are
    # widened to float32, since XLA's CPU runtime lacks some bf16 x bf16 -> f32 dots
    lowered = jax.jit(grad).trace(hidden, w).lower(lowering_platforms=("cuda",)).as_text()
    assert _dot_operand_types(lowered) == {("bf16", "bf16")}
    d_hidden, d_w = grad(hidden, w)
    assert d_hidden.dtype == jnp.bfloat16 and d_w.dtype == jnp.float32
    h64 = np.asarray(hidden.astype(jnp.float32), np.float64)
    w64 = np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    logits = h64 @ w64
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(2)[:, None], np.arange(10)[None], targets] -= 1
    want_h, want_w = p @ w64.T, np.einsum("btd,btv->dv", h64, p)
    np.testing.assert_allclose(np.asarray(d_hidden, np.float64), want_h, rtol=2e-2, atol=1e-2 * np.abs(want_h).max())
    np.testing.assert_allclose(np.asarray(d_w, np.float64), want_w, rtol=2e-2, atol=1e-2 * np.abs(want_w).max())


def test_config_errors_name_the_key(tmp_path):
    config = tiny_config()
    with pytest.raises(KeyError, match="model.no_such_knob"):
        set_by_path(config, "model.no_such_knob", 1)
    with pytest.raises(TypeError, match="train.steps"):
        set_by_path(config, "train.steps", "many")
    bad = tiny_config(**{"model.n_kv_heads": 3})
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        train.train_and_evaluate(bad, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"parallel.layer_loop='unroll'; choose one of \('auto', 'scan', 'unrolled'\)"):
        train.train_and_evaluate(tiny_config(**{"parallel.layer_loop": "unroll"}), str(tmp_path / "bad_loop"))
    assert not os.path.exists(tmp_path / "bad_loop")  # refused before anything is written
    # the command line rejects unknown keys too, naming them
    result = subprocess.run([sys.executable, "-m", "ctxjax.train", "--config=configs/tiny_cpu.py",
                             f"--workdir={tmp_path}/cli", "--config.model.n_layerz=3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "n_layerz" in result.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_save_and_resume(tmp_path):
    """2 CPU processes x 4 devices, launched the way a multi-host job is, train, checkpoint,
    and resume from that checkpoint."""
    workdir = str(tmp_path / "mp")
    overrides = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.mlp_dim=64",
                 "--config.train.seq_len=64", "--config.train.global_batch_size=8", "--config.train.log_every=1",
                 "--config.train.plot=False", "--config.train.distributed=True", "--config.eval.batches=1",
                 "--config.eval.batch_size=4", "--config.checkpoint.every=2", "--config.optim.warmup_steps=1",
                 "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.context=2"]

    def launch(steps):
        port = _free_port()
        procs = []
        for pid in range(2):
            env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                       XLA_FLAGS="--xla_force_host_platform_device_count=4")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ctxjax.train", "--config=configs/tiny_cpu.py", f"--workdir={workdir}",
                 f"--config.train.steps={steps}", *overrides], cwd=REPO, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=400)[0] for p in procs]
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-3000:]
        return outputs

    launch(steps=2)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    outputs = launch(steps=4)
    assert "resumed" in outputs[0]
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
