"""A character-level Transformer language model in plain JAX, trained on Python's own source.

    tether launch --task examples/char_transformer.py:task --mode ssp --staleness 2 \\
        --steps 400 --batch-size 16 --optimizer adam --lr 3e-3

The corpus is a few modules of the Python standard library (`MODULES`, read as bytes from the
folder of `os.py`), so every machine has it without a download; it depends on the Python
version, so the members of one run must share one. Each module's last 10% is held out. A
decoder-only Transformer (2 layers, d_model 64, 4 heads, context 64, byte vocabulary of 256)
starts at ln 256 = 5.55 nats per character; `evaluate` reports the held-out loss.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import tether

MODULES = ("argparse.py", "dataclasses.py", "functools.py", "textwrap.py")  # 3.11 to 3.13
HELD_OUT = 0.1
VOCAB, CONTEXT, D_MODEL, HEADS, LAYERS = 256, 64, 64, 4, 2


@functools.cache
def corpus() -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) bytes as uint8: each module's first 90% and its last 10%."""
    lib = Path(os.__file__).parent
    train, held_out = [], []
    for name in MODULES:
        if not (lib / name).is_file():
            raise ValueError(f"the corpus needs {name} from the standard library in {lib}.")
        text = np.frombuffer((lib / name).read_bytes(), dtype=np.uint8)
        cut = int(len(text) * (1 - HELD_OUT))
        train.append(text[:cut])
        held_out.append(text[cut:])
    return np.concatenate(train), np.concatenate(held_out)


def layer_norm(p, x):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def block(p, x):
    b, t, d = x.shape
    q, k, v = jnp.split(layer_norm(p["ln1"], x) @ p["qkv"], 3, axis=-1)
    q, k, v = (a.reshape(b, t, HEADS, d // HEADS) for a in (q, k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // HEADS)
    causal = jnp.tril(jnp.ones((t, t), bool))  # position t sees positions <= t only
    att = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    x = x + jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d) @ p["proj"]
    h = jax.nn.gelu(layer_norm(p["ln2"], x) @ p["w1"] + p["b1"])
    return x + h @ p["w2"] + p["b2"]


def cross_entropy(params, windows):
    """Mean next-byte loss (nats) over windows of CONTEXT + 1 bytes."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    # one_hot products instead of gathers (embedding lookup, label pick): their gradients would
    # be scatter-adds, which are not deterministic on every backend (DESIGN §11).
    x = jax.nn.one_hot(inputs, VOCAB) @ params["embed"] + params["pos"]
    for p in params["blocks"]:
        x = block(p, x)
    logp = jax.nn.log_softmax(layer_norm(params["ln_f"], x) @ params["unembed"])
    return -jnp.mean(jnp.sum(jax.nn.one_hot(targets, VOCAB) * logp, -1))


_held_out_loss = jax.jit(cross_entropy)


class CharTransformer(tether.Task):
    def init(self, key):
        keys = iter(jax.random.split(key, 3 + 4 * LAYERS))

        def dense(n_in, n_out, scale=1.0):
            return jax.random.normal(next(keys), (n_in, n_out)) * (scale / math.sqrt(n_in))

        def norm():
            return {"scale": jnp.ones(D_MODEL), "bias": jnp.zeros(D_MODEL)}

        blocks = [
            {
                "ln1": norm(),
                "qkv": dense(D_MODEL, 3 * D_MODEL),
                "proj": dense(D_MODEL, D_MODEL, 1 / math.sqrt(2 * LAYERS)),
                "ln2": norm(),
                "w1": dense(D_MODEL, 4 * D_MODEL),
                "b1": jnp.zeros(4 * D_MODEL),
                "w2": dense(4 * D_MODEL, D_MODEL, 1 / math.sqrt(2 * LAYERS)),
                "b2": jnp.zeros(D_MODEL),
            }
            for _ in range(LAYERS)
        ]
        return {
            "embed": jax.random.normal(next(keys), (VOCAB, D_MODEL)) * 0.02,
            "pos": jax.random.normal(next(keys), (CONTEXT, D_MODEL)) * 0.02,
            "blocks": blocks,
            "ln_f": norm(),
            # Small output weights: near-uniform predictions, so the loss starts at ln VOCAB.
            "unembed": dense(D_MODEL, VOCAB, 0.02),
        }

    def loss(self, params, batch):
        return cross_entropy(params, batch)

    def batch(self, ctx, clock):
        # Random windows of this worker's own contiguous part of the training text, drawn from
        # (seed, worker, clock): a pure function of (ctx, clock), as DESIGN §11 requires.
        train, _ = corpus()
        part = np.array_split(train, ctx.num_workers)[ctx.worker_id]
        if len(part) <= CONTEXT + 1:
            raise ValueError(f"{ctx.num_workers} workers leave too little text for each one.")
        rng = np.random.default_rng([ctx.seed, ctx.worker_id, clock])
        starts = rng.integers(0, len(part) - CONTEXT, size=ctx.batch_size)
        return part[starts[:, None] + np.arange(CONTEXT + 1)].astype(np.int32)

    def evaluate(self, params, ctx):
        # Every non-overlapping window of the held-out text, each CONTEXT predictions.
        _, held_out = corpus()
        n = (len(held_out) - 1) // CONTEXT
        windows = held_out[np.arange(n)[:, None] * CONTEXT + np.arange(CONTEXT + 1)]
        loss = float(_held_out_loss(params, windows.astype(np.int32)))
        return {"loss": loss, "bits_per_char": loss / math.log(2)}


task = CharTransformer()
