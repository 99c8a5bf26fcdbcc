"""The command line: `python -m diffrax_deer` / `diffrax-deer` and its sub-commands.

Runs the CLI in-process through `main([...])` on small grids; one test starts a real
subprocess to check what a user sees on a bad option.
"""

import json
import subprocess
import sys

import pytest

from diffrax_deer import DeerSolver
from diffrax_deer.__main__ import main
from diffrax_deer._cli.options import METHODS, make_method


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
    assert deer["max_error"] <= results["expected_bound"]
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


def test_validate_quick(capsys):
    from diffrax_deer._cli.validate import format_table

    status = main(["validate", "--quick", "--json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert status == 0, captured.out
    assert results["passed"] is True
    assert {row["problem"] for row in results["rows"]} == {"linear", "lotka-volterra"}
    assert all(row["passed"] and row["converged"] for row in results["rows"])
    # Progress went to stderr, one line per case; the table renders the rows.
    assert len(captured.err.strip().splitlines()) >= len(results["rows"])
    table = format_table(results["rows"])
    assert f"PASSED: all {len(results['rows'])} within tolerance." in table


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
