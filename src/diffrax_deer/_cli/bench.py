"""`diffrax-deer bench`: the forward-solve benchmark, shipped with the package.

The measurement is `diffrax_deer._bench.forward`, the same code as
`benchmarks/forward.py` in a source checkout (which is not installed with the
package); this module only maps the command line's options onto it.
"""

from .._bench.forward import run_forward, to_markdown
from .._bench.timing import progress, to_json, write_text
from .options import make_method


def main(options, command: str) -> int:
    """Runs `bench` from parsed command-line options; returns the exit status."""
    sizes, repeats = options.sizes, options.repeats
    if options.quick:
        sizes, repeats = [1000], min(repeats, 3)
    results = run_bench(sizes, options.dtypes, options.method, repeats)
    markdown = to_markdown(results, command)
    if options.markdown:
        write_text(options.markdown, markdown)
    print(to_json(results) if options.json else markdown)
    return 0


def run_bench(sizes, dtypes, method: str, repeats: int):
    """`run_forward` for a command-line method name."""
    return run_forward(sizes, dtypes, make_method(method), method, repeats, progress)
