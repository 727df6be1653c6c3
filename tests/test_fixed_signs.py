"""fixed_signs_linear (the linear of scale tuning) against autograd through the plain formula, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rabit_compiler.math import ResidualBinaryPaths
from rabit_compiler.qat.fixed_signs import fixed_signs_linear


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), n=st.integers(1, 45), in_features=st.integers(1, 70), rows=st.integers(1, 4),
       batched=st.booleans(), seed=st.integers(0, 2**16))
def test_values_and_gradients_match_autograd_of_the_formula(k, n, in_features, rows, batched, seed):
    generator = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (k, n, in_features), generator=generator) * 2 - 1).to(torch.int8)
    row_scales = torch.rand(k, n, generator=generator, dtype=torch.float64) + 0.1
    col_scales = torch.rand(k, in_features, generator=generator, dtype=torch.float64) + 0.1
    x = torch.randn((2, rows, in_features) if batched else (rows, in_features), generator=generator,
                    dtype=torch.float64)
    grad_out = torch.randn(*x.shape[:-1], n, generator=generator, dtype=torch.float64)

    def run(linear):
        leaves = [t.clone().requires_grad_() for t in (x, row_scales, col_scales)]
        y = linear(leaves[0], leaves[1], leaves[2])
        y.backward(grad_out)
        return y.detach(), [t.grad for t in leaves]

    y, grads = run(lambda x, g, h: fixed_signs_linear(x, signs, g, h))
    y_ref, grads_ref = run(lambda x, g, h: x @ ResidualBinaryPaths(signs.double(), g, h).dequantize().T)
    # float64 throughout; the two differ only in summation order
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-10)


def test_only_x_is_saved_beyond_the_inputs():
    """The backward keeps x and the inputs, never a [N, K] weight: the point of the function."""
    signs = torch.ones(2, 64, 48, dtype=torch.int8)
    row_scales, col_scales = torch.ones(2, 64, requires_grad=True), torch.ones(2, 48, requires_grad=True)
    x = torch.randn(3, 48)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fixed_signs_linear(x, signs, row_scales, col_scales)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(3, 48), (2, 64, 48), (2, 64), (2, 48)])
    assert all(t.data_ptr() in {x.data_ptr(), signs.data_ptr(), row_scales.data_ptr(), col_scales.data_ptr()}
               for t in saved)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"signs \[k, N, K\]"):
        fixed_signs_linear(torch.randn(2, 8), torch.ones(2, 4, 8), torch.ones(2, 4), torch.ones(2, 7))
