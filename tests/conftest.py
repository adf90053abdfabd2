"""Test setup: 8 simulated CPU devices, set before JAX is first imported."""
import os
import shutil

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# Without a GPU, run on the CPU only: with libtpu installed (for compiling against TPU
# topologies), JAX would otherwise probe for a TPU and log its failure in every process.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Tests run the same programs many times (train, stop, resume): a persistent compilation
# cache, fresh for each session, turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ctxjax-test-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower test (kept few)")
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped without one")
