"""Checks on 8 simulated CPU devices, run as a script in a subprocess by
test_sharding.py (the test process itself keeps one device).

Groups: `scans` (the sharded recurrences alone) and `solver` (DeerSolver with the
time axis split by `mesh=`, and the batch axis split under `jax.vmap` for
DeerSolver and `deer_scan`).

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
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import diffrax  # noqa: E402

from diffrax_deer import (  # noqa: E402
    DeerAdjoint,
    DeerSolver,
    RadauIIA,
    deer_scan,
    solve_affine_recurrence,
    solve_damped_recurrence,
)
from diffrax_deer._bench.collectives import collective_traffic  # noqa: E402
from diffrax_deer._core.window import solve_window  # noqa: E402


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


def _field(t, y, args):
    # A forced, damped pendulum driving a third, relaxing component: n = 3, so
    # that n^2 and n transfers differ.
    strength = args
    return jnp.stack(
        [y[1], -strength * jnp.sin(y[0]) - 0.1 * y[1] + jnp.sin(t), y[0] - y[2]]
    )


_Y0 = jnp.array([1.0, 0.0, 0.5])
_STRENGTH = jnp.array(2.0)


def _solve_loss(solver, adjoint, t1=2.0, dt0=1.0):
    """The value and gradient (in y0 and the field's argument) of a loss of the
    solution at t1, solved over windows of length dt0."""

    def loss(y0, strength):
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(_field),
            solver,
            0.0,
            t1,
            dt0,
            y0,
            args=strength,
            adjoint=adjoint,
        )
        return jnp.sum(jnp.sin(solution.ys))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _time_axis_errors() -> dict:
    """DeerSolver(mesh=) against the one-device solve: value and gradients, on
    two windows of N = 37 intervals (38 nodes on 8 devices: padded to 40), under
    DeerAdjoint and under diffrax's default adjoint (whose gradient is the same
    implicit one, so one one-device reference serves both). Quasi-DEER is checked
    on the window solve itself (`_stage_method_errors`), at less compile time."""
    # Without the error estimate, which a mesh turns off too (it changes no value).
    one_device = DeerSolver(num_steps=37, error_estimate=False)
    reference = _solve_loss(one_device, DeerAdjoint())
    want_value, want_grads = reference(_Y0, _STRENGTH)
    split = DeerSolver(num_steps=37, mesh=MESH)
    errors = {}
    for name, adjoint in (
        ("deer_adjoint", DeerAdjoint()),
        ("default_adjoint", diffrax.RecursiveCheckpointAdjoint()),
    ):
        value, grads = _solve_loss(split, adjoint)(_Y0, _STRENGTH)
        errors[f"{name}_value"] = _relative_error(value, want_value)
        errors[f"{name}_grad_y0"] = _relative_error(grads[0], want_grads[0])
        errors[f"{name}_grad_args"] = _relative_error(grads[1], want_grads[1])
    return errors


def _stage_method_errors() -> dict:
    """The window solve itself (`solve_window`, no diffrax loop: a fraction of the
    compile time) with Radau IIA's stage unknowns and quasi-DEER, split against
    whole: nodes, stages, and the gradient in y0 and args. 33 nodes: the last of
    the 8 blocks is all padding."""
    ts = jnp.linspace(0.0, 2.0, 33)

    def solve(y0, strength, mesh):
        ys, stages, _ = solve_window(
            _field,
            RadauIIA(stages=3),
            ts,
            y0,
            strength,
            rtol=1e-12,
            atol=None,
            max_iters=40,
            predictor_steps=8,
            jacobian="diagonal",
            mesh=mesh,
        )
        return ys, stages

    def loss(y0, strength, mesh):
        ys, stages = solve(y0, strength, mesh)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(stages**2)

    errors = {}
    got = jax.jit(solve, static_argnums=2)(_Y0, _STRENGTH, MESH)
    want = jax.jit(solve, static_argnums=2)(_Y0, _STRENGTH, None)
    errors["radau_diagonal_nodes"] = _relative_error(got[0], want[0])
    errors["radau_diagonal_stages"] = _relative_error(got[1], want[1])
    gradient = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    got, want = gradient(_Y0, _STRENGTH, MESH), gradient(_Y0, _STRENGTH, None)
    errors["radau_diagonal_grad_y0"] = _relative_error(got[0], want[0])
    errors["radau_diagonal_grad_args"] = _relative_error(got[1], want[1])
    return errors


def _refused_under_deer_adjoint() -> str:
    """The error for a collocation method on a mesh under DeerAdjoint (raised
    while tracing, before any compilation)."""
    solver = DeerSolver(num_steps=15, method=RadauIIA(stages=3), mesh=MESH)
    try:
        jax.eval_shape(_solve_loss(solver, DeerAdjoint()), _Y0, _STRENGTH)
    except ValueError as error:
        return str(error)
    return ""


def _time_axis_traffic(num_steps: int) -> dict:
    """Collectives in the compiled gradient of one window split over the mesh:
    in the whole program, and in its outermost loop (diffrax's over windows, which
    holds the Newton loop)."""
    solver = DeerSolver(num_steps=num_steps, mesh=MESH)
    loss = _solve_loss(solver, DeerAdjoint(), t1=1.0, dt0=1.0)
    total, loops = collective_traffic(loss.lower(_Y0, _STRENGTH).compile().as_text())
    return {
        "total_bytes": total.total_bytes,
        "total_count": total.total_count,
        "counts": dict(total.counts),
        "loop_bytes": [loop.total_bytes for loop in loops],
    }


def _batch_errors() -> dict:
    """`jax.vmap` over 8 initial values with the batch split over the devices,
    against the same on one device: DeerSolver with DeerAdjoint, and deer_scan;
    values and gradients. Also whether the results stayed split."""
    batch_mesh = Mesh(np.array(jax.devices()), ("batch",))
    split = NamedSharding(batch_mesh, PartitionSpec("batch"))
    replicated = NamedSharding(batch_mesh, PartitionSpec())
    y0s = _Y0[None] + 0.1 * jax.random.normal(jax.random.key(6), (8, 3), jnp.float64)
    # Without the error estimate: the batch axis, not the estimate, is checked here.
    solve = _solve_loss(DeerSolver(num_steps=16, error_estimate=False), DeerAdjoint())
    batched_solve = jax.vmap(lambda y0, s: solve(y0, s), in_axes=(0, None))

    weights = jax.random.normal(jax.random.key(7), (3, 3), jnp.float64) / 3
    xs = jax.random.normal(jax.random.key(8), (20, 3), jnp.float64)

    def scan_loss(h0, weights):
        def cell(h, x):
            new = jnp.tanh(weights @ h + x)
            return new, new

        _, hs = deer_scan(cell, h0, xs)
        return jnp.sum(hs**2)

    batched_scan = jax.vmap(
        jax.value_and_grad(scan_loss, argnums=(0, 1)), in_axes=(0, None)
    )
    errors, split_outputs = {}, {}
    for name, function, shared in (
        ("solver", batched_solve, _STRENGTH),
        ("deer_scan", batched_scan, weights),
    ):
        want = jax.jit(function)(y0s, shared)
        got = jax.jit(function)(
            jax.device_put(y0s, split), jax.device_put(shared, replicated)
        )
        (value, grads), (reference, reference_grads) = got, want
        errors[f"{name}_value"] = _relative_error(value, reference)
        errors[f"{name}_grad_y0"] = _relative_error(grads[0], reference_grads[0])
        errors[f"{name}_grad_shared"] = _relative_error(grads[1], reference_grads[1])
        # One initial value per device: each device holds one row of the result.
        split_outputs[name] = [
            list(shard.data.shape) for shard in value.addressable_shards
        ]
    return {"errors": errors, "shards": split_outputs}


def solver() -> dict:
    results = {}
    for name, check in (
        ("errors", _time_axis_errors),
        ("stage_errors", _stage_method_errors),
        ("refused", _refused_under_deer_adjoint),
        ("traffic", lambda: {str(n): _time_axis_traffic(n) for n in (103, 207)}),
        ("batch", _batch_errors),
    ):
        start = time.perf_counter()
        results[name] = check()
        # Progress, for a failure's report (the tests read stdout's last line).
        seconds = time.perf_counter() - start
        print(f"{name} ({seconds:.0f} s)", json.dumps(results[name]), file=sys.stderr)
    return results


GROUPS = {"scans": scans, "solver": solver}


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    print(json.dumps(GROUPS[sys.argv[1]]()))
