"""Collocation methods (Gauss-Legendre, Radau IIA), stages eliminated per interval."""

import abc
import functools
import math
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact

from .._core.discretisation import (
    AbstractDiscretisation,
    AbstractLinearisation,
    evaluate_nodes,
    evaluate_nodes_and_jacobian_diagonals,
    evaluate_nodes_and_jacobians,
    evaluate_nodes_derivatives_and_stiffness,
    identity_like,
)
from .._core.hermite import grid_interval, quintic_hermite_in_interval
from .._core.linear_solve import BatchedLinearSolve
from .._core.validation import as_python_scalar, is_integer


@functools.cache
def collocation_tableau(family: str, stages: int):
    r"""The exact Butcher tableau $(c, A, b)$ of a collocation method, from sympy.

    The nodes $c$ are the roots of the shifted Legendre polynomial $P_s(2x - 1)$
    (Gauss-Legendre) or of $P_s(2x - 1) - P_{s-1}(2x - 1)$ (Radau IIA, $c_s = 1$).
    With $\ell_j$ the Lagrange basis on $c$, $a_{ij} = \int_0^{c_i} \ell_j$ and
    $b_j = \int_0^1 \ell_j$.

    **Arguments:**

    - `family`: `"gauss-legendre"` or `"radau-iia"`.
    - `stages`: the number of stages $s$.

    **Returns:**

    `(c, A, b)` as tuples of sympy expressions (exact). The solver itself uses
    the same tableau computed in 50-digit floating point (`_float_tableau`), as
    sympy takes seconds per tableau.
    """
    import sympy

    x = sympy.Symbol("x")
    if family == "gauss-legendre":
        polynomial = sympy.legendre(stages, 2 * x - 1)
    elif family == "radau-iia":
        polynomial = sympy.legendre(stages, 2 * x - 1) - sympy.legendre(
            stages - 1, 2 * x - 1
        )
    else:
        raise ValueError(f"Unknown collocation family {family!r}.")
    roots = sympy.Poly(sympy.expand(polynomial), x).all_roots()
    c = tuple(sorted((sympy.nsimplify(sympy.radsimp(r)) for r in roots), key=float))

    bases = [_lagrange_basis(c, j, x) for j in range(stages)]
    a = tuple(
        tuple(
            sympy.simplify(sympy.integrate(bases[j], (x, 0, c_i)))
            for j in range(stages)
        )
        for c_i in c
    )
    b = tuple(
        sympy.simplify(sympy.integrate(bases[j], (x, 0, 1))) for j in range(stages)
    )
    return c, a, b


# Dense output switches from quintic Hermite to the collocation polynomial where the
# Hermite would amplify a node error more than this (see `dense_info`).
_MAX_HERMITE_AMPLIFICATION = 2.0
# The local order of quintic Hermite's own error between the nodes.
_QUINTIC_HERMITE_ORDER = 6


# Digits of the working precision of the float tableaux: far beyond float64, so
# that each coefficient rounds correctly.
_DIGITS = 50


def _shifted_legendre(degree: int) -> list[int]:
    r"""The integer coefficients of $P_n(2x - 1)$, $x^0$ first:
    $(-1)^{n+k} \binom{n}{k} \binom{n+k}{k}$."""
    return [
        (-1) ** (degree + k) * math.comb(degree, k) * math.comb(degree + k, k)
        for k in range(degree + 1)
    ]


def _collocation_polynomial(family: str, stages: int) -> list[int]:
    if family == "gauss-legendre":
        return _shifted_legendre(stages)
    if family == "radau-iia":
        lower = _shifted_legendre(stages - 1) + [0]
        return [p - q for p, q in zip(_shifted_legendre(stages), lower, strict=True)]
    raise ValueError(f"Unknown collocation family {family!r}.")


def _integrated_bases(nodes, mpmath) -> list[list]:
    r"""The coefficients ($x^0$ first, in mpmath) of $\int_0^x \ell_j$ for every
    Lagrange basis polynomial $\ell_j$ on `nodes`."""
    rows = []
    for j, node_j in enumerate(nodes):
        basis = [mpmath.mpf(1)]
        for m, node_m in enumerate(nodes):
            if m != j:
                # basis *= (x - node_m) / (node_j - node_m)
                scale = node_j - node_m
                shifted = [mpmath.mpf(0)] + basis
                for k, value in enumerate(basis):
                    shifted[k] -= node_m * value
                basis = [value / scale for value in shifted]
        rows.append([mpmath.mpf(0)] + [v / (k + 1) for k, v in enumerate(basis)])
    return rows


class _FloatTableau(NamedTuple):
    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    # Row k: the coefficients of beta_k(theta) = int_0^theta l_k, theta^0 first.
    integrated_basis: np.ndarray


@functools.cache
def _float_tableau(family: str, stages: int) -> _FloatTableau:
    r"""The tableau $(c, A, b)$ of `collocation_tableau` in float64, computed in
    50-digit arithmetic (mpmath): the nodes as roots of the same polynomial,
    $a_{ij} = \int_0^{c_i} \ell_j$, $b_j = \int_0^1 \ell_j$; and the integrated
    basis's coefficients, shape `(s, s + 1)`. Milliseconds, where sympy's exact
    forms take seconds (a cost every first solve would pay)."""
    import mpmath

    with mpmath.workdps(_DIGITS):
        coefficients = _collocation_polynomial(family, stages)
        roots = mpmath.polyroots(coefficients[::-1], maxsteps=200, extraprec=100)
        nodes = sorted(mpmath.re(root) for root in roots)
        integrated = _integrated_bases(nodes, mpmath)

        def integral(row, x):
            return mpmath.polyval(row[::-1], x)

        a = [[integral(row, c_i) for row in integrated] for c_i in nodes]
        b = [integral(row, 1) for row in integrated]
        as_floats = np.vectorize(float, otypes=[np.float64])
        return _FloatTableau(
            *(as_floats(np.array(v, dtype=object)) for v in (nodes, a, b, integrated))
        )


def _integrated_lagrange_basis(family, stages, theta):
    # (beta_1(theta), ..., beta_s(theta)), by Horner's rule.
    coefficients = jnp.asarray(
        _float_tableau(family, stages).integrated_basis, theta.dtype
    )
    values = jnp.zeros((stages,), coefficients.dtype)
    for power in range(stages, -1, -1):
        values = values * theta + coefficients[:, power]
    return values


def _lagrange_basis(nodes, j, x):
    r"""The Lagrange basis polynomial $\ell_j$ on `nodes`, in the sympy symbol `x`."""
    import sympy

    basis = sympy.Integer(1)
    for m, node in enumerate(nodes):
        if m != j:
            basis *= (x - node) / (nodes[j] - node)
    return sympy.expand(basis)


class _AbstractCollocationLinearisation(AbstractLinearisation):
    r"""What both collocation linearisations share: the stage systems are solved per
    interval (`_stage_particular`), their solution enters the node offsets through
    the weights $h_i b_j$, and the stage update adds the stages' sensitivity to
    $\delta y_i$ (`_stage_sensitivity_times`)."""

    weighted_steps: eqx.AbstractVar[Inexact[Array, "steps stages"]]

    @abc.abstractmethod
    def _stage_particular(self, rhs_stages):
        """$S_i^{-1} v^K_i$ for every interval, shape `(N, s, n)`."""

    @abc.abstractmethod
    def _stage_sensitivity_times(self, delta_ys):
        r"""$S_i^{-1} \bar J_i \delta y_i$ for every interval, shape `(N, s, n)`."""

    def offsets(self, rhs):
        rhs_nodes, rhs_stages = rhs
        stage_particular = self._stage_particular(rhs_stages)
        return rhs_nodes + jnp.einsum(
            "is,isn->in", self.weighted_steps, stage_particular
        )

    def stage_offsets(self, rhs):
        _, rhs_stages = rhs
        return self._stage_particular(rhs_stages)

    def stage_update(self, rhs, delta_ys):
        _, rhs_stages = rhs
        return self._stage_particular(rhs_stages) + self._stage_sensitivity_times(
            delta_ys
        )


class CollocationLinearisation(_AbstractCollocationLinearisation):
    r"""The Newton system of an $s$-stage collocation method, stages eliminated.

    Per interval, with stage slopes $K_{ij}$ at $Y_{ij} = y_i + h \sum_l a_{jl} K_{il}$
    and $J_{ij} = \partial f / \partial y (Y_{ij})$:
    $S_i \,\delta K_i = v^K_i + \bar J_i \delta y_i$ with $S_i = I - h (a_{jl}
    J_{ij})_{jl}$ ($sn \times sn$, factorised once) and $\bar J_i$ the stacked
    $J_{ij}$; then $\delta y_{i+1} = A_i \delta y_i + v^y_i + h \sum_j b_j
    (S_i^{-1} v^K_i)_j$ with $A_i = I + h \sum_j b_j (S_i^{-1} \bar J_i)_j$.
    """

    transitions: Inexact[Array, "steps n n"]
    stage_solve: BatchedLinearSolve
    stage_sensitivities: Inexact[Array, "steps stages n n"]
    weighted_steps: Inexact[Array, "steps stages"]

    def _stage_particular(self, rhs_stages):
        num_steps, num_stages, size = rhs_stages.shape
        return self.stage_solve.solve(
            rhs_stages.reshape(num_steps, num_stages * size)
        ).reshape(num_steps, num_stages, size)

    def _stage_sensitivity_times(self, delta_ys):
        return jnp.einsum("isnm,im->isn", self.stage_sensitivities, delta_ys[:-1])


class DiagonalCollocationLinearisation(_AbstractCollocationLinearisation):
    r"""The quasi-DEER Newton system of an $s$-stage collocation method.

    With $J_{ij}$ replaced by its diagonal, every state component $k$ decouples:
    the stage system of interval $i$ is $s \times s$, $S_{ik} = I - h_i (a_{jl}
    J_{ij,kk})_{jl}$, and the transition is the scalar $1 + h_i \sum_j b_j
    (S_{ik}^{-1} \bar J_{ik})_j$. Memory $O(N n s^2)$, never $O(N n^2)$.
    """

    transitions: Inexact[Array, "steps n"]
    stage_solve: BatchedLinearSolve
    stage_sensitivities: Inexact[Array, "steps stages n"]
    weighted_steps: Inexact[Array, "steps stages"]

    def _stage_particular(self, rhs_stages):
        num_steps, num_stages, size = rhs_stages.shape
        # (N, s, n) -> (N * n, s): one small system per interval and component.
        per_component = jnp.swapaxes(rhs_stages, 1, 2).reshape(-1, num_stages)
        solved = self.stage_solve.solve(per_component)
        return jnp.swapaxes(solved.reshape(num_steps, size, num_stages), 1, 2)

    def _stage_sensitivity_times(self, delta_ys):
        return self.stage_sensitivities * delta_ys[:-1, None, :]


class AbstractCollocation(AbstractDiscretisation):
    """An $s$-stage collocation method; the stage slopes are Newton unknowns too."""

    stages: int = eqx.field(static=True, converter=as_python_scalar)
    family: ClassVar[str]

    def _tableau(self):
        c, a, b, _ = _float_tableau(self.family, self.stages)
        return c, a, b

    def dense_info(self, vector_field, ts, ys, stages, args):
        r"""Quintic Hermite data at the nodes, the stage slopes, and which intervals
        are too stiff for Hermite.

        The nodes of these methods are accurate to order $2s$ or $2s - 1$ (up to 6),
        which cubic Hermite (order 4) would waste between them: the quintic matches
        $y$, $y' = f$ and $y'' = f_t + J f$ at both ends. But a node error $e$
        enters those as $h J e$ and $h^2 J^2 e$: with the Hermite basis's maxima
        the interpolant amplifies it by up to $1 + 0.37 x + 0.035 x^2$, where $x =
        h \lVert J \rVert$, $10^{14}$ on Robertson's late intervals. Where that
        exceeds 2 ($x > 2.1$), the interval uses its collocation polynomial
        instead, $u(t_i + \theta h_i) = y_i + h_i \sum_k \beta_k(\theta) K_{ik}$
        with $\beta_k = \int_0^\theta \ell_k$: order $s + 1$ between the nodes
        whatever the stiffness, as the stage slopes $K = f(Y)$ are the method's
        own L- or A-stable solution. Both pass through $y_i$ and $y_{i+1}$, so
        the dense output stays continuous."""
        first, second, stiffness = evaluate_nodes_derivatives_and_stiffness(
            vector_field, ts, ys, args
        )
        scaled = jnp.abs(ts[1:] - ts[:-1]).astype(stiffness.dtype) * jnp.maximum(
            stiffness[:-1], stiffness[1:]
        )
        amplification = 1 + 0.37 * scaled + 0.035 * scaled**2
        return dict(
            first=first,
            second=second,
            stages=stages,
            stiff=amplification > _MAX_HERMITE_AMPLIFICATION,
        )

    def dense_order(self) -> int:
        # The collocation polynomial's, used on stiff intervals (quintic Hermite,
        # of order 6, elsewhere).
        return self.stages + 1

    def interval_dense_orders(self, dense_info):
        return jnp.where(
            dense_info["stiff"], self.dense_order(), _QUINTIC_HERMITE_ORDER
        )

    def match_dense_info(self, coarse_info, fine_info, coarse_of_fine):
        # A coarse interval twice as long is about twice as stiff: it would switch
        # to its collocation polynomial where the fine grid still uses Hermite,
        # and the two grids' difference would then measure the coarse polynomial
        # (of order s + 1), not the fine Hermite. Take the fine grid's choice,
        # collocation if either fine half uses it: Hermite at most doubles x, so
        # its amplification stays under 1 + 0.74 x + 0.14 x^2 = 3.2.
        num_coarse = coarse_info["stiff"].shape[0]
        stiff = jnp.zeros(num_coarse, bool).at[coarse_of_fine].max(fine_info["stiff"])
        return dict(coarse_info, stiff=stiff)

    def interpolate(self, ts, ys, dense_info, t, uniform=False):
        index, fraction, step = grid_interval(ts, t, uniform)
        hermite = quintic_hermite_in_interval(
            ys, dense_info["first"], dense_info["second"], index, fraction, step
        )
        weights = _integrated_lagrange_basis(self.family, self.stages, fraction)
        collocation = ys[index] + step.astype(ys.dtype) * jnp.einsum(
            "k,kn->n", weights.astype(ys.dtype), dense_info["stages"][index]
        )
        return jnp.where(dense_info["stiff"][index], collocation, hermite)

    def _stage_points(self, ts, ys, stages):
        c, a, _ = self._tableau()
        steps = ts[1:] - ts[:-1]
        dtype = ys.dtype
        stage_ts = ts[:-1, None] + steps[:, None] * jnp.asarray(c, ts.dtype)[None]
        stage_ys = ys[:-1, None, :] + steps[:, None, None] * jnp.einsum(
            "jl,iln->ijn", jnp.asarray(a, dtype), stages
        )
        return stage_ts, stage_ys

    def _evaluate(self, evaluate, vector_field, stage_ts, stage_ys, args):
        num_steps, num_stages, size = stage_ys.shape
        out = evaluate(
            vector_field,
            stage_ts.reshape(-1),
            stage_ys.reshape(-1, size),
            args,
        )
        if isinstance(out, tuple):
            values, jacobians = out
            return (
                values.reshape(num_steps, num_stages, size),
                jacobians.reshape(num_steps, num_stages, size, size),
            )
        return out.reshape(num_steps, num_stages, size)

    def _node_residual(self, ts, ys, stages):
        _, _, b = self._tableau()
        steps = (ts[1:] - ts[:-1])[:, None]
        increments = jnp.einsum("j,ijn->in", jnp.asarray(b, ys.dtype), stages)
        return ys[1:] - ys[:-1] - steps * increments

    def init_stages(self, vector_field, ts, ys, args):
        # Every stage slope starts at the interval's secant slope, which makes the
        # node residual zero (sum_j b_j = 1) and is consistent with the guessed nodes
        # however stiff f is; f along the secant is not (it diverged on stiff Van der
        # Pol from a constant guess).
        del vector_field, args
        steps = (ts[1:] - ts[:-1]).astype(ys.dtype)
        steps = jnp.where(steps == 0, 1, steps)
        slopes = (ys[1:] - ys[:-1]) / steps[:, None]
        return jnp.broadcast_to(
            slopes[:, None, :], (slopes.shape[0], self.stages, slopes.shape[1])
        )

    def transfer_stages(self, vector_field, ts, stages, new_ts, new_ys, args):
        r"""The slope of the collocation polynomial of the solve on `ts` at every
        stage point of `new_ts`: on interval $i$ of `ts` it is the degree $s - 1$
        polynomial through the stage slopes $K_{ik}$ at $c_k$,
        $u'(t_i + \theta h_i) = \sum_k \ell_k(\theta) K_{ik}$. Converged
        stages satisfy $K = f(Y)$, so these slopes are $O(h^s)$ from the new
        grid's however stiff $f$ is (unlike $f$ along an interpolant, which
        multiplies the interpolation error by the stiffness)."""
        if stages is None:
            return super().transfer_stages(
                vector_field, ts, stages, new_ts, new_ys, args
            )
        c, _, _ = self._tableau()
        new_steps = new_ts[1:] - new_ts[:-1]
        stage_fractions = jnp.asarray(c, new_ts.dtype)[None, :]
        stage_ts = new_ts[:-1, None] + new_steps[:, None] * stage_fractions
        interval = jnp.clip(
            jnp.searchsorted(ts, stage_ts, side="right") - 1, 0, ts.shape[0] - 2
        )
        steps = ts[interval + 1] - ts[interval]
        theta = (stage_ts - ts[interval]) / jnp.where(steps == 0, 1, steps)
        # The Lagrange basis on the collocation nodes c at every theta: (N', s, s).
        nodes = jnp.asarray(c, theta.dtype)
        # Explicit ranks throughout (diffrax's settings raise on rank promotion).
        differences = theta[..., None] - nodes[None, None, :]
        others = ~jnp.eye(self.stages, dtype=bool)
        numerator = jnp.prod(
            jnp.where(
                others[None, None], differences[..., None, :], jnp.ones((), theta.dtype)
            ),
            axis=-1,
        )
        denominator = jnp.prod(
            jnp.where(
                others, nodes[:, None] - nodes[None, :], jnp.ones((), theta.dtype)
            ),
            axis=-1,
        )
        basis = (numerator / denominator[None, None, :]).astype(stages.dtype)
        return jnp.einsum("jlk,jlkn->jln", basis, stages[interval])

    def residual(self, vector_field, ts, ys, stages, args):
        stage_ts, stage_ys = self._stage_points(ts, ys, stages)
        fs = self._evaluate(evaluate_nodes, vector_field, stage_ts, stage_ys, args)
        return self._node_residual(ts, ys, stages), stages - fs

    def linearise(self, vector_field, ts, ys, stages, args, jacobian="full"):
        if jacobian == "diagonal":
            return self._linearise_diagonal(vector_field, ts, ys, stages, args)
        _, a, b = self._tableau()
        num_steps, num_stages, size = stages.shape
        stage_ts, stage_ys = self._stage_points(ts, ys, stages)
        fs, jacobians = self._evaluate(
            evaluate_nodes_and_jacobians, vector_field, stage_ts, stage_ys, args
        )
        steps = (ts[1:] - ts[:-1]).astype(ys.dtype)
        identity = identity_like(jacobians)
        a = jnp.asarray(a, ys.dtype)
        # S[i, j, :, l, :] = delta_jl I - h_i a_jl J_ij
        stage_matrices = jnp.einsum(
            "jl,nm->jnlm", jnp.eye(num_stages, dtype=ys.dtype), identity
        )[None] - jnp.einsum("i,jl,ijnm->ijnlm", steps, a, jacobians)
        stage_matrices = stage_matrices.reshape(
            num_steps, num_stages * size, num_stages * size
        )
        stage_solve = BatchedLinearSolve(stage_matrices)
        stage_sensitivities = stage_solve.solve_matrices(
            jacobians.reshape(num_steps, num_stages * size, size)
        ).reshape(num_steps, num_stages, size, size)
        weighted_steps = steps[:, None] * jnp.asarray(b, ys.dtype)[None]
        transitions = identity[None] + jnp.einsum(
            "is,isnm->inm", weighted_steps, stage_sensitivities
        )
        linearisation = CollocationLinearisation(
            transitions=transitions,
            stage_solve=stage_solve,
            stage_sensitivities=stage_sensitivities,
            weighted_steps=weighted_steps,
        )
        residual = (self._node_residual(ts, ys, stages), stages - fs)
        return residual, linearisation

    def _linearise_diagonal(self, vector_field, ts, ys, stages, args):
        _, a, b = self._tableau()
        num_steps, num_stages, size = stages.shape
        stage_ts, stage_ys = self._stage_points(ts, ys, stages)
        flat_fs, flat_diagonals = evaluate_nodes_and_jacobian_diagonals(
            vector_field,
            stage_ts.reshape(-1),
            stage_ys.reshape(-1, size),
            args,
        )
        fs = flat_fs.reshape(num_steps, num_stages, size)
        # (N, s, n) -> (N, n, s): per interval and component, J_ij,kk over stages j.
        diagonals = jnp.swapaxes(
            flat_diagonals.reshape(num_steps, num_stages, size), 1, 2
        )
        steps = (ts[1:] - ts[:-1]).astype(ys.dtype)
        a = jnp.asarray(a, ys.dtype)
        # S[i, k, j, l] = delta_jl - h_i a_jl J_ij,kk
        stage_matrices = jnp.eye(num_stages, dtype=ys.dtype)[None, None] - jnp.einsum(
            "i,jl,ikj->ikjl", steps, a, diagonals
        )
        stage_solve = BatchedLinearSolve(
            stage_matrices.reshape(num_steps * size, num_stages, num_stages)
        )
        sensitivities = stage_solve.solve(
            diagonals.reshape(num_steps * size, num_stages)
        ).reshape(num_steps, size, num_stages)
        weighted_steps = steps[:, None] * jnp.asarray(b, ys.dtype)[None]
        transitions = 1 + jnp.einsum("is,ins->in", weighted_steps, sensitivities)
        linearisation = DiagonalCollocationLinearisation(
            transitions=transitions,
            stage_solve=stage_solve,
            stage_sensitivities=jnp.swapaxes(sensitivities, 1, 2),
            weighted_steps=weighted_steps,
        )
        residual = (self._node_residual(ts, ys, stages), stages - fs)
        return residual, linearisation


def _check_stages(method, allowed):
    if not (is_integer(method.stages) and method.stages in allowed):
        raise ValueError(
            f"`{type(method).__name__}(stages=...)` supports stages in "
            f"{sorted(allowed)}; got {method.stages!r}."
        )


class GaussLegendre(AbstractCollocation):
    r"""Gauss-Legendre collocation: order $2s$, A-stable, symplectic.

    `GaussLegendre(stages=2)` is 4th order, `GaussLegendre(stages=3)` 6th order. The
    coefficients are the roots of shifted Legendre polynomials and the integrals of
    their Lagrange bases, in 50-digit arithmetic (exact forms:
    [`diffrax_deer.collocation_tableau`][]). Each Newton iteration evaluates the
    Jacobian at the $s$ stage points of every interval and factorises one
    $sn \times sn$ matrix per interval.

    **Arguments:**

    - `stages`: 1, 2 or 3.
    """

    family: ClassVar[str] = "gauss-legendre"

    def __check_init__(self):
        _check_stages(self, {1, 2, 3})

    def order(self) -> int:
        return 2 * self.stages


class RadauIIA(AbstractCollocation):
    r"""Radau IIA collocation: order $2s - 1$, L-stable, for stiff problems.

    `RadauIIA(stages=3)` is 5th order, the method of `scipy`'s and Hairer's RADAU5.

    **Arguments:**

    - `stages`: 1 (backward Euler), 2 or 3.
    """

    family: ClassVar[str] = "radau-iia"
    stiff_predictor: ClassVar[bool] = True

    def __check_init__(self):
        _check_stages(self, {1, 2, 3})

    def order(self) -> int:
        return 2 * self.stages - 1
