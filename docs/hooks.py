"""mkdocs hooks: a stand-in for pages that other work adds later.

`docs/benchmarks.md` holds measured results, written separately from the rest of
the site. Until it exists, this hook adds an in-memory page in its place (nothing
is written to `docs/`), so that the nav entry and the links to it resolve and
`mkdocs build --strict` passes. Once the file exists, the hook does nothing.
"""

from mkdocs.structure.files import File


_PLACEHOLDERS = {
    "benchmarks.md": (
        "# Benchmarks\n\n"
        "Measured results are not in this build yet. Run `diffrax-deer bench` "
        "(or the scripts in `benchmarks/` of a source checkout) to measure on "
        "your machine.\n"
    ),
}


def on_files(files, config):
    for path, content in _PLACEHOLDERS.items():
        if files.get_file_from_path(path) is None:
            files.append(File.generated(config, path, content=content))
    return files
