"""Compile for a real TPU topology on a machine without TPUs (ahead-of-time, nothing runs).

`tpu_topology` is a pytest fixture: use it as an argument, or call `tpu_topology_desc(name)`.
It needs libtpu (`pip install -e ".[tpu]"`: jax[tpu] at the installed jax); without it the
test is skipped, except under CI=true, where it fails so a missing install cannot pass unseen.

libtpu holds a lock file (/tmp/libtpu_lockfile) for the process that opens it. Compiling
touches no chip, so ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets a test compile while another process
(another test run) holds the lock. Compile inside the test process: few and small programs.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import pytest


def tpu_topology_desc(name: str = "v5e:2x2"):
    """The TopologyDescription of `name` (e.g. "v5e:2x2", "v5p:2x2x1"), or skip / fail."""
    if importlib.util.find_spec("libtpu") is None:
        message = ("libtpu is not installed, so the TPU compiler is missing; "
                   "install it with pip install -e '.[tpu]' (jax[tpu]'s libtpu for the installed jax).")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: the lock guards the chips
    return _topology(name)


@functools.lru_cache(maxsize=None)
def _topology(name: str):
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=name)


def tpu_mesh(topology, shape, axis_names):
    """A jax.sharding.Mesh over the topology's devices (in their order), reshaped to `shape`."""
    from jax.sharding import Mesh
    return Mesh(np.asarray(topology.devices).reshape(shape), axis_names)


@pytest.fixture(scope="session")
def tpu_topology():
    """The v5e 2x2 topology (4 chips): enough for every mesh of two axes of two."""
    return tpu_topology_desc("v5e:2x2")
