"""The RaBiT math core: STE, SVID, residual fits, preconditioning, re-anchoring."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rabit_compiler.math import (
    coupled_residual_paths,
    coupled_residual_weight,
    fit_residual_binary,
    greedy_residual_svid,
    hard_sign,
    iterative_residual_svid,
    leading_singular_pair,
    precondition_scales,
    reanchor_latent,
    svid,
)

shapes = st.tuples(st.integers(1, 40), st.integers(1, 70))
seeds = st.integers(0, 2**31)


def random_weight(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@given(shape=shapes, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_hard_sign_maps_zero_to_plus_one(shape, seed, dtype):
    w = random_weight(shape, seed, dtype)
    w[0, 0] = 0.0
    signs = hard_sign(w)
    assert signs.dtype == dtype and signs[0, 0] == 1
    assert torch.equal(signs, torch.where(w > 0, 1.0, torch.where(w < 0, -1.0, 1.0)).to(dtype))


@given(shape=shapes, seed=seeds)
def test_svid_scales_are_the_best_for_its_signs(shape, seed):
    target = random_weight(shape, seed)
    signs, row, col = svid(target)
    assert torch.equal(signs, hard_sign(target))
    assert (row >= 0).all() and (col >= 0).all()
    error = (target - row[:, None] * signs * col[None, :]).norm()
    # the rank-1 SVD of |T| is the optimum: no perturbation of (g, h) does better
    u, s, vh = torch.linalg.svd(target.abs().double())
    best = (target.abs().double() - s[0] * torch.outer(u[:, 0], vh[0])).norm()
    assert error.item() <= best.item() * (1 + 1e-3) + 1e-5


def test_leading_singular_pair_matches_svd():
    a = random_weight((30, 50), 3).abs()
    u, v, sigma = leading_singular_pair(a)
    s = torch.linalg.svdvals(a.double())
    assert sigma.item() == pytest.approx(s[0].item(), rel=1e-5)
    torch.testing.assert_close(torch.outer(u, v) * sigma, torch.outer(u, v) * s[0].float(), rtol=1e-5, atol=1e-6)


@given(shape=shapes, seed=seeds, paths=st.integers(1, 4))
def test_greedy_paths_each_reduce_the_residual(shape, seed, paths):
    w = random_weight(shape, seed)
    fit = greedy_residual_svid(w, paths)
    errors = [(w - sum(fit.path(j) for j in range(i + 1))).norm().item() for i in range(paths)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip([w.norm().item()] + errors, errors, strict=False))


@given(shape=shapes, seed=seeds, paths=st.integers(1, 3))
def test_iterative_svid_is_no_worse_than_greedy(shape, seed, paths):
    w = random_weight(shape, seed)
    greedy = (w - greedy_residual_svid(w, paths).dequantize()).norm()
    iterative = (w - iterative_residual_svid(w, paths, rounds=3).dequantize()).norm()
    assert iterative <= greedy * (1 + 1e-6)


@given(shape=shapes, seed=seeds)
def test_greedy_fit_is_reproduced_by_the_coupled_forward_from_w(shape, seed):
    """With W_FP = W, the coupled derivation recomputes the greedy signs: path i fits R_{i-1} by design."""
    w = random_weight(shape, seed)
    fit = greedy_residual_svid(w, 2)
    paths = coupled_residual_paths(w, fit.row_scales, fit.col_scales)
    for i, path in enumerate(paths):
        torch.testing.assert_close(path, fit.path(i), rtol=0, atol=0)


@given(shape=shapes, seed=seeds, rounds=st.integers(0, 4), precondition=st.booleans())
def test_reanchored_latent_reproduces_the_init_exactly_for_two_paths(shape, seed, rounds, precondition):
    w = random_weight(shape, seed)
    importance_in = random_weight((1, shape[1]), seed + 1).abs()[0] + 0.1 if precondition else None
    fit = fit_residual_binary(w, 2, rounds, input_importance=importance_in)
    latent, infeasible = reanchor_latent(fit)
    assert infeasible == 0
    coupled = coupled_residual_paths(latent, fit.row_scales, fit.col_scales)
    for i, path in enumerate(coupled):
        assert torch.equal(path, fit.path(i)), f"path {i} differs at step 0"
    assert torch.equal(hard_sign(latent), fit.signs[0])


@given(shape=shapes, seed=seeds)
def test_reanchor_with_three_paths_reports_every_mismatched_element(shape, seed):
    w = random_weight(shape, seed)
    fit = iterative_residual_svid(w, 3, rounds=2)
    latent, infeasible = reanchor_latent(fit)
    coupled = coupled_residual_paths(latent, fit.row_scales, fit.col_scales)
    mismatched = torch.zeros(shape, dtype=torch.bool)
    for i, path in enumerate(coupled):
        mismatched |= path != fit.path(i)
    assert int(mismatched.sum()) <= infeasible


@given(shape=shapes, seed=seeds, paths=st.integers(1, 3))
def test_ste_gradients(shape, seed, paths):
    """dL/dW_FP == dL/dW_hat exactly; g_i, h_i get the gradient of g_i * B_i * h_i with B_i constant."""
    w = random_weight(shape, seed)
    fit = greedy_residual_svid(w, paths)
    latent = w.clone().requires_grad_(True)
    rows = fit.row_scales.clone().requires_grad_(True)
    cols = fit.col_scales.clone().requires_grad_(True)
    x = random_weight((3, shape[1]), seed + 7)
    target = random_weight((3, shape[0]), seed + 8)
    w_hat = coupled_residual_weight(latent, rows, cols)
    w_hat.retain_grad()
    torch.nn.functional.mse_loss(x @ w_hat.T, target).backward()
    assert torch.equal(latent.grad, w_hat.grad)
    for i in range(paths):
        torch.testing.assert_close(rows.grad[i], (w_hat.grad * fit.signs[i] * fit.col_scales[i]).sum(1))
        torch.testing.assert_close(cols.grad[i], (w_hat.grad * fit.signs[i] * fit.row_scales[i][:, None]).sum(0))


@given(shape=shapes, seed=seeds, paths=st.integers(1, 3))
def test_coupled_forward_value_is_exactly_the_sum_of_paths(shape, seed, paths):
    w = random_weight(shape, seed)
    fit = greedy_residual_svid(w, paths)
    w_hat = coupled_residual_weight(w.clone().requires_grad_(True), fit.row_scales, fit.col_scales)
    expected = fit.path(0)
    for i in range(1, paths):
        expected = expected + fit.path(i)
    assert torch.equal(w_hat.detach(), expected)


def test_precondition_scales_are_normalised_and_floored():
    a_in, a_out = precondition_scales(torch.tensor([0.0, 1.0, 4.0]), None, alpha_in=0.5, alpha_out=0.5)
    assert a_out is None
    assert a_in.mean().item() == pytest.approx(1.0)
    assert (a_in > 0).all()


def test_preconditioning_reduces_the_weighted_error():
    w = random_weight((48, 64), 0)
    importance = torch.linspace(0.05, 3.0, 64)
    plain = fit_residual_binary(w, 2, 2)
    weighted = fit_residual_binary(w, 2, 2, input_importance=importance)
    def weighted_error(fit):
        return ((w - fit.dequantize()) * importance).norm()
    assert weighted_error(weighted) < weighted_error(plain)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 5)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit_residual_binary(w, 2, 1)


def test_bad_shapes_and_paths_are_refused():
    with pytest.raises(ValueError, match="empty"):
        fit_residual_binary(torch.zeros(0, 5), 2, 1)
    with pytest.raises(ValueError, match="2-D"):
        fit_residual_binary(torch.zeros(5), 2, 1)
    with pytest.raises(ValueError, match=">= 1"):
        fit_residual_binary(torch.ones(3, 3), 0, 1)
