"""Sequential depth of a traced computation: its loops and their static trip counts.

A `lax.scan` runs its body `length` times one after the other; a `while_loop` a
number of times known only at run time (Newton's iterations, reported in its
statistics). An associative scan is no loop at all: it is unrolled into
$O(\\log N)$ levels of batched operations. Walking the jaxpr of a solve lists every
loop, nested ones included, so a test can check that none grows with the grid.
"""

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass(frozen=True)
class Loop:
    """One loop of a traced computation.

    **Arguments:**

    - `kind`: `"scan"` (static trip count) or `"while"` (dynamic).
    - `length`: the scan's trip count (`None` for a while loop).
    - `depth`: how many loops enclose it.
    """

    kind: str
    length: int | None
    depth: int


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for item in values:
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _walk(jaxpr, depth: int) -> Iterator[Loop]:
    for equation in jaxpr.eqns:
        name = equation.primitive.name
        inner = depth
        if name == "scan":
            yield Loop("scan", int(equation.params["length"]), depth)
            inner = depth + 1
        elif name == "while":
            yield Loop("while", None, depth)
            inner = depth + 1
        for sub in _sub_jaxprs(equation.params):
            yield from _walk(sub, inner)


def sequential_loops(function: Callable[..., Any], *args: Any) -> list[Loop]:
    """Every loop in the jaxpr of `function(*args)`, outermost first.

    **Arguments:**

    - `function`: any JAX-traceable function (jitted or not).
    - `args`: its arguments (arrays or `jax.ShapeDtypeStruct`s).
    """
    closed = jax.make_jaxpr(function)(*args)
    return list(_walk(closed.jaxpr, 0))


def scan_levels(num_steps: int) -> int:
    """The sequential levels of `jax.lax.associative_scan` over `num_steps`
    elements: an up-sweep and a down-sweep of $\\lceil \\log_2 N \\rceil$ each."""
    if num_steps <= 1:
        return 0
    return 2 * math.ceil(math.log2(num_steps)) - 1
