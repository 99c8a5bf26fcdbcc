"""What the command line's `demo`, `validate` and `bench`, the benchmark scripts in
`benchmarks/` and the tests share: the registry of problems (`problems`), the solves
they compare (`solves`), one timing module (`timing`) and the forward benchmark
(`forward`).

Never imported by `import diffrax_deer`. May import the public package, diffrax
and JAX.
"""
