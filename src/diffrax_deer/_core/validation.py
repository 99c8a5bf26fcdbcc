"""Construction-time checks of options, shared by the methods and the adapter."""

import math
from typing import Any

import jax
import numpy as np


# Iteration counters and node indices are int32 arrays.
MAX_INT32 = 2**31 - 1


def as_python_scalar(value: Any) -> Any:
    """NumPy scalars, 0-d NumPy arrays and concrete 0-d JAX arrays become Python
    `bool`, `int` or `float`, so that options validate and are hashable static
    fields; anything else (including a traced value) is returned unchanged, for the
    option's check to refuse.

    **Arguments:**

    - `value`: an option as the user passed it.
    """
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        array = np.asarray(value)
        if array.dtype == np.bool_:
            return bool(array)
        if np.issubdtype(array.dtype, np.integer):
            return int(array)
        if np.issubdtype(array.dtype, np.floating):
            return float(array)
    return value


def is_integer(value: Any) -> bool:
    """Whether `value` is a Python integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_integer(name: str, value: Any, *, minimum: int, meaning: str) -> None:
    """Raises `ValueError` unless `minimum <= value <= 2**31 - 1` is an integer.

    **Arguments:**

    - `name`: how the option is written in the message, e.g. "`max_iters`".
    - `value`: its value (after `as_python_scalar`).
    - `minimum`: the smallest value allowed.
    - `meaning`: what the option is, for the message.
    """
    if not (is_integer(value) and minimum <= value <= MAX_INT32):
        raise ValueError(
            f"{name} must be an integer from {minimum} to 2**31 - 1 ({meaning}); "
            f"got {value!r}."
        )


def check_tolerance(name: str, value: Any) -> None:
    """Raises `ValueError` unless `value` is `None` or a finite real number >= 0.

    **Arguments:**

    - `name`: the option, e.g. "`rtol`".
    - `value`: its value (after `as_python_scalar`).
    """
    if value is None:
        return
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{name} must be None (a default by dtype) or a finite real number "
            f">= 0, e.g. 1e-8; got {value!r}."
        )
