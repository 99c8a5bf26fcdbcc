"""One-step discretisations written as residuals per interval: the theta methods
(trapezoid, backward Euler) and collocation (Gauss-Legendre, Radau IIA).

May import: the DEER core (`.._core`), jax, equinox, jaxtyping, numpy, sympy
(exact tableaux) and mpmath (their float64 values). Never diffrax: diffrax's own
explicit solvers become methods in the adapter (`.._adapter.runge_kutta`).
"""
