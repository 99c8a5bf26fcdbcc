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

import pytest


SCRIPT = pathlib.Path(__file__).with_name("multidevice.py")


@functools.cache
def run_group(group: str) -> dict:
    environment = dict(os.environ)
    environment.pop("XLA_FLAGS", None)
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
