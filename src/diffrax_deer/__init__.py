"""diffrax-deer: parallel-in-time ODE solving for diffrax with DEER."""

import importlib.metadata

from ._adjoint import DeerAdjoint as DeerAdjoint
from ._collocation import (
    AbstractCollocation as AbstractCollocation,
    GaussLegendre as GaussLegendre,
    RadauIIA as RadauIIA,
    collocation_tableau as collocation_tableau,
)
from ._damped_scan import solve_damped_recurrence as solve_damped_recurrence
from ._discretisation import (
    AbstractDiscretisation as AbstractDiscretisation,
    AbstractLinearisation as AbstractLinearisation,
    BatchedLinearSolve as BatchedLinearSolve,
)
from ._interpolation import DeerInterpolation as DeerInterpolation
from ._newton import NewtonStats as NewtonStats, newton_solve as newton_solve
from ._runge_kutta import ExplicitRungeKutta as ExplicitRungeKutta
from ._scan import solve_affine_recurrence as solve_affine_recurrence
from ._solver import DeerSolver as DeerSolver, DeerState as DeerState
from ._theta_method import (
    AbstractThetaMethod as AbstractThetaMethod,
    BackwardEuler as BackwardEuler,
    Trapezoid as Trapezoid,
)
from ._window import solve_window as solve_window


try:
    __version__ = importlib.metadata.version("diffrax-deer")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
