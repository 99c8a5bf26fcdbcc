"""The diffrax adapter: `DeerSolver` and `DeerState`, dense output over a window
(`DeerInterpolation`), `DeerAdjoint`, and diffrax's explicit Runge-Kutta solvers
as DEER methods.

The only layer that imports diffrax. May import the core (`.._core`) and the
methods (`.._methods`); kept thin: the numerics live in the core.
"""
