r"""The registry of test and benchmark problems: one definition of each.

Every problem is an initial value problem $y' = f(t, y, \text{args})$, $y(t_0) = y_0$
on $[t_0, t_1]$ with a trusted answer: a closed form (the matrix exponential), a
published value (the Bari "Test Set for IVP Solvers", Hairer, Norsett & Wanner), or
diffrax at tight tolerances (Tsit5, or Kvaerno5 for the stiff ones).

    from diffrax_deer._bench.problems import get_problem
    problem = get_problem("van-der-pol")
    case = problem.instance(jnp.float32)            # term, y0, t0, t1, save_ts
    reference = problem.reference(case.save_ts)     # float64 NumPy array

The command line's `demo`, `validate` and `bench`, the scripts in `benchmarks/` and
the tests' `conftest.py` take their problems from here.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from .solves import Instance, solve_reference, succeeded


# --------------------------------------------------------------------------------------
# Vector fields. Parameters are module fields (Python floats, weakly typed, so they
# follow y's dtype); arrays of weights are cast by `cast_field`.
# --------------------------------------------------------------------------------------


class MLPVectorField(eqx.Module):
    """A NeuralODE-style vector field $f(t, y) = \\mathrm{MLP}(y)$.

    **Arguments:**

    - `state_size`: the dimension of $y$.
    - `width`, `depth`: the MLP's hidden width and number of hidden layers.
    - `key`: a JAX PRNG key for the weights.
    - `dtype`: the weights' dtype.
    """

    mlp: eqx.nn.MLP

    def __init__(
        self,
        state_size: int = 2,
        width: int = 64,
        depth: int = 2,
        *,
        key: jax.Array,
        dtype=jnp.float64,
    ):
        self.mlp = eqx.nn.MLP(
            state_size,
            state_size,
            width,
            depth,
            activation=jax.nn.softplus,
            key=key,
            dtype=dtype,
        )

    def __call__(self, t, y, args):
        del t, args
        return self.mlp(y)


class LinearVectorField(eqx.Module):
    """$f(t, y) = A y$."""

    matrix: Array

    def __call__(self, t, y, args):
        del t, args
        return self.matrix @ y


class LotkaVolterra(eqx.Module):
    r"""$x' = \alpha x - \beta x y$, $y' = -\gamma y + \delta x y$, with
    `rates` = $(\alpha, \beta, \gamma, \delta)$."""

    rates: tuple[float, float, float, float] = (1.5, 1.0, 3.0, 1.0)

    def __call__(self, t, y, args):
        alpha, beta, gamma, delta = self.rates
        prey, predator = y[0], y[1]
        return jnp.stack(
            [
                alpha * prey - beta * prey * predator,
                -gamma * predator + delta * prey * predator,
            ]
        )


class VanDerPol(eqx.Module):
    r"""$x' = v$, $v' = \mu (1 - x^2) v - x$."""

    mu: float = 1.0

    def __call__(self, t, y, args):
        x, v = y[0], y[1]
        return jnp.stack([v, self.mu * (1.0 - x**2) * v - x])


class FitzHughNagumo(eqx.Module):
    r"""$v' = v - v^3/3 - w + I$, $w' = \varepsilon (v + a - b w)$."""

    current: float = 0.5
    epsilon: float = 0.08
    a: float = 0.7
    b: float = 0.8

    def __call__(self, t, y, args):
        v, w = y[0], y[1]
        dv = v - v**3 / 3.0 - w + self.current
        return jnp.stack([dv, self.epsilon * (v + self.a - self.b * w)])


class Lorenz(eqx.Module):
    r"""$x' = \sigma (y - x)$, $y' = x (\rho - z) - y$, $z' = x y - \beta z$."""

    sigma: float = 10.0
    rho: float = 28.0
    beta: float = 8.0 / 3.0

    def __call__(self, t, y, args):
        x, u, z = y[0], y[1], y[2]
        return jnp.stack(
            [self.sigma * (u - x), x * (self.rho - z) - u, x * u - self.beta * z]
        )


class Arenstorf(eqx.Module):
    r"""The restricted three-body problem (Earth, Moon, satellite) in the rotating
    frame, as a first-order system in $(y_1, y_2, y_1', y_2')$:

    $$y_1'' = y_1 + 2 y_2' - \mu' \frac{y_1 + \mu}{D_1} - \mu \frac{y_1 - \mu'}{D_2},
    \quad y_2'' = y_2 - 2 y_1' - \mu' \frac{y_2}{D_1} - \mu \frac{y_2}{D_2},$$

    $D_1 = ((y_1 + \mu)^2 + y_2^2)^{3/2}$, $D_2 = ((y_1 - \mu')^2 + y_2^2)^{3/2}$,
    $\mu' = 1 - \mu$ (Hairer, Norsett & Wanner, *Solving ODEs I*, II.0).
    """

    mu: float = 0.012277471

    def __call__(self, t, y, args):
        x, u, vx, vu = y[0], y[1], y[2], y[3]
        moon = 1.0 - self.mu
        d1 = ((x + self.mu) ** 2 + u**2) ** 1.5
        d2 = ((x - moon) ** 2 + u**2) ** 1.5
        ax = x + 2.0 * vu - moon * (x + self.mu) / d1 - self.mu * (x - moon) / d2
        au = u - 2.0 * vx - moon * u / d1 - self.mu * u / d2
        return jnp.stack([vx, vu, ax, au])


def robertson(t, y, args):
    r"""Robertson's chemical kinetics (Bari test set, ROBER):
    $y_1' = -0.04 y_1 + 10^4 y_2 y_3$, $y_3' = 3 \cdot 10^7 y_2^2$,
    $y_2' = -y_1' - y_3'$."""
    y1, y2, y3 = y[0], y[1], y[2]
    fast = 3e7 * y2**2
    slow = -0.04 * y1 + 1e4 * y2 * y3
    return jnp.stack([slow, -slow - fast, fast])


def hires(t, y, args):
    """High Irradiance RESponse, 8 reactants (Bari test set, HIRES)."""
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    reaction = 280.0 * y6 * y8
    return jnp.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -reaction + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            reaction - 1.81 * y7,
            -reaction + 1.81 * y7,
        ]
    )


def orego(t, y, args):
    r"""The Oregonator, the Belousov-Zhabotinskii reaction (Bari test set, OREGO):
    $y_1' = s (y_2 + y_1 (1 - q y_1 - y_2))$, $y_2' = (y_3 - (1 + y_1) y_2) / s$,
    $y_3' = w (y_1 - y_3)$, with $s = 77.27$, $w = 0.161$, $q = 8.375 \cdot
    10^{-6}$."""
    y1, y2, y3 = y[0], y[1], y[2]
    s, w, q = 77.27, 0.161, 8.375e-6
    return jnp.stack(
        [
            s * (y2 + y1 * (1.0 - q * y1 - y2)),
            (y3 - (1.0 + y1) * y2) / s,
            w * (y1 - y3),
        ]
    )


def cast_field(field: Any, dtype, weights_dtype=None) -> Any:
    """`field` with its floating-point arrays in `dtype`, rounded first to
    `weights_dtype` (when given): the same weights, stored in another precision.

    Fields are built once in float64 and cast: `jax.random` draws different numbers
    for different dtypes, so building a float32 field directly would give a
    different problem, with no float64 reference to match.
    """

    def cast(x):
        if not eqx.is_inexact_array(x):
            return x
        if weights_dtype is not None:
            x = x.astype(weights_dtype)
        return x.astype(dtype)

    return jax.tree_util.tree_map(cast, field)


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


REFERENCE_MAX_STEPS = 1_000_000


@dataclasses.dataclass(frozen=True)
class Published:
    """A published value of the solution: $y(t)$ = `y`, from `source`."""

    t: float
    y: tuple[float, ...]
    source: str


@dataclasses.dataclass(frozen=True)
class Problem:
    """An initial value problem with a trusted answer.

    **Arguments:**

    - `name`, `description`: what the registry and tables call it.
    - `vector_field`: $f(t, y, \\text{args})$ in float64 (weights included).
    - `y0`, `t0`, `t1`, `args`: the rest of the problem.
    - `stiff`: the tight reference uses Kvaerno5 (else Tsit5).
    - `exact`: a closed form `ts -> ys` (float64), when there is one.
    - `published`: a published value $y(t)$, which the tight reference reproduces
      (tests/test_problems.py checks it).
    - `reference_tolerance`: rtol (and atol, unless `reference_atol`) of the
      tight diffrax reference.
    """

    name: str
    description: str
    vector_field: Callable[..., Any]
    y0: tuple[float, ...]
    t0: float
    t1: float
    args: Any = None
    stiff: bool = False
    exact: Callable[[Array], Array] | None = None
    published: Published | None = None
    reference_tolerance: float = 1e-12
    reference_atol: float | None = None

    def y0_array(self, dtype=jnp.float64) -> Array:
        return jnp.asarray(self.y0, dtype=dtype)

    def field(self, dtype=jnp.float64, weights_dtype=None) -> Any:
        """The vector field with its weights in `dtype` (see `cast_field`)."""
        return cast_field(self.vector_field, dtype, weights_dtype)

    def instance(
        self,
        dtype=jnp.float64,
        num_saves: int = 101,
        weights_dtype=None,
        save_ts: ArrayLike | None = None,
    ) -> Instance:
        """The problem in `dtype`, saved at `num_saves` uniform times on [t0, t1]
        (or at `save_ts`).

        `weights_dtype` rounds the field's weights (float32 weights solved in
        float64, say, for the reference of a float32 run).
        """
        t0 = jnp.asarray(self.t0, dtype)
        t1 = jnp.asarray(self.t1, dtype)
        if save_ts is None:
            save_ts = jnp.linspace(t0, t1, num_saves, dtype=dtype)
        return Instance(
            term=diffrax.ODETerm(self.field(dtype, weights_dtype)),
            y0=self.y0_array(dtype),
            t0=t0,
            t1=t1,
            save_ts=jnp.asarray(save_ts, dtype),
            args=self.args,
        )

    def node_times(self, num_steps: int, num_saves: int = 101, dtype=jnp.float64):
        """Up to `num_saves` nodes of DeerSolver's grid of `num_steps` uniform
        intervals, $t_i = t_0 + (t_1 - t_0) i / N$, evenly spread (every node when
        N < `num_saves`): save times where no interpolation enters the error."""
        count = min(num_saves, num_steps + 1)
        indices = np.round(np.linspace(0, num_steps, count)).astype(np.int64)
        t0 = jnp.asarray(self.t0, dtype)
        t1 = jnp.asarray(self.t1, dtype)
        fractions = jnp.asarray(indices, dtype) / jnp.asarray(num_steps, dtype)
        return (t0 + (t1 - t0) * fractions).at[-1].set(t1)

    def over(self, t1: float) -> "Problem":
        """The same problem on [t0, t1] (the closed form and published value still
        hold; the tight reference is recomputed for the new horizon)."""
        name = f"{self.name} [{self.t0:g}, {t1:g}]"
        return dataclasses.replace(self, name=name, t1=t1)

    def reference(self, ts: ArrayLike, weights_dtype=None) -> np.ndarray:
        """The trusted solution at the times `ts` (from t0), in float64: the closed
        form if there is one, else `reference_solve`'s."""
        ts = jnp.asarray(ts, jnp.float64)
        if self.exact is not None:
            return np.asarray(jax.jit(self.exact)(ts), np.float64)
        return np.asarray(self.reference_solve(ts, weights_dtype).ys, np.float64)

    def reference_solve(
        self, ts: ArrayLike, weights_dtype=None, tolerance: float | None = None
    ) -> diffrax.Solution:
        """diffrax in float64 (Kvaerno5 if `stiff`, else Tsit5) with rtol =
        `tolerance` (default `reference_tolerance`) and atol = `reference_atol` (by
        default the rtol), saved at `ts`. Raises if the solve fails."""
        ts = jnp.asarray(ts, jnp.float64)
        case = Instance(
            term=diffrax.ODETerm(self.field(jnp.float64, weights_dtype)),
            y0=self.y0_array(jnp.float64),
            t0=jnp.asarray(self.t0, jnp.float64),
            t1=ts[-1],
            save_ts=ts,
            args=self.args,
        )
        rtol = self.reference_tolerance if tolerance is None else tolerance
        atol = rtol if self.reference_atol is None else self.reference_atol
        solver = diffrax.Kvaerno5() if self.stiff else diffrax.Tsit5()
        sol = solve_reference(
            solver,
            jnp.asarray(rtol, jnp.float64),
            case,
            REFERENCE_MAX_STEPS,
            jnp.asarray(atol, jnp.float64),
        )
        if not succeeded(sol):
            raise RuntimeError(
                f"{self.name}: the reference solve failed: "
                f"{diffrax.RESULTS[sol.result]}"
            )
        return sol


def _linear() -> Problem:
    size = 10
    m = np.array(jax.random.normal(jax.random.key(1), (size, size), jnp.float64))
    m /= np.sqrt(size)
    matrix = jnp.asarray((m - m.T) - 0.3 * np.eye(size))
    y0 = tuple(np.full(size, 1.0 / np.sqrt(size)))

    def exact(ts):
        expms = jax.vmap(lambda t: jax.scipy.linalg.expm(matrix * t))(ts)
        return expms @ jnp.asarray(y0, jnp.float64)

    return Problem(
        "linear",
        "y' = A y, A 10x10 (skew-symmetric - 0.3 I), t in [0, 5]; exact: expm",
        LinearVectorField(matrix),
        y0,
        0.0,
        5.0,
        exact=exact,
    )


def _mlp_field(state_size: int) -> MLPVectorField:
    return MLPVectorField(
        state_size, width=64, depth=2, key=jax.random.key(0), dtype=jnp.float64
    )


def mlp_problem(state_size: int) -> Problem:
    """A NeuralODE-style problem of any state size: the MLP field of `state_size`
    (width 64, depth 2, softplus, weights from `key(0)`), y0 ~ N(0, I) (drawn in
    float32 from `key(1)`, so float32 runs see the same numbers), t in [0, 1]."""
    y0 = jax.random.normal(jax.random.key(1), (state_size,), jnp.float32)
    return Problem(
        f"mlp-{state_size}",
        f"MLP {state_size}-64-64-{state_size} (softplus), y0 ~ N(0, I), t in [0, 1]",
        _mlp_field(state_size),
        tuple(float(v) for v in np.asarray(y0)),
        0.0,
        1.0,
    )


ARENSTORF_PERIOD = 17.0652165601579625588917206249
ARENSTORF_Y0 = (0.994, 0.0, 0.0, -2.00158510637908252240537862224)

# name -> builder; `get_problem` builds each once.
_BUILDERS: dict[str, Callable[[], Problem]] = {
    "linear": _linear,
    "lotka-volterra": lambda: Problem(
        "lotka-volterra",
        "Lotka-Volterra (1.5, 1, 3, 1), y0 = (1, 1), t in [0, 10]",
        LotkaVolterra(),
        (1.0, 1.0),
        0.0,
        10.0,
    ),
    "van-der-pol": lambda: Problem(
        "van-der-pol",
        "Van der Pol, mu = 1, y0 = (2, 0), t in [0, 20]",
        VanDerPol(1.0),
        (2.0, 0.0),
        0.0,
        20.0,
    ),
    "van-der-pol-100": lambda: Problem(
        "van-der-pol-100",
        "Van der Pol, mu = 1, y0 = (2, 0), t in [0, 100]",
        VanDerPol(1.0),
        (2.0, 0.0),
        0.0,
        100.0,
    ),
    "van-der-pol-stiff": lambda: Problem(
        "van-der-pol-stiff",
        "stiff Van der Pol, mu = 1000, y0 = (2, 0), t in [0, 3000]",
        VanDerPol(1000.0),
        (2.0, 0.0),
        0.0,
        3000.0,
        stiff=True,
    ),
    "fitzhugh-nagumo": lambda: Problem(
        "fitzhugh-nagumo",
        "FitzHugh-Nagumo (I = 0.5, eps = 0.08, a = 0.7, b = 0.8), y0 = (-1, 1), "
        "t in [0, 50]",
        FitzHughNagumo(),
        (-1.0, 1.0),
        0.0,
        50.0,
    ),
    "lorenz": lambda: Problem(
        "lorenz",
        "Lorenz (10, 28, 8/3), y0 = (1, 1, 1), t in [0, 5]",
        Lorenz(),
        (1.0, 1.0, 1.0),
        0.0,
        5.0,
    ),
    "arenstorf": lambda: Problem(
        "arenstorf",
        "Arenstorf orbit (restricted three-body, mu = 0.012277471), one period",
        Arenstorf(),
        ARENSTORF_Y0,
        0.0,
        ARENSTORF_PERIOD,
        published=Published(
            ARENSTORF_PERIOD,
            ARENSTORF_Y0,
            "periodic: y(T) = y0 (Hairer, Norsett & Wanner, Solving ODEs I, II.0)",
        ),
    ),
    "robertson": lambda: Problem(
        "robertson",
        "Robertson (Bari ROBER), y0 = (1, 0, 0), t in [0, 1e11]",
        robertson,
        (1.0, 0.0, 0.0),
        0.0,
        1e11,
        stiff=True,
        published=Published(
            1e11,
            (2.083340149701255e-08, 8.333360770334713e-14, 9.999999791665050e-01),
            "Bari Test Set for IVP Solvers, ROBER",
        ),
        # y2 falls to 8e-14: the absolute tolerance must sit far below it.
        reference_tolerance=1e-10,
        reference_atol=1e-20,
    ),
    "hires": lambda: Problem(
        "hires",
        "HIRES (Bari), t in [0, 321.8122]",
        hires,
        (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057),
        0.0,
        321.8122,
        stiff=True,
        published=Published(
            321.8122,
            (
                7.371312573325668e-4,
                1.442485726316185e-4,
                5.888729740967575e-5,
                1.175651343283149e-3,
                2.386356198831331e-3,
                6.238968252742796e-3,
                2.849998395185769e-3,
                2.850001604814231e-3,
            ),
            "Bari Test Set for IVP Solvers, HIRES",
        ),
    ),
    "orego": lambda: Problem(
        "orego",
        "Oregonator (Bari OREGO), y0 = (1, 2, 3), t in [0, 360]",
        orego,
        (1.0, 2.0, 3.0),
        0.0,
        360.0,
        stiff=True,
        published=Published(
            360.0,
            (1.000814870318523, 1228.178521549917, 132.0554942846706),
            "Bari Test Set for IVP Solvers, OREGO",
        ),
        # Kvaerno5 at 1e-12 runs out of 1e6 steps (its Newton iteration cannot meet
        # that tolerance near the relaxation jumps); at 1e-11: 9.5e4 steps.
        reference_tolerance=1e-11,
    ),
    "mlp": lambda: Problem(
        "mlp",
        "MLP 2-64-64-2 (softplus), y0 = (1, -1), t in [0, 10]",
        _mlp_field(2),
        (1.0, -1.0),
        0.0,
        10.0,
    ),
    "mlp-32": lambda: mlp_problem(32),
}

PROBLEM_NAMES: tuple[str, ...] = tuple(_BUILDERS)
# Issue 14's work-precision suite (benchmarks/adaptive.py and
# benchmarks/window_estimates.py): compared with Tsit5 and Dopri8, and with Kvaerno5.
ADAPTIVE_NONSTIFF = ("mlp", "lotka-volterra", "van-der-pol-100", "arenstorf", "mlp-32")
ADAPTIVE_STIFF = ("van-der-pol-stiff", "robertson", "hires", "orego")


@functools.cache
def get_problem(name: str) -> Problem:
    """The registry's problem `name` (one of `PROBLEM_NAMES`), built once."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown problem {name!r}; choose from {', '.join(PROBLEM_NAMES)}"
        ) from None
    return builder()
