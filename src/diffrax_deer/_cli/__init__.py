"""The command line behind `python -m diffrax_deer`: `demo`, `validate`, `bench`.

Never imported by `import diffrax_deer`. `options` imports nothing heavy, so that
`--help` and bad options answer without importing JAX; the sub-commands import
the package, `.._bench` and JAX only once the arguments are parsed.
"""
