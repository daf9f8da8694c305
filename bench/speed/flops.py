"""Model FLOPs counted from the jaxpr: 2 x the multiply-adds of every convolution and matmul."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.extend import core as jcore


def _conv_flops(eqn: jcore.JaxprEqn) -> float:
    rhs = eqn.invars[1].aval
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return 2.0 * eqn.outvars[0].aval.size * window * rhs.shape[rhs_spec[1]]


def _dot_flops(eqn: jcore.JaxprEqn) -> float:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    return 2.0 * eqn.outvars[0].aval.size * math.prod(lhs.shape[d] for d in contract)


def _subjaxprs(value) -> list[jcore.Jaxpr]:
    items = value if isinstance(value, (list, tuple)) else (value,)
    return [s.jaxpr if isinstance(s, jcore.ClosedJaxpr) else s for s in items
            if isinstance(s, (jcore.ClosedJaxpr, jcore.Jaxpr))]


def count_jaxpr(jaxpr: jcore.Jaxpr) -> float:
    """FLOPs of one execution of ``jaxpr``, nested calls included.

    Of a ``cond`` only one branch runs: the costliest counts (``lax.platform_dependent``, which
    flaxres uses for its CPU paths, traces one branch per platform). A ``scan`` body counts
    ``length`` times.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":
            total += max(count_jaxpr(b) for b in _subjaxprs(eqn.params["branches"]))
        else:
            times = eqn.params.get("length", 1) if name == "scan" else 1
            for value in eqn.params.values():
                total += times * sum(count_jaxpr(j) for j in _subjaxprs(value))
    return total


def flops_per_image(fn: Callable, *args) -> float:
    """FLOPs of ``fn(*args)`` divided by the batch (the leading axis of the last argument)."""
    return count_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr) / args[-1].shape[0]
