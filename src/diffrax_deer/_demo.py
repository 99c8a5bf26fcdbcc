"""The main demo: a NeuralODE-style problem solved by DeerSolver and by Tsit5."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import diffrax
import jax
import jax.numpy as jnp

from ._problems import MLPVectorField
from ._solver import DeerSolver


@dataclass
class Timed:
    value: object
    compile_seconds: float
    run_seconds: float


def time_jitted(fn: Callable, *args, repeats: int = 5) -> Timed:
    """Compile time of the first call, median time of `repeats` later calls."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    value = jax.block_until_ready(jitted(*args))
    compile_seconds = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        runs.append(time.perf_counter() - start)
    runs.sort()
    return Timed(value, compile_seconds, runs[len(runs) // 2])


def run_demo(num_steps: int = 10_000, float64: bool = True, repeats: int = 5) -> bool:
    """Solves the same NeuralODE-style problem three ways and prints a comparison.

    **Arguments:**

    - `num_steps`: DeerSolver's intervals in its one window (and Tsit5's fixed steps).
    - `float64`: solve in float64 (else float32).
    - `repeats`: timed runs after compilation; the median is shown.

    **Returns:**

    Whether DeerSolver converged and agrees with Tsit5 within the trapezoid's
    expected discretisation error.
    """
    jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if float64 else jnp.float32
    vector_field = MLPVectorField(key=jax.random.key(0), dtype=dtype)
    term = diffrax.ODETerm(vector_field)
    t0, t1 = jnp.array(0.0, dtype), jnp.array(10.0, dtype)
    y0 = jnp.array([1.0, -1.0], dtype)
    save_ts = jnp.linspace(t0, t1, 101)
    grid = jnp.linspace(t0, t1, num_steps + 1)

    def deer(y0):
        return diffrax.diffeqsolve(
            term,
            DeerSolver(num_steps=num_steps),
            t0,
            t1,
            t1 - t0,
            y0,
            saveat=diffrax.SaveAt(ts=save_ts, solver_state=True),
        )

    def tsit5_fixed(y0):
        return diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            t0,
            t1,
            None,
            y0,
            saveat=diffrax.SaveAt(ts=save_ts),
            stepsize_controller=diffrax.StepTo(grid),
            max_steps=num_steps,
        )

    def tsit5_reference(y0):
        tolerance = 1e-12 if float64 else 1e-7
        return diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            t0,
            t1,
            None,
            y0,
            saveat=diffrax.SaveAt(ts=save_ts),
            stepsize_controller=diffrax.PIDController(rtol=tolerance, atol=tolerance),
            max_steps=100_000,
        )

    print(
        f"NeuralODE-style field: MLP 2-64-64-2 (softplus), t in [0, 10], "
        f"{jnp.dtype(dtype).name}, {jax.devices()[0].platform.upper()}"
    )
    results = {
        f"DeerSolver(num_steps={num_steps})": time_jitted(deer, y0, repeats=repeats),
        f"Tsit5 + StepTo ({num_steps} steps)": time_jitted(
            tsit5_fixed, y0, repeats=repeats
        ),
        "Tsit5 + PIDController (reference)": time_jitted(
            tsit5_reference, y0, repeats=repeats
        ),
    }
    reference = results["Tsit5 + PIDController (reference)"].value.ys
    header = f"{'solver':<36} {'max error':>10} {'Newton its':>10} "
    header += f"{'compile s':>10} {'run ms':>10}"
    print(header)
    print("-" * len(header))
    for name, timed in results.items():
        error = float(jnp.max(jnp.abs(timed.value.ys - reference)))
        state = timed.value.solver_state
        iterations = "-" if state is None else str(int(state.num_iters))
        print(
            f"{name:<36} {error:>10.2e} {iterations:>10} "
            f"{timed.compile_seconds:>10.2f} {1e3 * timed.run_seconds:>10.2f}"
        )
    deer_timed = next(iter(results.values()))
    fixed_timed = results[f"Tsit5 + StepTo ({num_steps} steps)"]
    speedup = fixed_timed.run_seconds / deer_timed.run_seconds
    deer_solution = deer_timed.value
    deer_error = float(jnp.max(jnp.abs(deer_solution.ys - reference)))
    # The trapezoid's global error is about h^2/12 times the solution's scale and
    # growth; 1e-2 h^2 scale is far above that at this size but catches a wrong
    # answer (and float32 round-off is allowed for).
    step = 10.0 / num_steps
    scale = float(jnp.max(jnp.abs(reference)))
    bound = max(step**2, 1e-4 if dtype == jnp.float32 else 1e-9) * scale
    converged = bool(deer_solution.result == diffrax.RESULTS.successful)
    agrees = converged and deer_error <= bound
    print(
        f"\nDeerSolver is {speedup:.1f}x "
        f"{'faster' if speedup >= 1 else 'slower'} than Tsit5 on the same grid."
    )
    if agrees:
        print(
            f"AGREES: DeerSolver matches the Tsit5 reference to {deer_error:.1e} "
            f"(expected at most {bound:.1e} for a 2nd-order method at h = {step:g})."
        )
    else:
        print(
            f"DISAGREES: converged={converged}, max error {deer_error:.1e} > "
            f"expected bound {bound:.1e}."
        )
    return agrees
