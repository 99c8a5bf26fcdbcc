"""Which diffrax terms DeerSolver solves: those whose control is time."""

import jax
import jax.tree_util as jtu
import numpy as np
from diffrax import AbstractBrownianPath, AbstractTerm, MultiTerm, ODETerm
from diffrax._term import AdjointTerm, WrapTerm
from jaxtyping import PyTree


_BACKSOLVE_MESSAGE = (
    "DeerSolver does not support `diffrax.BacksolveAdjoint`: its continuous adjoint "
    "gives only approximate gradients of a DEER solve. Use the default "
    "`diffrax.RecursiveCheckpointAdjoint()` (or `diffrax.DirectAdjoint()`), whose "
    "gradients DeerSolver computes exactly by the implicit function theorem."
)

# Intervals on which a control is checked to be time: a shift and a stretch of the
# reference interval [0, 1].
_REFERENCE_INTERVAL = (0.0, 1.0)
_CHECK_INTERVALS = ((0.5, 1.5), (-1.0, 2.0))


def _is_single_term(x) -> bool:
    return isinstance(x, AbstractTerm) and not isinstance(x, MultiTerm)


def _control_is_time(term: AbstractTerm) -> bool:
    r"""Whether `term.contr(t0, t1)` is $(t_1 - t_0)\,c$ with a constant PyTree $c$.

    Then $\mathrm{d}y = f(t, y) \cdot \mathrm{d}c(t)$ is the ODE $y' = f(t, y) \cdot
    c$, which DeerSolver solves as `vf_prod(t, y, args, contr(0, 1))`. Checked on
    concrete times at trace time; a control that cannot be evaluated there (it
    depends on traced values, or is undefined at these times) is not accepted.
    """

    def leaves(t0, t1):
        return [np.asarray(x) for x in jtu.tree_leaves(term.contr(t0, t1))]

    try:
        with jax.ensure_compile_time_eval():
            unit = leaves(*_REFERENCE_INTERVAL)
            checks = [(t1 - t0, leaves(t0, t1)) for t0, t1 in _CHECK_INTERVALS]
    except Exception:  # any failure: not verifiably time
        return False
    if not unit:
        return False
    for length, control in checks:
        if [x.shape for x in control] != [u.shape for u in unit]:
            return False
        for x, u in zip(control, unit, strict=True):
            if not np.allclose(x, length * u, rtol=1e-5, atol=0):
                return False
    return True


def check_terms(terms: PyTree[AbstractTerm]) -> None:
    """Raises, at trace time, for terms DeerSolver cannot solve.

    Accepted: `diffrax.ODETerm`, and any term (a custom `diffrax.AbstractTerm`, a
    `diffrax.ControlTerm`), alone or in a `diffrax.MultiTerm`, whose control is
    time: `contr(t0, t1)` is `t1 - t0` in every leaf, up to a constant factor.
    Refused: SDEs (a Brownian control), other controls, `BacksolveAdjoint`'s terms.

    **Arguments:**

    - `terms`: the terms as `diffeqsolve` passes them to the solver.
    """
    for term in jtu.tree_leaves(terms, is_leaf=_is_single_term):
        inner = term.term if isinstance(term, WrapTerm) else term
        if isinstance(inner, AdjointTerm):
            raise NotImplementedError(_BACKSOLVE_MESSAGE)
        if isinstance(inner, ODETerm):
            continue
        name = type(inner).__name__
        if isinstance(getattr(inner, "control", None), AbstractBrownianPath):
            raise ValueError(
                f"DeerSolver solves ODEs, not SDEs: got a `{name}` driven by "
                "Brownian motion. Solve SDEs with diffrax's SDE solvers (e.g. "
                "`diffrax.Heun()`, `diffrax.ShARK()`)."
            )
        if not _control_is_time(inner):
            raise ValueError(
                "DeerSolver solves ODEs: the control of every term must be time, "
                "`term.contr(t0, t1) == t1 - t0` in every leaf (up to a constant "
                f"factor), as for `diffrax.ODETerm`. Got a `{name}` whose control "
                "is not (or cannot be evaluated at fixed times). For a "
                "`diffrax.ControlTerm` with a differentiable control path, pass "
                "`term.to_ode()` (dy/dt = f(t, y) dx/dt); for an ODE, "
                "`diffrax.ODETerm(f)`."
            )
