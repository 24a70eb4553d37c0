"""The smallest task: linear regression in plain JAX.

    tether launch --task examples/linear_regression.py:task --optimizer sgd --lr 0.1

Each worker draws its own batches from a fixed random "true" line, so the run learns w_true and
b_true; the loss falls to the noise floor (0.01).
"""

import jax.numpy as jnp
import numpy as np

import tether

DIM = 8
W_TRUE = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)
B_TRUE = np.float32(0.5)


class LinearRegression(tether.Task):
    def init(self, key):
        return {"w": jnp.zeros(DIM), "b": jnp.zeros(())}

    def loss(self, params, batch):
        x, y = batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    def batch(self, ctx, clock):
        # A pure function of (seed, worker, clock): BSP is reproducible, restarts are exact.
        rng = np.random.default_rng([ctx.seed, ctx.worker_id, clock])
        x = rng.standard_normal((ctx.batch_size, DIM), dtype=np.float32)
        noise = rng.standard_normal(ctx.batch_size, dtype=np.float32) * np.float32(0.1)
        return x, x @ W_TRUE + B_TRUE + noise

    def evaluate(self, params, ctx):
        error = np.concatenate([np.asarray(params["w"]) - W_TRUE, [float(params["b"]) - B_TRUE]])
        return {"loss": float(np.mean(error**2) + 0.01), "weight_error": float(np.abs(error).max())}


task = LinearRegression()
