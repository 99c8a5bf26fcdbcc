"""A guard against a deadlock in XLA's CPU runtime (jaxlib 0.10)."""

import os
import warnings


_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def avoid_xla_cpu_scheduler_deadlock() -> None:
    """Turns off XLA:CPU's concurrency-optimised scheduler, unless the user chose.

    With jaxlib 0.10.2 on CPU, a Newton loop whose body holds batched LAPACK calls
    (the per-interval LU solves) beside multi-threaded matrix products sometimes
    never finishes: every XLA worker thread waits and none runs (seen on 2 cores
    at N = 1e5, in about 3 of 4 fresh processes; at N <= 1e4 not seen). With
    `--xla_cpu_enable_concurrency_optimized_scheduler=false` it ran to completion
    every time. XLA reads its flags when the CPU backend starts, so this only
    helps if `diffrax_deer` is imported before JAX first computes anything; set
    the flag in `XLA_FLAGS` yourself to decide either way.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG in flags:
        return
    try:
        from jax._src import xla_bridge

        started = bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # pragma: no cover - private layout changed
        started = False
    if started:
        warnings.warn(
            "diffrax_deer was imported after JAX started its backends, so it could "
            "not set XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler="
            "false, which avoids an intermittent deadlock of XLA:CPU in large DEER "
            "solves (N >= 1e5). Import diffrax_deer first, or set the flag in "
            "XLA_FLAGS before starting Python.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}=false".strip()
