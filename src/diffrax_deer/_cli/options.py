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


def expected_error_bound(
    order: int, step: float, horizon: float, rate: float, scale: float, floor: float
) -> float:
    r"""The largest error a correct method of `order` should make on a grid.

    On a problem whose solution changes at rate $\lambda$ (the largest modulus of
    an eigenvalue of the Jacobian along it, or its angular frequency), a method of
    order $p$ makes a local error of about $(\lambda h)^{p+1}$ times the solution's
    scale per step of size $h$, with a constant below one for the methods here.
    Adding up $T / h$ of them without cancellation over the horizon $T$ gives the
    bound $(\lambda h)^p \, \lambda T \cdot \text{scale}$, never below
    `floor * scale` (round-off, Newton's tolerance and the reference's own error).
    It catches a wrong answer or a lost order of accuracy, not a slightly larger
    error constant.
    """
    return max((rate * step) ** order * rate * horizon, floor) * scale
