"""Several devices: the time axis split by `mesh=`, and the batch axis under vmap.

The checks run on 8 simulated CPU devices in a subprocess (tests/multidevice.py):
the flag that makes them must be set before JAX starts, and this process keeps one
device for the rest of the suite.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS
from diffrax_deer import DeerSolver


SCRIPT = pathlib.Path(__file__).with_name("multidevice.py")


@functools.cache
def run_group(group: str) -> dict:
    # The subprocess sets its own device count; only the tests' compile flags
    # (conftest) carry over.
    environment = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS)
    process = subprocess.run(
        [sys.executable, str(SCRIPT), group],
        capture_output=True,
        text=True,
        timeout=900,
        env=environment,
    )
    assert process.returncode == 0, process.stderr[-4000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scans():
    return run_group("scans")


@pytest.mark.slow
def test_sharded_scans_equal_single_device(scans):
    # Affine (full and diagonal) values and gradients in every input, and the damped
    # scan at two dampings, N + 1 = 38 nodes on 8 devices (padded to 40).
    errors = scans["errors"]
    assert len(errors) == 2 * (4 + 2)
    for name, error in errors.items():
        assert error <= 1e-12, (name, error)


@pytest.mark.slow
def test_sharded_scans_move_bytes_independent_of_length(scans):
    # The compiled program at 104 and 208 nodes: the same collectives, O(P n^2).
    small, large = scans["traffic"]["104"], scans["traffic"]["208"]
    assert small == large
    for name, num_bytes in small.items():
        # P = 8 blocks, n = 3: a handful of P n^2 float64 transfers at most.
        assert 0 < num_bytes <= 16 * 8 * 9 * 8, (name, num_bytes)


@pytest.fixture(scope="module")
def solver():
    return run_group("solver")


@pytest.mark.slow
def test_deer_solver_on_a_time_mesh_equals_single_device(solver):
    # The trapezoidal rule under DeerAdjoint and under diffrax's default adjoint:
    # value and gradients in y0 and args, two windows of 38 nodes on 8 devices.
    errors = solver["errors"]
    assert len(errors) == 2 * 3
    for name, error in errors.items():
        assert error <= 1e-12, (name, error)


@pytest.mark.slow
def test_stage_unknowns_on_a_time_mesh_equal_single_device(solver):
    # Radau IIA, quasi-DEER (diagonal Jacobians), 33 nodes (one block all
    # padding): the window solve's nodes and stages, and its gradient.
    errors = solver["stage_errors"]
    assert len(errors) == 4
    for name, error in errors.items():
        assert error <= 1e-12, (name, error)


@pytest.mark.slow
def test_stage_methods_on_a_time_mesh_under_deer_adjoint_are_refused(solver):
    message = solver["refused"]
    assert "DeerAdjoint" in message and "default adjoint" in message, message


@pytest.mark.slow
def test_deer_solver_on_a_time_mesh_moves_bytes_independent_of_length(solver):
    # The compiled gradient at 104 and 208 nodes: the same collectives.
    small, large = solver["traffic"]["103"], solver["traffic"]["207"]
    assert small == large
    assert len(small["loop_bytes"]) >= 1
    # P = 8 blocks, n = 3: the scans gather a few (A, b) per block (P (n^2 + n)
    # values each), and a block's neighbour sends a node: O(P n^2) in all.
    assert 0 < small["total_bytes"] <= 16 * 8 * (9 + 3) * 8, small


@pytest.mark.slow
def test_batch_split_over_devices_equals_one_device(solver):
    # jax.vmap over 8 initial values split over 8 devices: DeerSolver with
    # DeerAdjoint, and deer_scan, values and gradients.
    errors = solver["batch"]["errors"]
    assert len(errors) == 2 * 3
    for name, error in errors.items():
        assert error <= 1e-12, (name, error)
    # Each device holds its own initial value's result.
    for name, shards in solver["batch"]["shards"].items():
        assert shards == [[1]] * 8, (name, shards)


def _one_device_mesh(axis: str):
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), (axis,))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(num_steps=8, mesh="time"), "jax.sharding.Mesh"),
        (dict(num_steps=8, mesh=_one_device_mesh("batch")), "axis named 'time'"),
        (dict(mesh=_one_device_mesh("time")), "num_steps"),
        (
            dict(num_steps=8, mesh=_one_device_mesh("time"), error_estimate=True),
            "error_estimate=False",
        ),
        (
            dict(num_steps=8, mesh=_one_device_mesh("time"), adapt_mesh=True),
            "adapt_mesh=False",
        ),
    ],
    ids=["not-a-mesh", "no-time-axis", "no-grid", "error-estimate", "re-meshing"],
)
def test_unsupported_meshes_are_refused_with_the_remedy(options, match):
    with pytest.raises(ValueError, match=match):
        DeerSolver(**options)
