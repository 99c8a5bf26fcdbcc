"""The time axis split over devices: correctness and the collectives it compiles to.

`DeerSolver(num_steps=N, mesh=Mesh(devices, ("time",)))` on one window of the
forced pendulum with a relaxing third component (n = 3), against the same solve on
one device: the largest relative error of the solution at t1 and of its gradient
(in y0 and the field's argument, DeerAdjoint), and, read from the compiled HLO of
the gradient, the collective instructions and the bytes they deliver to a device,
in the whole program and in its first outermost loop in program order. Simulated
CPU devices (`--devices`, default 8) run the program but say nothing about speed.

    python benchmarks/collectives.py --markdown /tmp/bench_collectives.md
"""

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[8 * 13 - 1, 8 * 26 - 1]
    )
    parser.add_argument("--markdown", default=None)
    return parser.parse_args()


ARGS = _parse()
# Before JAX starts: the simulated devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={ARGS.devices}"
)

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from diffrax_deer import DeerAdjoint, DeerSolver  # noqa: E402
from diffrax_deer._bench import timing  # noqa: E402
from diffrax_deer._bench.collectives import collective_traffic, describe  # noqa: E402


jax.config.update("jax_enable_x64", True)


def field(t, y, strength):
    return jnp.stack(
        [y[1], -strength * jnp.sin(y[0]) - 0.1 * y[1] + jnp.sin(t), y[0] - y[2]]
    )


Y0, STRENGTH = jnp.array([1.0, 0.0, 0.5]), jnp.array(2.0)


def value_and_gradient(solver):
    def loss(y0, strength):
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            0.0,
            3.0,
            3.0,
            y0,
            args=strength,
            adjoint=DeerAdjoint(),
        )
        return jnp.sum(jnp.sin(solution.ys))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def relative_error(x, reference) -> float:
    x, reference = np.asarray(x), np.asarray(reference)
    return float(np.max(np.abs(x - reference)) / np.max(np.abs(reference)))


def measure(num_steps: int, jacobian: str, mesh: Mesh) -> dict:
    split = value_and_gradient(
        DeerSolver(num_steps=num_steps, jacobian=jacobian, mesh=mesh)
    )
    whole = value_and_gradient(DeerSolver(num_steps=num_steps, jacobian=jacobian))
    (value, grads), (reference, reference_grads) = (
        split(Y0, STRENGTH),
        whole(Y0, STRENGTH),
    )
    error = max(
        relative_error(value, reference),
        *(relative_error(g, r) for g, r in zip(grads, reference_grads, strict=True)),
    )
    total, loops = collective_traffic(split.lower(Y0, STRENGTH).compile().as_text())
    return dict(error=error, total=total, loop=loops[0] if loops else None)


def main() -> None:
    mesh = Mesh(np.array(jax.devices()), ("time",))
    rows = []
    for jacobian in ("full", "diagonal"):
        for num_steps in ARGS.sizes:
            print(f"{jacobian} N = {num_steps}", file=sys.stderr)
            result = measure(num_steps, jacobian, mesh)
            rows.append(
                [
                    jacobian,
                    str(num_steps + 1),
                    f"{result['error']:.1e}",
                    describe(result["total"]),
                    str(result["total"].total_bytes),
                    describe(result["loop"]) if result["loop"] else "-",
                ]
            )
    machine = timing.machine_header(timing.machine_info())
    header = (
        f"{machine}\n\n{ARGS.devices} simulated devices on one CPU, n = 3, one "
        "window, DeerAdjoint gradient.\n\n"
    )
    table = timing.markdown_table(
        [
            "Jacobian",
            "nodes",
            "max rel. error vs 1 device",
            "collectives (whole program)",
            "bytes",
            "in the first outermost loop",
        ],
        rows,
    )
    text = header + table
    print(text)
    if ARGS.markdown:
        with open(ARGS.markdown, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
