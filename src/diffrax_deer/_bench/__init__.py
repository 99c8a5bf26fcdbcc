"""Problems and timing shared by the command line's `bench` and `validate`, the
benchmark scripts in `benchmarks/` and the tests.

Never imported by `import diffrax_deer`. May import the public package, diffrax
and JAX.
"""
