"""Whether an optax transformation can run elementwise on shard slices (DESIGN §4, §11).

A shard applies the optimizer to its contiguous slice of the parameter vector alone. That equals
one process applying it to the whole vector only if every output element depends on the same
element of the inputs (and on scalars such as the step count). `check_elementwise` decides it
from the transformation itself: it traces ``init`` and ``update`` with `jax.make_jaxpr` on a
vector of a distinctive length (`_PROBE`) and refuses any equation over that length that is not
elementwise — reductions (global-norm clipping, lamb's and lars' trust ratios, novograd), dot
products, gathers, sorts, cumulative sums, values that depend on an element's position
(``iota``, random bits) — recursing into the jaxprs inside ``jit``, ``cond``, ``while``,
``custom_jvp``... Computations on scalars may do anything. JAX is imported only when a check
runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import optax
    from jax.extend import core as jcore

# The length `check_elementwise` traces with: prime, so no reshape of it hides as another shape.
_PROBE = 100_003

# Primitives whose every output element is computed from the same element of their inputs (and
# scalars broadcast to them). Anything else that touches a parameter-length array is refused.
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh bitcast_convert_type broadcast_in_dim
    cbrt ceil clamp convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp
    exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma log log1p logistic lt max min mul
    ne neg nextafter not optimization_barrier or pow real reduce_precision rem round rsqrt
    select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square
    stop_gradient sub tan tanh xor""".split()
)
# Primitives that run jaxprs on the operands they are given: the jaxprs are checked instead.
_CALLS = frozenset(
    "jit pjit closed_call core_call remat checkpoint custom_jvp_call custom_vjp_call "
    "custom_vjp_call_jaxpr cond while".split()
)


def check_elementwise(tx: optax.GradientTransformation, name: str = "the optimizer") -> None:
    """Raise ValueError (one sentence) unless ``tx`` can run elementwise on shard slices.

    Traces ``tx.init(params)`` and ``tx.update(grads, state, params)`` on a float32 vector and
    checks every equation that touches a vector-length array (see the module docstring); also
    that the state holds only per-element arrays and scalars of numpy dtypes, and that ``init``
    does not read the parameter values (a shard's optimizer is created before it has them).
    """
    import jax
    import jax.numpy as jnp

    probe = jax.ShapeDtypeStruct((_PROBE,), jnp.float32)
    try:
        init = jax.make_jaxpr(tx.init)(probe)
        state = jax.eval_shape(tx.init, probe)
        update = jax.make_jaxpr(tx.update)(probe, state, probe)
        updates, new_state = jax.eval_shape(tx.update, probe, state, probe)
    except Exception as e:  # noqa: BLE001 - any failure to trace is a refusal, in one sentence
        reason = " ".join(str(e).split()).rstrip(".")[:300]
        raise ValueError(
            f"{name} cannot run on a shard: tracing its init(params) and update(grads, state, "
            f"params) on a float32 vector failed ({type(e).__name__}: {reason})."
        ) from None
    for what, closed in (("init", init), ("update", update)):
        if primitive := _first_mixing(closed.jaxpr):
            raise ValueError(
                f"{name} is not elementwise: its {what} uses {primitive}, which mixes elements "
                "across the parameter vector, so each shard would compute a different result "
                "than one process; use an elementwise transformation instead (e.g. optax.clip "
                "rather than optax.clip_by_global_norm)."
            )
    params_var = init.jaxpr.invars[0]
    if any(v is params_var for e in init.jaxpr.eqns for v in e.invars) or any(
        v is params_var for v in init.jaxpr.outvars
    ):
        raise ValueError(
            f"{name} initialises its state from the parameter values, which a shard's optimizer "
            "is created without; use a transformation whose init reads only their shape."
        )
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if leaf.shape not in ((), (_PROBE,)) or not _storable(leaf.dtype):
            raise ValueError(
                f"{name} keeps state {state_name(path)!r} of shape {leaf.shape} and dtype "
                f"{leaf.dtype}; a shard keeps only per-element arrays and scalars of numpy dtypes."
            )
    if _signature(new_state) != _signature(state):
        raise ValueError(f"{name} returns a state of another structure than its init's.")
    if [leaf.shape for leaf in jax.tree_util.tree_leaves(updates)] != [(_PROBE,)]:
        raise ValueError(f"{name} returns updates of another shape than the parameters'.")


def _first_mixing(jaxpr: jcore.Jaxpr) -> str:
    """The first primitive in ``jaxpr`` (or a jaxpr inside it) that is not elementwise over a
    vector of `_PROBE` elements; "" if there is none."""
    from jax.extend import core as jcore

    if any(_PROBE in getattr(v.aval, "shape", ()) for v in jaxpr.constvars):
        return "a constant of the parameter vector's length"
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        shapes = [getattr(v.aval, "shape", ()) for v in (*eqn.invars, *eqn.outvars)]
        touches = any(_PROBE in shape for shape in shapes)
        if touches and name not in _CALLS:
            if name == "scan":
                # Carrying vectors through a loop is elementwise; slicing one along it is not.
                first_x = eqn.params["num_consts"] + eqn.params["num_carry"]
                sliced = [*eqn.invars[first_x:], *eqn.outvars[eqn.params["num_carry"] :]]
                if any(_PROBE in getattr(v.aval, "shape", ()) for v in sliced):
                    return "scan over the vector"
            elif name not in _ELEMENTWISE:
                return name
            if any(shape not in ((), (_PROBE,)) for shape in shapes):
                return f"{name} to another shape"
        for sub in jcore.jaxprs_in_params(eqn.params):
            if found := _first_mixing(sub):
                return found
    return ""


def _signature(state: Any) -> tuple[Any, ...]:
    import jax

    leaves = jax.tree_util.tree_leaves(state)
    return jax.tree_util.tree_structure(state), [(x.shape, x.dtype) for x in leaves]


def _storable(dtype: Any) -> bool:
    """A numpy dtype the store round-trips by its ``str`` (not e.g. bfloat16, DESIGN §6)."""
    return bool(np.dtype(np.dtype(dtype).str) == dtype)


def state_name(path: Sequence[Any]) -> str:
    """A state leaf's name in `Optimizer.state_arrays`: its key path, e.g. ``0.mu``."""
    import jax

    return jax.tree_util.keystr(tuple(path), simple=True, separator=".") or "state"
