"""Float32Muon: the Newton-Schulz map on singular values, and the same steps as torch.optim.Muon."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rabit_compiler.qat.muon import NS_COEFFICIENTS, Float32Muon, orthogonalize

sizes = st.integers(1, 70)


def quintic(singular_values: torch.Tensor, steps: int) -> torch.Tensor:
    """The scalar Newton-Schulz map ``x -> a x + b x^3 + c x^5`` applied ``steps`` times (float64)."""
    a, b, c = NS_COEFFICIENTS
    x = singular_values
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@given(rows=sizes, cols=sizes, steps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_orthogonalize_maps_each_singular_value_by_the_quintic(rows, cols, steps, seed):
    """``orthogonalize(U) = P f^steps(S / ||U||_F) Q^T`` for ``U = P S Q^T``: same singular vectors, and each
    singular value through the scalar iteration. fp32 matmuls over <= 70 terms, 6 rounds: 1e-4 absolute."""
    update = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    left, singular, right_t = torch.linalg.svd(update.double(), full_matrices=False)
    expected = left @ torch.diag(quintic(singular / update.double().norm(), steps)) @ right_t
    torch.testing.assert_close(orthogonalize(update, steps).double(), expected, rtol=0, atol=1e-4)


@given(rows=st.integers(2, 70), cols=st.integers(2, 70), nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_steps_match_torch_muon(rows, cols, nesterov, weight_decay, seed):
    """Three steps of Float32Muon and of torch.optim.Muon (``match_rms_adamw``) from the same weight and
    gradients move it alike: torch's bf16 orthogonalisation (8-bit mantissa, 5 rounds) differs from fp32
    by a few percent of the update, never by its size or direction."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(rows, cols, generator=generator)
    grads = [torch.randn(rows, cols, generator=generator) for _ in range(3)]
    moved = []
    for make in (lambda p: Float32Muon([p], lr=1e-2, weight_decay=weight_decay, nesterov=nesterov),
                 lambda p: torch.optim.Muon([p], lr=1e-2, weight_decay=weight_decay, nesterov=nesterov,
                                            adjust_lr_fn="match_rms_adamw")):
        param = torch.nn.Parameter(start.clone())
        optimizer = make(param)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        moved.append(param.detach() - start)
    ours, theirs = moved
    assert (ours - theirs).norm() <= 0.05 * theirs.norm()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="2-D parameters"):
        Float32Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="lr > 0"):
        Float32Muon([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.0)
    with pytest.raises(ValueError, match="2-D matrix"):
        orthogonalize(torch.zeros(2, 2, 2))
