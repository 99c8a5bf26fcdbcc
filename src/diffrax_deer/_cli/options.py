"""Names the command line accepts: methods and validation problems.

This module imports nothing heavy at import time, so that `python -m diffrax_deer
--help` and argument errors stay fast: JAX is imported only once the arguments
parsed.
"""

# name -> (description, order). The order is the method's order of convergence,
# used to derive the expected error of a grid (see `expected_error_bound`).
METHODS: dict[str, tuple[str, int]] = {
    "trapezoid": ("Trapezoid(): implicit trapezoidal rule (default)", 2),
    "backward-euler": ("BackwardEuler(): L-stable", 1),
    "gauss-legendre-2": ("GaussLegendre(stages=2): collocation", 4),
    "gauss-legendre-3": ("GaussLegendre(stages=3): collocation", 6),
    "radau-iia-3": ("RadauIIA(stages=3): L-stable collocation, stiff", 5),
    "euler": ("diffrax.Euler() as DEER's one-step map", 1),
    "heun": ("diffrax.Heun() as DEER's one-step map", 2),
    "midpoint": ("diffrax.Midpoint() as DEER's one-step map", 2),
    "ralston": ("diffrax.Ralston() as DEER's one-step map", 2),
    "bosh3": ("diffrax.Bosh3() as DEER's one-step map", 3),
    "tsit5": ("diffrax.Tsit5() as DEER's one-step map", 5),
    "dopri5": ("diffrax.Dopri5() as DEER's one-step map", 5),
    "dopri8": ("diffrax.Dopri8() as DEER's one-step map", 8),
}


# name -> description; the problems themselves are in `validate.py`.
PROBLEMS: dict[str, str] = {
    "linear": "y' = A y, A 10x10 (skew-symmetric - 0.3 I), t in [0, 5]; vs expm",
    "lotka-volterra": "Lotka-Volterra (1.5, 1, 3, 1), t in [0, 10]; vs Tsit5",
    "van-der-pol": "Van der Pol, mu = 1, t in [0, 20]; vs Tsit5",
    "mlp": "MLP field 2-64-64-2 (softplus), t in [0, 10]; vs Tsit5",
}
# The (problem, method) pairs `validate --quick` runs: each kind of method (theta
# method, collocation, explicit Runge-Kutta map) against a closed form and against
# Tsit5. Compiling each solve takes seconds on a CPU, so there are only four.
QUICK_CASES = (
    ("linear", "trapezoid"),
    ("linear", "gauss-legendre-2"),
    ("lotka-volterra", "trapezoid"),
    ("lotka-volterra", "tsit5"),
)


def make_method(name: str):
    """The `method=` argument of `DeerSolver` for a command-line method name."""
    import diffrax

    from .._methods.collocation import GaussLegendre, RadauIIA
    from .._methods.theta_method import BackwardEuler, Trapezoid

    factories = {
        "trapezoid": Trapezoid,
        "backward-euler": BackwardEuler,
        "gauss-legendre-2": lambda: GaussLegendre(stages=2),
        "gauss-legendre-3": lambda: GaussLegendre(stages=3),
        "radau-iia-3": lambda: RadauIIA(stages=3),
        "euler": diffrax.Euler,
        "heun": diffrax.Heun,
        "midpoint": diffrax.Midpoint,
        "ralston": diffrax.Ralston,
        "bosh3": diffrax.Bosh3,
        "tsit5": diffrax.Tsit5,
        "dopri5": diffrax.Dopri5,
        "dopri8": diffrax.Dopri8,
    }
    return factories[name]()


# The error model behind `validate` and the demo's verdict. For each validation
# problem and method: DeerSolver's grid N0 in `validate` and the max error E0
# measured there (float64, at up to 101 grid nodes, against the problem's
# reference), by `python benchmarks/validation_errors.py`, which also reports the
# observed order between N0 / 2 and N0. N0 is the coarsest grid of 10 * 2^k whose
# error is at most 1e-6 max|y|; where none up to 2560 is, the coarsest from 2560 on
# at most 1e-3 max|y| (first-order methods), at most 163840. Rerun the script when
# a change legitimately moves an error (`validate` fails until then).
# One row per method: N0 and E0 for each problem, in the order of PROBLEMS:
#                 linear           lotka-volterra   van-der-pol      mlp
_MEASURED = """
trapezoid          2560 1.35e-06    2560 1.96e-04    2560 6.80e-04    1280 4.93e-06
backward-euler    10240 5.71e-04  163840 1.54e-02  163840 7.43e-03    2560 8.87e-03
gauss-legendre-2     80 4.72e-07     320 1.63e-06     640 1.13e-06      10 3.68e-06
gauss-legendre-3     20 3.26e-07      80 3.80e-06     160 7.56e-07      10 3.82e-09
radau-iia-3          40 2.27e-07     320 2.83e-07     320 4.03e-07      10 1.22e-07
euler             10240 5.73e-04  163840 1.54e-02  163840 7.44e-03    2560 8.86e-03
heun               2560 2.70e-06    2560 1.92e-04    2560 1.31e-03     640 1.87e-05
midpoint           2560 2.70e-06    2560 2.92e-04    2560 1.33e-03    1280 7.27e-06
ralston            2560 2.70e-06    2560 2.59e-04    2560 1.32e-03    1280 6.41e-06
bosh3               640 1.85e-07    1280 6.48e-06    2560 5.06e-06      80 6.50e-06
tsit5                40 1.42e-07     160 2.97e-06     320 8.93e-07      10 3.38e-08
dopri5               40 5.17e-07     160 3.89e-06     320 1.74e-06      10 1.40e-07
dopri8               10 1.30e-07      40 3.20e-06      80 1.22e-07      10 1.04e-11
"""


def _measured_errors(table: str) -> dict[str, dict[str, tuple[int, float]]]:
    errors: dict[str, dict[str, tuple[int, float]]] = {name: {} for name in PROBLEMS}
    for line in table.strip().splitlines():
        method, *cells = line.split()
        for name, steps, error in zip(PROBLEMS, cells[::2], cells[1::2], strict=True):
            errors[name][method] = (int(steps), float(error))
    return errors


MEASURED_ERRORS = _measured_errors(_MEASURED)

# A correct method's error on another grid N is E0 (N0 / N)^order; the bound allows
# a factor SAFETY above that, and never asks for less than FLOORS[dtype] max|y|:
# in float64 Newton's default tolerance (1e-10), above round-off and the tight
# reference's own error; in float32 the round-off floor the demo's MLP field shows
# (1e-7 to 2.3e-7 max|y| at N = 1e3 to 1e5), doubled. Where the expected error
# exceeds COARSE max|y| the grid is too coarse for the asymptotic model and no
# bound is claimed.
SAFETY = 3.0
COARSE = 1e-2
FLOORS = {"float64": 1e-10, "float32": 5e-7}


def expected_error(problem: str, method: str, num_steps: int) -> float:
    """What a correct `method` should make on `problem` with `num_steps` intervals:
    the measured error at N0 scaled by $(N_0 / N)^p$ (see `MEASURED_ERRORS`)."""
    base_steps, base_error = MEASURED_ERRORS[problem][method]
    return base_error * (base_steps / num_steps) ** METHODS[method][1]


def error_bound(expected: float, scale: float, dtype_name: str) -> float | None:
    """`SAFETY` times the expected error, at least `SAFETY` times the dtype's floor
    (both relative to `scale` = max|y|); `None` where the expected error exceeds
    `COARSE * scale`: too coarse a grid to check."""
    if expected > COARSE * scale:
        return None
    return SAFETY * max(expected, FLOORS[dtype_name] * scale)
