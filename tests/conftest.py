"""Shared test configuration: float64 by default, test problems, a Tsit5 reference."""

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest


# Tests run in float64; float32 tests pass explicit float32 arrays (t0/t1 included).
jax.config.update("jax_enable_x64", True)
# diffrax's own test settings (its test/conftest.py): no implicit rank promotion and
# no implicit dtype promotion, so DeerSolver stays usable inside code that sets them.
# A test that mixes dtypes on purpose says so with `jax.numpy_dtype_promotion`.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

from diffrax_deer import BackwardEuler, GaussLegendre, RadauIIA, Trapezoid  # noqa: E402
from diffrax_deer._bench.problems import MLPVectorField  # noqa: E402


# --------------------------------------------------------------------------------------
# Memory mappings: every compiled executable maps memory, and XLA crashes once the
# process reaches the kernel's `vm.max_map_count` (65530 by default). A long run of
# many small compiled solves got there; clearing JAX's caches releases them.
# --------------------------------------------------------------------------------------


def _count_lines(path: str) -> int | None:
    try:
        with open(path) as file:
            return sum(1 for _ in file)
    except OSError:  # not Linux
        return None


def _max_map_count() -> int:
    try:
        return int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65530


_MAPPINGS = {"peak": 0, "clears": 0}


@pytest.fixture(autouse=True, scope="module")
def _bound_memory_mappings():
    """After each test module: record the process's memory mappings, and clear
    JAX's caches if they pass a quarter of `vm.max_map_count` (never reached by this
    suite so far: it costs recompilation only when needed)."""
    yield
    count = _count_lines("/proc/self/maps")
    if count is None:
        return
    _MAPPINGS["peak"] = max(_MAPPINGS["peak"], count)
    if count > _max_map_count() // 4:
        jax.clear_caches()
        _MAPPINGS["clears"] += 1


def pytest_terminal_summary(terminalreporter):
    if _MAPPINGS["peak"]:
        terminalreporter.write_line(
            f"memory mappings: peak {_MAPPINGS['peak']} after a test module "
            f"(vm.max_map_count {_max_map_count()}), JAX caches cleared "
            f"{_MAPPINGS['clears']} times"
        )


# --------------------------------------------------------------------------------------
# diffrax-deer's own methods
# --------------------------------------------------------------------------------------

NATIVE_METHODS = {
    "backward_euler": BackwardEuler(),
    "trapezoid": Trapezoid(),
    "gauss_legendre2": GaussLegendre(stages=2),
    "gauss_legendre3": GaussLegendre(stages=3),
    "radau_iia3": RadauIIA(stages=3),
}


# --------------------------------------------------------------------------------------
# Test problems
# --------------------------------------------------------------------------------------


def lotka_volterra(t, y, args):
    """Lotka-Volterra with (alpha, beta, gamma, delta) = (1.5, 1, 3, 1)."""
    prey, predator = y[0], y[1]
    return jnp.stack([1.5 * prey - prey * predator, -3.0 * predator + prey * predator])


def van_der_pol(t, y, args):
    """Van der Pol oscillator with mu = 1."""
    x, v = y[0], y[1]
    return jnp.stack([v, (1.0 - x**2) * v - x])


def fitzhugh_nagumo(t, y, args):
    """FitzHugh-Nagumo: v' = v - v^3/3 - w + 0.5, w' = 0.08 (v + 0.7 - 0.8 w)."""
    v, w = y[0], y[1]
    return jnp.stack([v - v**3 / 3 - w + 0.5, 0.08 * (v + 0.7 - 0.8 * w)])


def lorenz(t, y, args):
    """Lorenz with (sigma, rho, beta) = (10, 28, 8/3)."""
    x, u, z = y[0], y[1], y[2]
    return jnp.stack([10.0 * (u - x), x * (28.0 - z) - u, x * u - 8.0 / 3.0 * z])


def mlp_vector_field(dtype=jnp.float64) -> MLPVectorField:
    """The NeuralODE-style softplus MLP field used across the project.

    Built in float64 from `key(0)` and then cast, so every dtype has the same weights
    (building it with `dtype=float32` would draw different random weights).
    """
    field = MLPVectorField(state_size=2, width=64, depth=2, key=jax.random.key(0))
    return jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, field
    )


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    vector_field: Callable[..., Any]
    y0: tuple[float, ...]
    t0: float
    t1: float

    def y0_array(self, dtype=jnp.float64):
        return jnp.asarray(self.y0, dtype=dtype)


PROBLEMS = {
    "lotka_volterra": Problem("lotka_volterra", lotka_volterra, (1.0, 1.0), 0.0, 10.0),
    "van_der_pol": Problem("van_der_pol", van_der_pol, (2.0, 0.0), 0.0, 20.0),
    "fitzhugh_nagumo": Problem(
        "fitzhugh_nagumo", fitzhugh_nagumo, (-1.0, 1.0), 0.0, 50.0
    ),
    "lorenz": Problem("lorenz", lorenz, (1.0, 1.0, 1.0), 0.0, 5.0),
    "mlp": Problem("mlp", mlp_vector_field(), (1.0, -1.0), 0.0, 10.0),
}


# --------------------------------------------------------------------------------------
# Reference solutions
# --------------------------------------------------------------------------------------


def tsit5_reference(f, y0, t0, t1, ts, args=None, *, tol=1e-12):
    """A tight adaptive Tsit5 solution of y' = f(t, y, args) at the times `ts`.

    Solved in float64 with rtol = atol = `tol` (1e-12 by default), so its error is
    negligible next to the second-order DEER discretisation error being tested.
    """
    y0 = jnp.asarray(y0, dtype=jnp.float64)
    ts = jnp.asarray(ts, dtype=jnp.float64)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f),
        diffrax.Tsit5(),
        t0=jnp.asarray(t0, jnp.float64),
        t1=jnp.asarray(t1, jnp.float64),
        dt0=None,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
        max_steps=1_000_000,
    )
    return np.asarray(sol.ys)


def trapezoid_linear_reference(A, y0, ts):
    """The exact discrete implicit-trapezoid solution of y' = A y, sequentially.

    Solves (I - h_i/2 A) y_{i+1} = (I + h_i/2 A) y_i with numpy, node by node, on the
    grid `ts` (any spacing), and returns all `len(ts)` nodes.
    """
    A = np.asarray(A, dtype=np.float64)
    ts = np.asarray(ts, dtype=np.float64)
    identity = np.eye(A.shape[0])
    ys = np.empty((len(ts), A.shape[0]))
    ys[0] = np.asarray(y0, dtype=np.float64)
    for i, h in enumerate(np.diff(ts)):
        implicit, explicit = identity - h / 2 * A, identity + h / 2 * A
        ys[i + 1] = np.linalg.solve(implicit, explicit @ ys[i])
    return ys


def sequential_trapezoid(f, y0, ts, args=None, *, newton_iters=8):
    """The implicit trapezoidal rule for y' = f(t, y, args), one step at a time.

    Each step solves y_{i+1} - y_i - h/2 (f_i + f_{i+1}) = 0 by `newton_iters` dense
    Newton iterations from an explicit Euler guess (quadratic convergence from an
    O(h^2) guess: machine precision after a few). This is the same discrete problem
    DEER solves all at once, so the two agree up to Newton tolerance and round-off.
    Returns all `len(ts)` nodes as a numpy array.
    """
    ts = jnp.asarray(ts, dtype=jnp.float64)
    y0 = jnp.asarray(y0, dtype=jnp.float64)
    identity = jnp.eye(y0.shape[0], dtype=y0.dtype)

    @jax.jit
    def solve(ts, y0):
        def step(y, interval):
            t, t_next = interval
            h = t_next - t
            f_here = f(t, y, args)

            def newton(z, _):
                residual = z - y - h / 2 * (f_here + f(t_next, z, args))
                jacobian = jax.jacfwd(lambda _z: f(t_next, _z, args))(z)
                z = z - jnp.linalg.solve(identity - h / 2 * jacobian, residual)
                return z, None

            y_next, _ = jax.lax.scan(newton, y + h * f_here, None, length=newton_iters)
            return y_next, y_next

        _, ys = jax.lax.scan(step, y0, (ts[:-1], ts[1:]))
        return jnp.concatenate([y0[None], ys])

    return np.asarray(solve(ts, y0))
