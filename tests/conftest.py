"""Shared test configuration: float64 by default, test problems (from the registry),
a Tsit5 reference; memory mappings kept under the kernel's limit."""

import os
import pathlib


# Before JAX starts its CPU backend: compile at LLVM's level 0, with XLA's elemental
# emitters rather than its fusion emitters, and run Eigen's kernels on one thread.
# The tests compile hundreds of small programs and time none of them, and the
# arithmetic stays IEEE (no fast-math at any level). Level 0 does not contract
# `a * b + c` into fused multiply-adds, so results differ from a user's (level 3) in
# the last bit; the registry's tight references compile at level 3
# (`_bench.solves.solve_reference`), as Robertson's depends on that bit, while
# `tsit5_reference` below (smooth test fields, no such cancellation) stays at 0.
# Measured, the whole suite on the 2 cores (`-n 2`): 1186 s at level 0 with the
# fusion emitters, 1022 s at level 1 with the elemental ones, 699 s with these.
TEST_XLA_FLAGS = " ".join(
    [
        "--xla_backend_optimization_level=0",
        "--xla_cpu_use_fusion_emitters=false",
        "--xla_cpu_multi_thread_eigen=false",
    ]
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


# Tests run in float64; float32 tests pass explicit float32 arrays (t0/t1 included).
jax.config.update("jax_enable_x64", True)
# diffrax's own test settings (its test/conftest.py): no implicit rank promotion and
# no implicit dtype promotion, so DeerSolver stays usable inside code that sets them.
# A test that mixes dtypes on purpose says so with `jax.numpy_dtype_promotion`.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

from diffrax_deer import BackwardEuler, GaussLegendre, RadauIIA, Trapezoid  # noqa: E402
from diffrax_deer._bench.problems import get_problem  # noqa: E402
from diffrax_deer._bench.solves import Instance, solve_adaptive  # noqa: E402


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
# Test problems: the registry's (diffrax_deer/_bench/problems.py)
# --------------------------------------------------------------------------------------


PROBLEMS = {
    name.replace("-", "_"): get_problem(name)
    for name in ("lotka-volterra", "van-der-pol", "fitzhugh-nagumo", "lorenz", "mlp")
}
lotka_volterra = PROBLEMS["lotka_volterra"].vector_field
van_der_pol = PROBLEMS["van_der_pol"].vector_field
fitzhugh_nagumo = PROBLEMS["fitzhugh_nagumo"].vector_field
lorenz = PROBLEMS["lorenz"].vector_field


def mlp_vector_field(dtype=jnp.float64):
    """The NeuralODE-style softplus MLP field (2-64-64-2) used across the project,
    its float64 weights cast to `dtype` (so every dtype has the same weights)."""
    return PROBLEMS["mlp"].field(dtype)


# --------------------------------------------------------------------------------------
# Reference solutions
# --------------------------------------------------------------------------------------


def tsit5_reference(f, y0, t0, t1, ts, args=None, *, tol=1e-12):
    """A tight adaptive Tsit5 solution of y' = f(t, y, args) at the times `ts`.

    Solved in float64 with rtol = atol = `tol` (1e-12 by default), so its error is
    negligible next to the second-order DEER discretisation error being tested.
    """
    case = Instance(
        term=diffrax.ODETerm(f),
        y0=jnp.asarray(y0, dtype=jnp.float64),
        t0=jnp.asarray(t0, jnp.float64),
        t1=jnp.asarray(t1, jnp.float64),
        save_ts=jnp.asarray(ts, dtype=jnp.float64),
        args=args,
    )
    sol = solve_adaptive(diffrax.Tsit5(), jnp.asarray(tol), case, 1_000_000)
    assert sol.result == diffrax.RESULTS.successful
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
