"""Loops over sequence blocks that can be unrolled when counting FLOPs.

XLA's cost analysis counts a while-loop body once. `llama4-jax plan` therefore compiles a FLOP-counting
variant with these loops unrolled (`unrolled_loops()`); training always runs them as loops.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

_UNROLL = contextvars.ContextVar("llama4_unroll_loops", default=False)


@contextlib.contextmanager
def unrolled_loops() -> Iterator[None]:
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def scan(f: Callable, init, xs):
    """jax.lax.scan, fully unrolled inside `unrolled_loops()`."""
    return jax.lax.scan(f, init, xs, unroll=True if _UNROLL.get() else 1)


def block_map(f: Callable, xs):
    """jax.lax.map over the leading axis, fully unrolled inside `unrolled_loops()`."""
    return scan(lambda carry, x: (carry, f(x)), None, xs)[1]
