"""The real train step compiled for TPU topologies on this CPU host (libtpu's compiler; nothing
runs): a tiny model (d_model 256, 1K tokens, local + global layers, a SkyLadder window passed at
run time) on v5e, v5p and v6e, with fsdp only and with a context axis of 2 (ring); the Pallas
TPU kernel inside it (shard_map over the mesh); splash; and the `python -m ctxjax.aot` pre-flight.

Without libtpu these tests skip, and under CI=true they fail (tests/tpu_topology.py).
Each compile takes 10-25 s on 2 cores (the whole file about 2 minutes when nothing else runs),
so there are few: each topology and each layout once, the Pallas TPU kernel on v5p both ways.
"""
import os
import re
import subprocess
import sys

import jax
import pytest

from ctxjax import aot
from ctxjax import mesh as mesh_lib
from ctxjax import metrics
from ctxjax.config import load_config, set_by_path
from tpu_topology import tpu_topology_desc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny model shaped like the real ones: bf16, head_dim 64, a local (window 256) and a global
# layer whose SkyLadder window climbs from 128 to the full 1024 tokens.
TINY = {
    "model.d_model": 256, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.mlp_dim": 512,
    "model.dtype": "bfloat16", "model.layer_pattern": ("local", "global"), "model.local_window": 256,
    "model.max_position_embeddings": 1024,
    "train.seq_len": 1024, "train.global_batch_size": 4, "train.steps": 100, "eval.batch_size": 4,
    "skyladder.enabled": True, "skyladder.start": 128, "skyladder.multiple_of": 128, "skyladder.climb_fraction": 0.5,
    "parallel.attention": "pallas_tpu",
}
FSDP, RING = {"mesh.fsdp": 4}, {"mesh.fsdp": 2, "mesh.context": 2}


def tiny_config(**overrides):
    config = load_config(os.path.join(REPO, "configs", "tiny_cpu.py"), TINY)
    for key, value in overrides.items():
        set_by_path(config, key, value)
    return config


def prepare(topology: str, overrides: dict) -> aot.Target:
    tpu_topology_desc(topology)  # skips without libtpu (fails under CI=true)
    return aot.prepare(tiny_config(**overrides), topology)


def compile_program(target: aot.Target, index: int = 0):
    """(lowered, compiled) of the target's index-th program (0: the train step with a window)."""
    program = aot.programs_of(target)[index]
    # conftest.py sets jax_default_matmul_precision='highest' for the CPU tests; training runs at
    # the default, and Mosaic cannot contract bf16 operands at fp32 precision ("Bad lhs type")
    with mesh_lib.use_mesh(target.mesh), jax.default_matmul_precision("default"):
        lowered = program.lower()
        return program, lowered, lowered.compile()


def window_is_an_input(lowered) -> bool:
    """The last argument of the lowered program (the window) is kept as an int32 scalar input:
    jit drops unused arguments, and a window baked in as a constant would need a recompile."""
    signature = re.search(r"func\.func public @main\((.*?)\)\s*->", lowered.as_text(), re.S).group(1)
    arguments = re.findall(r"%arg\d+: (tensor<[^>]*>)", signature)
    return len(arguments) == len(jax.tree.leaves(lowered.args_info)) and arguments[-1] == "tensor<i32>"


# ---------------------------------------------------------------------------- the train step

CASES = {  # each topology, each layout: Mosaic under shard_map (fsdp) and inside the ring
    "v5p fsdp 4": ("v5p:2x2x1", FSDP),
    "v5p fsdp 2 x ring 2": ("v5p:2x2x1", RING),
    "v5e fsdp 2 x ring 2": ("v5e:2x2", RING),
    "v6e fsdp 4": ("v6e:2x2", FSDP),
}


@pytest.mark.parametrize("case", CASES)
def test_train_step_compiles_for_tpu(case):
    """The real train step (forward, backward, AdamW) with the Pallas TPU kernel: Mosaic kernels
    run inside shard_map on a multi-device mesh (XLA cannot partition them; without it the
    compile fails with "Mosaic kernels cannot be automatically partitioned"), or inside the
    ring. The SkyLadder window is an input of the program, so a new window never recompiles."""
    topology, mesh = CASES[case]
    target = prepare(topology, mesh)
    assert target.plan.backend.name == "pallas_tpu" and target.plan.platform == "tpu"
    program, lowered, compiled = compile_program(target)
    assert "SkyLadder window as an argument" in program.name
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the Mosaic kernels, forward and backward, compiled for TPU
    assert window_is_an_input(lowered)  # a new window value runs the same executable
    if "ring" in case:
        assert target.plan.context_strategy == "ring" and aot.count_collectives(text)["collective-permute"] > 0
    assert 0 < aot.peak_bytes(compiled) < target.hbm


def test_splash_refuses_what_it_cannot_apply():
    """splash trains with static masks only (causal, documents, fixed windows; the CLI test
    compiles it); a SkyLadder window, sinks or context parallelism are refused at start-up."""
    refusals = {
        "a window that changes during training": {},
        "attention sinks": {"skyladder.enabled": False, "model.sinks": 4},
        "no forward/backward halves for context parallelism": dict(RING, **{"skyladder.enabled": False}),
    }
    for reason, overrides in refusals.items():
        with pytest.raises(ValueError, match=f"'splash' cannot run this model here: .*{reason}"):
            prepare("v5e:2x2", dict(FSDP, **{"parallel.attention": "splash"}, **overrides))


# ---------------------------------------------------------------------------- the CLI

def run_aot(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    return subprocess.run([sys.executable, "-m", "ctxjax.aot", "--config=configs/tiny_cpu.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_preflight_cli_with_splash(tmp_path):
    """python -m ctxjax.aot compiles every program of a run and says what each needs; here a
    splash run (documents and a local window: static masks, so no SkyLadder) on v5e:2x2."""
    tpu_topology_desc("v5e:2x2")
    overrides = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in TINY.items()]
    done = run_aot("--topology=v5e:2x2", *overrides, "--config.skyladder.enabled=False",
                   "--config.parallel.attention=splash", f"--hlo_dir={tmp_path}")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    expected = [
        r"pre-flight on v5e:2x2: 4 x TPU v5 lite, 16.0 GiB HBM, 197 TFLOP/s bf16, 0.82 TB/s per chip; JAX .*, libtpu .*",
        r"mesh: fsdp=4",
        r"attention: splash .* on tpu; remat: none",
        r"  layers 0: causal \+ documents \+ window 256",
        r"  layers 1: causal \+ documents$",
        r"\[1/2\] train step, 4 rows x 1024 tokens, no window term \(steps 0-99\)",
        r"    compiled in [\d.]+ s",
        r"    memory: [\d.]+ GiB per device \(arguments .*\); \d+% of 16.0 GiB HBM",
        r"    collectives: all-gather [1-9]\d*, reduce-scatter [1-9]\d*, all-reduce \d+, collective-permute 0, "
        r"all-to-all 0 \(ops in the compiled program; a loop body counts once\)",
        r"    bytes accessed: [\d.]+ GB per chip \(cost_analysis; a loop body counts once\)",
        r"    FLOPs per step: [\d.]+ TFLOP \(ctxjax count.*\); MaxText count [\d.]+ TFLOP",
        r"    estimated step time: .* at MFU 0.4, .* at MFU 0.6 \(bytes term .*\)",
        r"\[2/2\] eval step, 4 rows x 1024 tokens",
        r"step time = max\(FLOPs / \(chips x peak bf16 FLOP/s x MFU\), bytes accessed / HBM bandwidth\)",
        r"pre-flight passed: 2 programs compiled; the largest needs [\d.]+ GiB of the 16.0 GiB per chip",
    ]
    for pattern in expected:
        assert any(re.match(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n{done.stdout}"
    assert sorted(os.listdir(tmp_path)) == ["1_train.hlo.txt", "2_eval.hlo.txt"]
    assert "tpu_custom_call" in (tmp_path / "1_train.hlo.txt").read_text()  # splash's Mosaic kernels

    # a wrong key or a mesh that the topology cannot hold: one line, exit status 2, nothing compiled
    done = run_aot("--topology=v5e:2x2", "--config.model.d_modl=3")
    assert done.returncode == 2 and done.stdout.strip().splitlines()[-1].startswith("error: bad --config value")
    assert 'Did you mean "d_model"' in done.stdout


def test_config_and_topology_errors_are_one_line():
    with pytest.raises(ValueError, match=r"needs 8 devices but 4 are available.*\(v5e:2x2 has 4 chips\)"):
        prepare("v5e:2x2", {"mesh.fsdp": 8})
    with pytest.raises(ValueError, match="cannot get TPU topology 'v5e:3x3x3': INVALID_ARGUMENT"):
        aot.prepare(tiny_config(**FSDP), "v5e:3x3x3")


def test_a_step_that_does_not_fit_fails_in_one_line():
    """XLA's RESOURCE_EXHAUSTED (here 1.5B parameters unsharded, fsdp 1 x context 4, on 16 GiB
    v5e chips) is a failed pre-flight, said in one line with what to try."""
    tpu_topology_desc("v5e:2x2")
    config = load_config(os.path.join(REPO, "configs", "llama3_8b_128k_tpu_v5p.py"), {
        "model.n_layers": 2, "mesh.context": 4, "train.seq_len": 8192, "train.global_batch_size": 4,
        "eval.batch_size": 4, "skyladder.enabled": False})
    lines = []
    with pytest.raises(aot.DoesNotFit) as failure, jax.default_matmul_precision("default"):
        aot.preflight(aot.prepare(config, "v5e:2x2"), out=lines.append)
    message = str(failure.value)
    assert "\n" not in message and lines[-1].startswith("[1/2] train step")
    assert re.match(r"does not fit: train step, .* needs more than the 16.0 GiB of a TPU v5 lite \(XLA: "
                    r"RESOURCE_EXHAUSTED.*\); try more fsdp \(mesh.fsdp\), .*context parallelism", message), message


# ---------------------------------------------------------------------------- the shipped TPU config

def test_llama3_8b_config_passes_its_checks_on_v5p_256():
    """configs/llama3_8b_128k_tpu_v5p.py on its slice, v5p-256 = v5p:4x4x8 (128 chips): fsdp 16 x
    context 8, every batch split evenly (the pre-flight compiles it: docs/benchmarks.md)."""
    tpu_topology_desc("v5p:4x4x8")
    target = aot.prepare(load_config(os.path.join(REPO, "configs", "llama3_8b_128k_tpu_v5p.py")), "v5p:4x4x8")
    assert dict(target.mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 1, "context": 8, "ulysses": 1}
    assert (target.plan.backend.name, target.plan.context_strategy) == ("pallas_tpu", "ring")


# ---------------------------------------------------------------------------- chips

def test_chip_tables_know_every_tpu_topology():
    """HBM and peak FLOP/s by device kind (a v5p says "TPU v5", a v5e "TPU v5 lite"), the HBM
    sizes as JAX's own TPU info has them."""
    from jax.experimental.pallas import tpu as pltpu
    chips = {"v4:2x2x1": ("v4", 275), "v5e:2x2": ("v5e", 197), "v5p:2x2x1": ("v5p", 459), "v6e:2x2": ("v6e", 918)}
    for topology, (version, tflops) in chips.items():
        device = tpu_topology_desc(topology).devices[0]
        hbm, bandwidth = aot.chip_hbm(device)
        assert metrics.peak_flops_per_device(device) == tflops * 1e12 and bandwidth > 0.5e12
        if hasattr(pltpu, "get_tpu_info_for_chip"):
            info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(version), 1)
            assert abs(hbm - info.hbm_capacity_bytes * info.chip_version.num_physical_tensor_cores_per_chip) < 0.08 * hbm


def test_count_collectives():
    """Async collectives count once; XLA:TPU's reduce-scatter fusion counts as a reduce-scatter."""
    text = ("%all-reduce-scatter.1 (input.1: bf16[768,256]) -> bf16[768,64] {\n"
            "  %all-reduce.68 = bf16[768,256] all-reduce(%input.1), to_apply=%add\n"
            "  ROOT %dynamic-slice.1 = bf16[768,64] dynamic-slice(%all-reduce.68, %c, %i)\n"
            "}\n\n"
            "ENTRY %main (p: bf16[4]) -> bf16[16] {\n"
            "  %all-gather-start.1 = (bf16[4], bf16[16]) all-gather-start(bf16[4] %p), dimensions={0}\n"
            "  %all-gather-done.1 = bf16[16] all-gather-done(%all-gather-start.1)\n"
            "  %ar = f32[] all-reduce(f32[] %x), to_apply=%add\n"
            "  %cp = bf16[8] collective-permute(bf16[8] %y), source_target_pairs={{0,1},{1,0}}\n"
            "  %fusion = bf16[768,64] fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1, metadata={}\n"
            "}\n")
    assert aot.count_collectives(text) == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1,
                                           "collective-permute": 1, "all-to-all": 0}
