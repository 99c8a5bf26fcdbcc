"""GRU evaluation: `deer_scan` against `jax.lax.scan` and the paper's `seq1d`.

The setting of the paper's speed table (Lim et al. 2024, "RNNs are parallelizable",
Table 1 / Figure 2; their experiments/01_speed_benchmark): an `equinox.nn.GRUCell`
with input size = hidden size n, random weights, batch 16, inputs drawn from a
standard normal, zero initial carry, float32. For each sequence length L and hidden
size n, in one process, timed interleaved (`diffrax_deer._bench.timing`):

- `lax.scan`: the sequential reference, the cell vmapped over the batch inside each
  step (as in the paper);
- `deer_scan`: `diffrax_deer.deer_scan`, vmapped over the batch, default
  tolerances (float32: rtol = atol = 1e-5);
- `seq1d`: the paper's `deer.seq1d` (its own defaults: atol 1e-4, rtol 1e-3),
  vmapped over the batch, if `import deer` works (`PYTHONPATH=../shared/peers`).

Reported: run time (median of `--repeats` calls after the first), the speed-up of
each DEER over `lax.scan`, deer_scan's Newton iterations (the most over the batch),
the max |difference| of each from `lax.scan`, and the cost of one Newton iteration
of deer_scan and of seq1d, from runs with a fixed number of iterations K and 2K
(zero tolerance): (T(2K) - T(K)) / K with T the fastest of the calls, which leaves
out everything outside the loop.

On a GPU every matrix product runs at full float32 precision
(`jax_default_matmul_precision="highest"`, for all three), as on the paper's V100:
TensorFloat-32 would make `lax.scan` itself differ from exact float32 by ~1e-3.
Configurations whose Jacobians (B L n^2 values) exceed `--max-jacobian-gib` are
skipped (the paper's code ran out of memory at n = 64).

    python benchmarks/gru.py --quick
    PYTHONPATH=../shared/peers python benchmarks/gru.py --markdown gru.md
"""

import argparse
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp

from diffrax_deer import deer_scan
from diffrax_deer._bench import timing


try:
    from deer import seq1d
    from deer.fseq1d import DEER
except ImportError:
    seq1d = None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L = 1e3, n in {1, 8}")
    parser.add_argument("--lengths", default="1e3,1e4,1e5")
    parser.add_argument("--hidden", default="1,4,8,16,64")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--per-iteration-k",
        type=int,
        default=8,
        help="K of the per-iteration timing (0: skip it)",
    )
    parser.add_argument("--max-jacobian-gib", type=float, default=4.0)
    parser.add_argument("--no-seq1d", action="store_true")
    timing.add_output_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.hidden, args.repeats = "1e3", "1,8", 3
    args.lengths = timing.parse_list(args.lengths, timing.parse_count)
    args.hidden = timing.parse_list(args.hidden, int)
    return args


ARGS = parse_args(sys.argv[1:])
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")


def make_problem(length: int, hidden: int, batch: int):
    """The paper's GRU benchmark: input size = hidden size, batch-major inputs."""
    cell_key, input_key = jax.random.split(jax.random.key(0))
    cell = eqx.nn.GRUCell(hidden, hidden, key=cell_key)
    xs = jax.random.normal(input_key, (batch, length, hidden), jnp.float32)
    init = jnp.zeros((batch, hidden), jnp.float32)
    return eqx.partition(cell, eqx.is_array), xs, init


def make_contenders(static, iterations: int | None):
    """Jitted `(params, init, xs) -> (outputs (B, L, n), Newton iterations)`; with
    `iterations`, the two DEERs run exactly that many (zero tolerance)."""

    def cell_step(params, h, x):
        return eqx.combine(params, static)(x, h)

    def deer_one(params, init, xs):
        options = dict(return_stats=True)
        if iterations is not None:
            options.update(max_iters=iterations, rtol=1e-30, atol=1e-30, throw=False)

        def step(h, x):
            h = cell_step(params, h, x)
            return h, h

        _, hs, stats = deer_scan(step, init, xs, **options)
        return hs, stats.newton.num_iters

    @jax.jit
    def deer(params, init, xs):
        hs, iters = jax.vmap(deer_one, in_axes=(None, 0, 0))(params, init, xs)
        return hs, jnp.max(iters)

    @jax.jit
    def paper(params, init, xs):
        if iterations is None:
            method = DEER()
        else:
            method = DEER(max_iter=iterations, atol=0.0, rtol=0.0)

        def one(init, xs):
            return seq1d(lambda h, x, p: cell_step(p, h, x), init, xs, params, method)

        return jax.vmap(one)(init, xs).value, jnp.array(-1)

    @jax.jit
    def sequential(params, init, xs):
        def step(h, x):
            h = jax.vmap(lambda h, x: cell_step(params, h, x))(h, x)
            return h, h

        _, hs = jax.lax.scan(step, init, jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(hs, 0, 1), jnp.array(0)

    contenders = {"lax.scan": sequential, "deer_scan": deer}
    if seq1d is not None and not ARGS.no_seq1d:
        contenders["seq1d"] = paper
    if iterations is not None:
        del contenders["lax.scan"]
    return contenders


def per_iteration(static, args, k: int) -> dict[str, float]:
    """Seconds per Newton iteration: (T(2K) - T(K)) / K, timed interleaved, with
    T the fastest call (load only adds time; differences of medians are noisier)."""
    fixed = {k: make_contenders(static, k), 2 * k: make_contenders(static, 2 * k)}
    calls = {
        (name, count): (lambda fn=fn: fn(*args))
        for count, contenders in fixed.items()
        for name, fn in contenders.items()
    }
    timed = timing.time_interleaved(calls, ARGS.repeats)
    names = fixed[k]
    return {
        name: (timed[(name, 2 * k)].min_s - timed[(name, k)].min_s) / k
        for name in names
    }


def measure(length: int, hidden: int) -> dict:
    (params, static), xs, init = make_problem(length, hidden, ARGS.batch)
    args = (params, init, xs)
    contenders = make_contenders(static, None)
    timed = timing.time_interleaved(
        {name: (lambda fn=fn: fn(*args)) for name, fn in contenders.items()},
        ARGS.repeats,
    )
    reference = timed["lax.scan"].output[0]
    record = dict(length=length, hidden=hidden, batch=ARGS.batch)
    for name, result in timed.items():
        outputs, iters = result.output
        record[name] = dict(
            compile_s=result.compile_s,
            run_s=result.run_s,
            min_s=result.min_s,
            max_difference=float(jnp.max(jnp.abs(outputs - reference))),
        )
    record["deer_scan"]["iterations"] = int(timed["deer_scan"].output[1])
    if ARGS.per_iteration_k > 0:
        for name, seconds in per_iteration(static, args, ARGS.per_iteration_k).items():
            record[name]["per_iteration_s"] = seconds
    return record


def table_row(record: dict) -> list[str]:
    scan = record["lax.scan"]["run_s"]
    deer, paper = record["deer_scan"], record.get("seq1d")
    row = [
        timing.fmt_count(record["length"]),
        str(record["hidden"]),
        timing.fmt_seconds(scan),
        timing.fmt_seconds(deer["run_s"]),
        timing.fmt_ratio(scan / deer["run_s"]),
        str(deer["iterations"]),
        timing.fmt_error(deer["max_difference"]),
        timing.fmt_seconds(deer.get("per_iteration_s")),
    ]
    if paper is not None:
        row += [
            timing.fmt_seconds(paper["run_s"]),
            timing.fmt_ratio(scan / paper["run_s"]),
            timing.fmt_error(paper["max_difference"]),
            timing.fmt_seconds(paper.get("per_iteration_s")),
        ]
    return row


def main() -> int:
    info = timing.machine_info()
    records, rows = [], []
    for length in ARGS.lengths:
        for hidden in ARGS.hidden:
            jacobian_gib = ARGS.batch * length * hidden**2 * 4 / 2**30
            if jacobian_gib > ARGS.max_jacobian_gib:
                timing.progress(
                    f"L={length} n={hidden}: skipped ({jacobian_gib:.1f} GiB)"
                )
                continue
            timing.progress(f"L={length} n={hidden}")
            record = measure(length, hidden)
            records.append(record)
            rows.append(table_row(record))
    headers = [
        "L",
        "n",
        "lax.scan",
        "deer_scan",
        "speed-up",
        "iters",
        "max diff",
        "per iter",
    ]
    if records and "seq1d" in records[0]:
        headers += ["seq1d", "speed-up", "max diff", "per iter"]
    flags = os.environ.get("XLA_FLAGS", "") or "none"
    markdown = "\n\n".join(
        [
            timing.machine_header(info),
            f"Command: `{timing.script_command('gru.py')}`; batch {ARGS.batch}, "
            f"float32, XLA_FLAGS: `{flags}`.",
            timing.markdown_table(headers, rows),
        ]
    )
    timing.emit(markdown, dict(machine=info, records=records), ARGS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
