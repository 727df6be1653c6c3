"""Symbolic proof (sympy) of the identity the compiler relies on when it replaces the training form by the
packed inference form:

    x @ (sum_i g_i * B_i * h_i)^T  ==  sum_i g_i * ( (x * h_i) @ B_i^T )

for symbolic x ``[M, K]``, signs B_i ``[N, K]``, scales g_i ``[N]``, h_i ``[K]`` and any number of paths.
"""

from __future__ import annotations

import sympy


def inference_identity_residual(rows: int, out_features: int, in_features: int, paths: int) -> sympy.Matrix:
    """``lhs - rhs`` of the identity above, expanded; the zero matrix when it holds."""
    x = sympy.Matrix(rows, in_features, lambda m, k: sympy.Symbol(f"x_{m}_{k}"))
    weight_hat = sympy.zeros(out_features, in_features)
    rhs = sympy.zeros(rows, out_features)
    for i in range(paths):
        signs = sympy.Matrix(out_features, in_features, lambda n, k, i=i: sympy.Symbol(f"B{i}_{n}_{k}"))
        g = sympy.Matrix(out_features, 1, lambda n, _, i=i: sympy.Symbol(f"g{i}_{n}"))
        h = sympy.Matrix(in_features, 1, lambda k, _, i=i: sympy.Symbol(f"h{i}_{k}"))
        weight_hat += sympy.diag(*g) * signs * sympy.diag(*h)
        rhs += (x * sympy.diag(*h)) * signs.T * sympy.diag(*g)
    return (x * weight_hat.T - rhs).expand()


def inference_identity_holds(rows: int, out_features: int, in_features: int, paths: int) -> bool:
    """Whether the identity holds symbolically at these sizes."""
    return inference_identity_residual(rows, out_features, in_features, paths).is_zero_matrix
