"""Example problems shared by the demo, the benchmarks and the tests."""

import equinox as eqx
import jax
import jax.numpy as jnp


class MLPVectorField(eqx.Module):
    """A NeuralODE-style vector field $f(t, y) = \\mathrm{MLP}(y)$.

    **Arguments:**

    - `state_size`: the dimension of $y$.
    - `width`, `depth`: the MLP's hidden width and number of hidden layers.
    - `key`: a JAX PRNG key for the weights.
    - `dtype`: the weights' dtype.
    """

    mlp: eqx.nn.MLP

    def __init__(
        self,
        state_size: int = 2,
        width: int = 64,
        depth: int = 2,
        *,
        key: jax.Array,
        dtype=jnp.float64,
    ):
        self.mlp = eqx.nn.MLP(
            state_size,
            state_size,
            width,
            depth,
            activation=jax.nn.softplus,
            key=key,
            dtype=dtype,
        )

    def __call__(self, t, y, args):
        del t, args
        return self.mlp(y)
