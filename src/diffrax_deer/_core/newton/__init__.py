"""Newton's method on the residual of a whole trajectory, one parallel scan per step.

Laid out as optimistix lays out its solvers, each loop with its state as a named
`eqx.Module`:

- `norms`: the sizes Newton measures (residuals, scaled updates);
- `step`: what both loops share: the problem, the Newton (or damped) step, the
  trial point, the best iterate and the progress counters;
- `plain`: plain DEER's loop (`PlainNewtonState`);
- `levenberg_marquardt`: the rescue after an overflow (`LevenbergMarquardtState`);
- `solve`: the entry point, [`diffrax_deer.newton_solve`][], and
  [`diffrax_deer.NewtonStats`][].
"""

from .solve import NewtonStats as NewtonStats, newton_solve as newton_solve
