"""The DEER core: pure JAX, independent of diffrax.

Holds the parallel affine recurrence (`scan`) and its damped, Kalman-smoother form
(`damped_scan`), the per-interval linear solves (`linear_solve`), the interface
between a discretisation and Newton (`discretisation`), Newton's method over a
whole trajectory (`newton`), the initial guess (`predictor`), Hermite interpolation
(`hermite`), the window solve with its implicit derivative (`window`), the Newton
system of explicit one-step maps (`explicit_map`), `deer_scan`, a parallel
`jax.lax.scan` for recurrent cells (`deer_scan`), and the construction-time checks
of options (`validation`).

May import: jax, equinox, lineax, jaxtyping, numpy. Never diffrax, and nothing else
of this package (a test imports it with diffrax blocked).
"""
