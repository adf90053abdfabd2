"""Sharded forward+backward (attention as ctxjax.parallel plans it for the mesh) equals the
1-device result on every mesh shape; the layer loop and the remat policies ctxjax.parallel
chooses change what is recomputed, never the result."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ctxjax import mesh as mesh_lib, parallel
from ctxjax.config import get_config
from ctxjax.model import ModelConfig, abstract_model, init_params, lm_loss, logical_axes, next_token_targets


def tiny_config():
    config = get_config()
    config.model.update(dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=64,
                             dtype="float32", layer_pattern=("local", "global"), local_window=12, sinks=1))
    config.skyladder.enabled = True
    return config


def random_batch(rng, b=8, t=32):
    seg = np.sort(rng.integers(1, 4, (b, t)), axis=1).astype(np.int32)
    seg[:, -3:] = 0  # padding at the end of every row
    return dict(tokens=rng.integers(0, 96, (b, t)).astype(np.int32), segment_ids=seg,
                token_index=np.tile(np.arange(t, dtype=np.int32), (b, 1)))


def loss_and_grads(graphdef, params, batch, window):
    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        h = model.hidden_states(batch["tokens"], batch["segment_ids"], batch["token_index"], None, window)
        targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
        return lm_loss(h, model.head_weight(), targets, weights, vocab_chunk=40)[0]
    return jax.value_and_grad(loss_fn)(params)


@pytest.fixture(scope="module")
def single_device_result():
    """One model, batch and window; loss and gradients computed without a mesh."""
    cfg = ModelConfig.from_config(tiny_config().model)
    graphdef, params = init_params(cfg, seed=0)
    batch = random_batch(np.random.default_rng())
    window = jnp.int32(8)
    loss, grads = jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, batch, window)
    axes = nnx.to_pure_dict(logical_axes(abstract_model(cfg)))
    return cfg, params, axes, batch, window, loss, grads


@pytest.mark.parametrize("shape, strategy", [
    ((8, 1, 1, 1), "ring"), ((2, 2, 2, 1), "ring"), ((1, 4, 2, 1), "ring"), ((2, 1, 1, 4), "ring"),
    ((1, 2, 1, 4), "all_gather"), ((2, 1, 1, 4), "ulysses"), ((1, 2, 1, 2, 2), "hybrid")])
def test_sharded_loss_and_grads_equal_single_device(shape, strategy, single_device_result):
    """The model (local and global layers, documents, a sink, GQA 4/2, a SkyLadder chunk) with
    every context-parallel strategy; Ulysses over 4 devices repeats the 2 kv heads."""
    cfg, params, axes, batch, window, want_loss, want_grads = single_device_result
    config = tiny_config()
    config.mesh.update(dict(zip(mesh_lib.MESH_AXES, shape)))
    config.parallel.context_strategy = strategy
    mesh = mesh_lib.make_mesh(config.mesh)
    plan = parallel.make_plan(config, mesh)
    graphdef = nnx.graphdef(abstract_model(cfg, attention=plan.attention))
    param_sh = mesh_lib.tree_shardings(mesh, axes)
    with mesh_lib.use_mesh(mesh):
        sharded_params = jax.device_put(params, param_sh)
        sharded_batch = mesh_lib.shard_batch(batch, mesh)  # natural order: targets are computed inside
        loss, grads = jax.jit(loss_and_grads, static_argnums=0)(graphdef, sharded_params, sharded_batch, window)
    # the params really are distributed (the embedding's model dim over fsdp, heads over tensor)
    assert sharded_params["embed"].sharding.spec == mesh_lib.logical_to_spec(("vocab", "embed"))
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = dict(jax.tree_util.tree_leaves_with_path(want_grads))[path]
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_mesh_errors_name_the_sizes():
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=1, tensor=2, context=1)))
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=-1, tensor=1, context=1)))
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=2, context=1)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1, "ulysses": 1}


def test_unrolled_layers_equal_the_scan():
    """parallel.layer_loop: the unrolled loop gives the scan's loss, gradients and KV cache, with
    a layer pattern that leaves a remainder (5 layers of ('local', 'global'))."""
    cfg = ModelConfig.from_config(tiny_config().model).replace(n_layers=5)
    batch = random_batch(np.random.default_rng(), b=2)
    window = jnp.int32(8)
    results = []
    for scan in (True, False):
        graphdef, params = init_params(cfg, seed=1, remat_policy=jax.checkpoint_policies.nothing_saveable,
                                       scan_layers=scan)
        loss, grads = jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, batch, window)
        model = nnx.merge(graphdef, params)
        from ctxjax.model.llama import KVCache
        hidden, cache = jax.jit(lambda t: model.hidden_states(t, cache=KVCache.empty(cfg, 2, 40)))(batch["tokens"])
        results.append((loss, grads, hidden, cache))
    (loss_a, grads_a, hidden_a, cache_a), (loss_b, grads_b, hidden_b, cache_b) = results
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(hidden_b, hidden_a, rtol=1e-5, atol=1e-6)
    assert cache_b.k.shape == cache_a.k.shape == (5, 2, 40, cfg.n_kv_heads, cfg.head_dim)
    np.testing.assert_allclose(cache_b.k, cache_a.k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache_b.v, cache_a.v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("remat, reruns", [("full", 1), ("save_attention", 0), ("save_matmuls", 0)])
def test_remat_policy_decides_whether_attention_forward_reruns(remat, reruns, scan_layers):
    """Whether the backward reruns attention's forward: only when the policy keeps neither
    attention's output nor its logsumexp. Counted in the gradient's jaxpr against remat 'none'
    (the kernel is XLA blockwise, through the same custom VJP as every kernel with halves)."""
    from pallas_kernels import blockwise
    from ctxjax.attention import backends

    def attention_forward(q, k, v, mask, *, scale=None):
        return blockwise.blockwise_attention_fwd(q, k, v, mask, scale=scale)

    functions = backends.Functions(None, jax.jit(attention_forward), blockwise.blockwise_attention_bwd)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, context=1)), jax.devices()[:1])
    attention = parallel.make_attention(functions, backends.BACKENDS["xla_blockwise"], mesh, None,
                                        mesh_lib.attention_axes(mesh))
    cfg = ModelConfig.from_config(tiny_config().model).replace(layer_pattern=("global",), n_layers=3)
    batch = random_batch(np.random.default_rng(), b=2, t=16)

    def count(jaxpr):
        from jax.extend.core import jaxprs_in_params
        return sum((eqn.params.get("name") == "attention_forward")
                   + sum(count(sub) for sub in jaxprs_in_params(eqn.params)) for eqn in jaxpr.eqns)

    def forwards(policy):
        plan = parallel.Plan(backend=backends.BACKENDS["xla_blockwise"], platform="cpu", context_strategy=None,
                             zigzag_shards=1, remat=policy, scan_layers=scan_layers, deterministic=True,
                             attention=attention)
        graphdef, params = init_params(cfg, seed=0, **plan.model_options())
        return count(jax.make_jaxpr(lambda p: loss_and_grads(graphdef, p, batch, None))(params).jaxpr)

    layers_traced = 1 if scan_layers else cfg.n_layers  # a scan's body is traced once for all layers
    assert forwards(remat) == forwards("none") + reruns * layers_traced


def test_layer_loop_auto_unrolls_only_on_gpus_when_activations_are_kept():
    assert not parallel.scan_layers("auto", "gpu", "save_matmuls")
    assert not parallel.scan_layers("auto", "gpu", "save_attention")
    assert parallel.scan_layers("auto", "gpu", "full")
    assert parallel.scan_layers("auto", "tpu", "save_matmuls") and parallel.scan_layers("auto", "cpu", "none")
    assert parallel.scan_layers("scan", "gpu", "save_matmuls") and not parallel.scan_layers("unrolled", "tpu", "full")
