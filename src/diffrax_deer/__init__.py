"""diffrax-deer: parallel-in-time ODE solving for diffrax with DEER.

The package is layered (each folder's docstring says what it may import):

- `_core/`: the DEER core, pure JAX (scans, Newton, predictor, window solve, and
  `deer_scan`, the parallel `jax.lax.scan`);
- `_methods/`: one-step discretisations (theta methods, collocation);
- `_adapter/`: the diffrax adapter (`DeerSolver`, `DeerAdjoint`, interpolation);
- `_cli/` and `_bench/`: the command line and the shared benchmark problems,
  never imported from here.

Public names are imported on first use (PEP 562), so that `python -m diffrax_deer
--help` answers without importing JAX; `from diffrax_deer import DeerSolver` works
as usual.
"""

import importlib
import importlib.metadata
import typing


if typing.TYPE_CHECKING:  # what static tools (type checkers, docs) see
    from ._adapter.adjoint import DeerAdjoint as DeerAdjoint
    from ._adapter.deer_solver import DeerSolver as DeerSolver, DeerState as DeerState
    from ._adapter.interpolation import DeerInterpolation as DeerInterpolation
    from ._adapter.runge_kutta import ExplicitRungeKutta as ExplicitRungeKutta
    from ._core.damped_scan import solve_damped_recurrence as solve_damped_recurrence
    from ._core.deer_scan import DeerScanStats as DeerScanStats, deer_scan as deer_scan
    from ._core.discretisation import (
        AbstractDiscretisation as AbstractDiscretisation,
        AbstractLinearisation as AbstractLinearisation,
    )
    from ._core.error_estimate import (
        ErrorEstimate as ErrorEstimate,
        estimate_error as estimate_error,
    )
    from ._core.linear_solve import BatchedLinearSolve as BatchedLinearSolve
    from ._core.newton.solve import (
        NewtonStats as NewtonStats,
        newton_solve as newton_solve,
    )
    from ._core.scan import solve_affine_recurrence as solve_affine_recurrence
    from ._core.window import solve_window as solve_window
    from ._methods.collocation import (
        AbstractCollocation as AbstractCollocation,
        GaussLegendre as GaussLegendre,
        RadauIIA as RadauIIA,
        collocation_tableau as collocation_tableau,
    )
    from ._methods.theta_method import (
        AbstractThetaMethod as AbstractThetaMethod,
        BackwardEuler as BackwardEuler,
        Trapezoid as Trapezoid,
    )


# Public name -> the module that defines it.
_EXPORTS = {
    "DeerAdjoint": "._adapter.adjoint",
    "DeerSolver": "._adapter.deer_solver",
    "DeerState": "._adapter.deer_solver",
    "DeerInterpolation": "._adapter.interpolation",
    "ExplicitRungeKutta": "._adapter.runge_kutta",
    "solve_damped_recurrence": "._core.damped_scan",
    "DeerScanStats": "._core.deer_scan",
    "deer_scan": "._core.deer_scan",
    "ErrorEstimate": "._core.error_estimate",
    "estimate_error": "._core.error_estimate",
    "AbstractDiscretisation": "._core.discretisation",
    "AbstractLinearisation": "._core.discretisation",
    "BatchedLinearSolve": "._core.linear_solve",
    "NewtonStats": "._core.newton.solve",
    "newton_solve": "._core.newton.solve",
    "solve_affine_recurrence": "._core.scan",
    "solve_window": "._core.window",
    "AbstractCollocation": "._methods.collocation",
    "GaussLegendre": "._methods.collocation",
    "RadauIIA": "._methods.collocation",
    "collocation_tableau": "._methods.collocation",
    "AbstractThetaMethod": "._methods.theta_method",
    "BackwardEuler": "._methods.theta_method",
    "Trapezoid": "._methods.theta_method",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> typing.Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


try:
    __version__ = importlib.metadata.version("diffrax-deer")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
