"""The command line: `python -m diffrax_deer` / `diffrax-deer` and its sub-commands.

Runs the CLI in-process through `main([...])` on small grids; one test starts a real
subprocess to check what a user sees on a bad option.
"""

import json
import subprocess
import sys
from typing import ClassVar

import diffrax
import equinox as eqx
import pytest

from diffrax_deer import DeerSolver, Trapezoid
from diffrax_deer.__main__ import main
from diffrax_deer._cli.options import (
    MEASURED_ERRORS,
    METHODS,
    PROBLEMS,
    make_method,
)
from diffrax_deer._methods.theta_method import AbstractThetaMethod


@pytest.mark.parametrize("command", [[], ["demo"], ["validate"], ["bench"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: diffrax-deer")
    if command:
        assert f"diffrax-deer {command[0]}" in out
    else:
        for name in ("demo", "validate", "bench"):
            assert name in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["demo", "--num-steps", "0"],
        ["demo", "--num-steps", "many"],
        ["demo", "--method", "rk45"],
        ["demo", "--plot", "/no/such/directory/out.png"],
        ["validate", "--methods", "trapezoid,nope"],
        ["validate", "--problems", "lorenz"],
        ["bench", "--sizes", "1e3,x"],
        ["bench", "--dtypes", "float16"],
        # Too large for an integer, not whole, or nothing at all: one line, exit 2.
        ["demo", "--num-steps", "1e400"],
        ["demo", "--num-steps", "1.5e0"],
        ["bench", "--sizes", "1e400"],
        ["bench", "--sizes", ""],
        ["bench", "--sizes", ","],
    ],
)
def test_bad_option_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "error:" in lines[0]


def test_bad_option_in_a_real_process():
    process = subprocess.run(
        [sys.executable, "-m", "diffrax_deer", "--num-steps", "-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert lines == [
        "diffrax-deer demo: error: argument --num-steps: expected an integer >= 1, "
        "got -3 (see `diffrax-deer demo --help`)"
    ]
    assert process.stdout == ""


def test_every_method_name_builds_a_solver():
    for name in METHODS:
        solver = DeerSolver(num_steps=4, method=make_method(name))
        assert solver.order(None) == METHODS[name][1], name


# --------------------------------------------------------------------------------------
# What a tight bound must catch: a wrong tableau and a perturbed vector field
# --------------------------------------------------------------------------------------


class TiltedTrapezoid(AbstractThetaMethod):
    """A wrong tableau: theta = 0.55 instead of 1/2, a first-order method claiming
    the trapezoid's order 2."""

    theta: ClassVar[float] = 0.55

    def order(self) -> int:
        return 2


class ScaledField(eqx.Module):
    field: object
    factor: float

    def __call__(self, t, y, args):
        return self.factor * self.field(t, y, args)


def perturb_deer_field(monkeypatch, module, relative: float) -> None:
    """Makes `module`'s DeerSolver solves see the vector field times (1 + relative);
    the reference keeps the true field."""
    solve = module.solve_deer

    def perturbed(solver, case):
        term = diffrax.ODETerm(ScaledField(case.term.vector_field, 1.0 + relative))
        return solve(solver, eqx.tree_at(lambda c: c.term, case, term))

    monkeypatch.setattr(module, "solve_deer", perturbed)


def break_method(monkeypatch, module, broken: str, perturbation: float) -> None:
    """Makes `module` solve with a broken "trapezoid": a tilted tableau, or the
    true one on a vector field off by a relative `perturbation`."""
    if broken == "tilted tableau":
        factory = TiltedTrapezoid
    else:
        perturb_deer_field(monkeypatch, module, perturbation)
        factory = Trapezoid
    make = module.make_method
    monkeypatch.setattr(
        module, "make_method", lambda m: factory() if m == "trapezoid" else make(m)
    )


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_json_and_plot(tmp_path, capsys):
    # `demo` is the default sub-command: no name needed.
    plot = tmp_path / "demo.png"
    argv = ["--num-steps", "200", "--repeats", "1", "--json", "--plot", str(plot)]
    status = main(argv)
    results = json.loads(capsys.readouterr().out)
    assert status == 0
    assert results["agrees"] is True and results["converged"] is True
    assert results["method"] == "trapezoid" and results["order"] == 2
    assert results["num_steps"] == 200 and results["dtype"] == "float64"
    deer, fixed, reference = results["solvers"]
    assert deer["name"] == "DeerSolver(num_steps=200, trapezoid)"
    assert deer["newton_iters"] >= 1
    # The bound is a real test: above the error, but not by more than 10x.
    assert deer["max_error"] <= results["expected_bound"] <= 10 * deer["max_error"]
    assert fixed["newton_iters"] is None
    assert reference["max_error"] == 0.0
    for solver in results["solvers"]:
        assert solver["compile_s"] > 0 and solver["run_s"] > 0
    assert plot.stat().st_size > 10_000

    # The human-readable report of the same results.
    from diffrax_deer._cli.demo import format_demo

    report = format_demo(results)
    assert "DeerSolver(num_steps=200, trapezoid)" in report
    assert "compile s" in report and "run ms" in report and "Newton its" in report
    assert "\nAGREES: DeerSolver matches the Tsit5 reference" in report


def test_demo_does_not_vouch_for_a_grid_too_coarse_to_check(capsys):
    # Three Euler steps over [0, 10]: an expected error near the solution's size.
    status = main(["demo", "--num-steps", "3", "--method", "euler", "--repeats", "1"])
    out = capsys.readouterr().out
    assert status == 1
    assert "\nTOO COARSE: " in out and "\nAGREES" not in out


# The tilted tableau on a coarse grid, where its first-order error stands out most
# against the second order it claims: 6.2e-2 at N = 40 (bound 1.5e-2). A relative
# perturbation of 1e-6 of the field at N = 1000 moves the error from 8.1e-6 to
# 4.3e-5 (bound 2.4e-5).
@pytest.mark.slow
@pytest.mark.parametrize(
    "broken, num_steps", [("tilted tableau", 40), ("perturbed field", 1000)]
)
def test_demo_disagrees_with_a_broken_method(broken, num_steps, monkeypatch):
    from diffrax_deer._cli import demo as _cli_demo

    break_method(monkeypatch, _cli_demo, broken, perturbation=1e-6)
    results = _cli_demo.demo_results(num_steps=num_steps, repeats=1)
    assert results["converged"]
    assert results["max_error"] > results["expected_bound"]
    assert results["agrees"] is False
    assert _cli_demo.format_demo(results).splitlines()[-1].startswith("DISAGREES")


# --------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------


def test_every_case_has_a_measured_error():
    for problem in PROBLEMS:
        for method in METHODS:
            num_steps, error = MEASURED_ERRORS[problem][method]
            assert num_steps in [10 * 2**k for k in range(15)] and error > 0


@pytest.mark.slow
def test_validate_quick(capsys):
    from diffrax_deer._cli.validate import format_table

    status = main(["validate", "--quick", "--json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert status == 0, captured.out
    assert results["passed"] is True
    assert {row["problem"] for row in results["rows"]} == {"linear", "lotka-volterra"}
    for row in results["rows"]:
        assert row["passed"] and row["converged"]
        # Each bound is a real test: within 10x of a correct method's error.
        assert row["max_error"] <= row["bound"] <= 10 * row["max_error"], row
    # Progress went to stderr, one line per case; the table renders the rows.
    assert len(captured.err.strip().splitlines()) >= len(results["rows"])
    table = format_table(results["rows"])
    assert f"PASSED: all {len(results['rows'])} within tolerance." in table


# On the calibration grid (N0 = 2560) the trapezoid errs by 1.3e-6 (bound 4.0e-6);
# the tilted tableau by TILTED; a relative perturbation of 1e-5 of the field
# moves the error to 1.3e-5.
@pytest.mark.slow
@pytest.mark.parametrize("broken", ["tilted tableau", "perturbed field"])
def test_validate_fails_a_broken_method(broken, monkeypatch):
    from diffrax_deer._cli import validate as _cli_validate

    break_method(monkeypatch, _cli_validate, broken, perturbation=1e-5)
    (row,) = _cli_validate.run_validation([("linear", "trapezoid")])
    assert row["converged"]
    assert row["max_error"] > row["bound"]
    assert not row["passed"]


# On y' = A y every 2-stage second-order Runge-Kutta method is the same map,
# I + hA + (hA)^2 / 2: the first stands for the others, whose calibration must be
# the same.
SAME_MAP_ON_LINEAR = ("heun", "midpoint", "ralston")


@pytest.mark.slow
def test_every_bound_is_within_10x_of_the_error_on_the_linear_problem():
    from diffrax_deer._cli.validate import run_validation

    first, *same = SAME_MAP_ON_LINEAR
    for method in same:
        assert MEASURED_ERRORS["linear"][method] == MEASURED_ERRORS["linear"][first]
    rows = run_validation([("linear", m) for m in METHODS if m not in same])
    for row in rows:
        assert row["passed"], row
        assert row["bound"] <= 10 * row["max_error"], row


def test_validate_exits_1_when_out_of_tolerance(monkeypatch, capsys):
    from diffrax_deer._cli import validate as _cli_validate

    def fake_run_validation(cases, **kwargs):
        assert cases == [("linear", "backward-euler")]
        row = dict(
            problem="linear",
            method="backward-euler",
            order=1,
            num_steps=50,
            step=0.1,
            newton_iters=2,
            converged=True,
            max_error=0.5,
            expected_error=0.03,
            bound=0.1,
            passed=False,
            seconds=0.0,
        )
        return [row]

    monkeypatch.setattr(_cli_validate, "run_validation", fake_run_validation)
    argv = ["validate", "--problems", "linear", "--methods", "backward-euler"]
    status = main(argv)
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL (error above bound)" in out
    assert "FAILED: 1 of 1 out of tolerance." in out


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------


def test_bench_markdown(monkeypatch, tmp_path, capsys):
    from diffrax_deer._cli import bench as _cli_bench

    machine = dict(
        cpu="Test CPU",
        cores=2,
        python="3",
        jax="0",
        diffrax="0",
        equinox="0",
        backend="cpu",
        device="cpu: cpu",
    )
    case = dict(
        N=1000,
        dtype="float64",
        method="tsit5",
        deer=dict(
            compile_s=2.0,
            run_s=0.002,
            max_error=1e-6,
            newton_iters=2,
            result="successful",
            successful=True,
        ),
        step_to=dict(compile_s=1.0, run_s=0.004, max_error=1e-11),
        pid=dict(
            reached=True,
            tolerance=1e-7,
            compile_s=1.5,
            run_s=0.001,
            max_error=5e-7,
            num_steps=40,
        ),
        step_to_over_deer=2.0,
        pid_over_deer=0.5,
    )

    def fake_run_bench(sizes, dtypes, method, repeats):
        assert (sizes, dtypes, method, repeats) == ([1000], ["float64"], "tsit5", 3)
        return dict(machine=machine, method=method, repeats=repeats, cases=[case])

    monkeypatch.setattr(_cli_bench, "run_bench", fake_run_bench)
    markdown = tmp_path / "bench.md"
    argv = ["bench", "--quick", "--float64", "--method", "tsit5"]
    status = main([*argv, "--markdown", str(markdown)])
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith("# Forward solve: DeerSolver(tsit5) vs Tsit5")
    assert "Machine: Test CPU, 2 cores" in out
    assert (
        "| float64 | 1e3 | 2.00 s | 2.0 ms | 1.0e-06 | 2 | 1.00 s | 4.0 ms | 1.0e-11 "
        "| 1e-07 | 40 | 1.50 s | 1.0 ms | 5.0e-07 | 2.00x | 0.5x |"
    ) in out
    assert markdown.read_text() == out.rstrip("\n") + "\n"
