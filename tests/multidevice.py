"""Checks on 8 simulated CPU devices, run as a script in a subprocess by
test_sharding.py (the test process itself keeps one device).

`python tests/multidevice.py GROUP` prints one JSON object of named figures (errors
against the single-device solve, collective bytes from the compiled HLO); the tests
assert on them.
"""

import os
import sys


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

from diffrax_deer import solve_affine_recurrence, solve_damped_recurrence  # noqa: E402
from diffrax_deer._bench.collectives import collective_traffic  # noqa: E402


MESH = Mesh(np.array(jax.devices()), ("time",))
SPLIT = NamedSharding(MESH, PartitionSpec("time"))
REPLICATED = NamedSharding(MESH, PartitionSpec())


def _relative_error(x, reference) -> float:
    x, reference = np.asarray(x), np.asarray(reference)
    return float(np.max(np.abs(x - reference)) / max(np.max(np.abs(reference)), 1e-300))


def _recurrence(num_steps, n, diagonal, seed):
    key_a, key_b, key_d = jax.random.split(jax.random.key(seed), 3)
    noise = jax.random.normal(key_a, (num_steps, n, n), jnp.float64)
    transitions = jnp.eye(n, dtype=jnp.float64)[None] + 0.5 * noise / np.sqrt(n)
    if diagonal:
        transitions = jnp.diagonal(transitions, axis1=1, axis2=2)
    offsets = jax.random.normal(key_b, (num_steps, n), jnp.float64)
    initial = jax.random.normal(key_d, (n,), jnp.float64)
    return transitions, offsets, initial


def _gradient(solve, weights):
    def loss(transitions, offsets, initial):
        return jnp.sum(weights * solve(transitions, offsets, initial))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _scan_errors(num_steps, n) -> dict:
    """Sharded against single-device scans: values, and gradients in all inputs."""
    errors = {}
    for diagonal in (False, True):
        name = "diagonal" if diagonal else "full"
        transitions, offsets, initial = _recurrence(num_steps, n, diagonal, seed=3)
        weights = jax.random.normal(jax.random.key(4), (num_steps + 1, n))

        def sharded(a, b, d):
            return solve_affine_recurrence(a, b, d, mesh=MESH)

        args = (transitions, offsets, initial)
        reference = jax.jit(solve_affine_recurrence)(*args)
        errors[f"affine_{name}"] = _relative_error(jax.jit(sharded)(*args), reference)
        for which, got, want in zip(
            ("transitions", "offsets", "initial"),
            _gradient(sharded, weights)(*args),
            _gradient(solve_affine_recurrence, weights)(*args),
            strict=True,
        ):
            errors[f"affine_{name}_grad_{which}"] = _relative_error(got, want)
        for damping in (0.0, 0.5):
            got = jax.jit(
                lambda a, b, lam: solve_damped_recurrence(a, b, lam, mesh=MESH)
            )(transitions, offsets, damping)
            want = jax.jit(solve_damped_recurrence)(transitions, offsets, damping)
            errors[f"damped_{name}_{damping}"] = _relative_error(got, want)
    return errors


def _scan_traffic(num_nodes, n) -> dict:
    """Bytes delivered by collectives in the compiled sharded scans (with their
    gradient), with nodes-sized inputs split over the mesh as a window's are."""
    traffic = {}
    for diagonal in (False, True):
        name = "diagonal" if diagonal else "full"
        transitions, offsets, initial = _recurrence(num_nodes, n, diagonal, seed=5)

        def loss(a, b, d):
            nodes = solve_affine_recurrence(a[:-1], b[:-1], d, mesh=MESH)
            return jnp.sum(jnp.sin(nodes))

        def damped(a, b):
            return solve_damped_recurrence(a[:-1], b[:-1], 0.5, mesh=MESH)

        shardings = (SPLIT, SPLIT, REPLICATED)
        compiled = (
            jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=shardings)
            .lower(transitions, offsets, initial)
            .compile()
        )
        total, _ = collective_traffic(compiled.as_text())
        traffic[f"affine_{name}_grad_bytes"] = total.total_bytes
        compiled = (
            jax.jit(damped, in_shardings=shardings[:2], out_shardings=SPLIT)
            .lower(transitions, offsets)
            .compile()
        )
        total, _ = collective_traffic(compiled.as_text())
        traffic[f"damped_{name}_bytes"] = total.total_bytes
    return traffic


def scans() -> dict:
    # 38 nodes on 8 devices: blocks of 5, two padded steps.
    results = {"errors": _scan_errors(num_steps=37, n=3)}
    results["traffic"] = {str(num): _scan_traffic(num, n=3) for num in (8 * 13, 8 * 26)}
    return results


GROUPS = {"scans": scans}


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    print(json.dumps(GROUPS[sys.argv[1]]()))
