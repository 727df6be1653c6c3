"""Running ``@triton.jit`` kernels on CPU tensors through Triton's interpreter, whatever ``TRITON_INTERPRET`` was.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled or interpreted, so a module
imported without ``TRITON_INTERPRET=1`` holds compiled-only kernels (and ``tl.sum``, ``tl.zeros``, ``tl.cdiv``,
themselves ``@triton.jit`` functions, cannot be called from an interpreted kernel). :func:`interpreted` rebuilds
a kernel as an ``InterpretedFunction`` whose module globals map every ``@triton.jit`` helper it names to the
interpreted helper, so kernels may call their own helpers. The kernels use :data:`SUM` (the builtin reduction
combiner, which the interpreter maps to numpy) instead of ``tl.sum``.
"""

from __future__ import annotations

import functools
import types

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

#: combiner for ``tl.reduce(x, axis, SUM)``: a sum that works compiled and interpreted.
SUM = tl.standard._sum_combine


@functools.cache
def interpreted(jit_fn):
    """``jit_fn`` (a ``@triton.jit`` function) as an ``InterpretedFunction`` that runs on CPU tensors; the
    ``@triton.jit`` helpers of its own module that it calls by name are interpreted too."""
    if isinstance(jit_fn, InterpretedFunction):
        return jit_fn
    python_fn = jit_fn.fn
    # only the kernel module's own helpers: Triton's (e.g. SUM) must stay the objects the interpreter knows
    helpers = {name: interpreted(value) for name in python_fn.__code__.co_names
               if isinstance(value := python_fn.__globals__.get(name), JITFunction) and value is not jit_fn
               and value.fn.__module__ == python_fn.__module__}
    if helpers:
        python_fn = types.FunctionType(python_fn.__code__, {**python_fn.__globals__, **helpers},
                                       python_fn.__name__, python_fn.__defaults__, python_fn.__closure__)
    return InterpretedFunction(python_fn)
