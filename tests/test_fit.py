"""The PTQ fits of rabit_compiler.fit: each lowers its own objective, the H-weighted one the output error,
the coupled one is reproduced by the coupled forward from the weight; bad statistics give clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rabit_compiler import fit
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.fit import (
    Objective,
    alternating_fit,
    coupled_fit,
    dampened,
    error_feedback_fit,
    nearest_signs,
    refit_col_scales,
    refit_row_scales,
    refit_scales,
)
from rabit_compiler.math import coupled_residual_paths, fit_residual_binary, greedy_residual_svid
from rabit_compiler.quantizer import fit_weight

shapes = st.tuples(st.integers(1, 24), st.integers(2, 45))
seeds = st.integers(0, 2**31)
paths = st.integers(1, 4)
# The fits keep an update only if its fp64-summed objective is lower; the products inside are fp32, so a
# re-evaluation may differ from the fit's own in the last fp32 digits.
RTOL = 1e-5


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weight(shape, seed):
    return torch.randn(*shape, generator=generator(seed))


def anisotropic_gram(in_features: int, seed: int) -> torch.Tensor:
    """``X^T X / rows`` of correlated inputs with channel scales spread over two orders of magnitude."""
    g = generator(seed)
    mixing = torch.randn(in_features, in_features, generator=g) * 0.5 + torch.eye(in_features)
    x = torch.randn(4 * in_features + 8, in_features, generator=g) @ mixing
    x = x * torch.logspace(-1, 1, in_features)[torch.randperm(in_features, generator=g)]
    return x.T @ x / x.shape[0]


def objectives(shape, seed):
    """The three kinds of objective: Frobenius, diagonal (preconditioning), full H with row weights."""
    rows, cols = shape
    row_weight = torch.rand(rows, generator=generator(seed + 1)) + 0.1
    return [
        Objective(),
        Objective(row_weight, torch.rand(cols, generator=generator(seed + 2)) + 0.1),
        Objective(row_weight, dampened(anisotropic_gram(cols, seed + 3), 0.01)),
    ]


def start_fit(weight, num_paths):
    return fit_residual_binary(weight, num_paths, rounds=1)


def at_most(value: float, baseline: float) -> bool:
    return value <= baseline * (1 + RTOL) + 1e-9


@given(shape=shapes, seed=seeds, num_paths=paths)
def test_scale_refits_never_raise_the_objective(shape, seed, num_paths):
    weight = random_weight(shape, seed)
    start = start_fit(weight, num_paths)
    for objective in objectives(shape, seed):
        baseline = objective.error(weight, start)
        assert at_most(objective.error(weight, refit_scales(weight, start, objective)), baseline)


@given(shape=shapes, seed=seeds, num_paths=paths)
def test_row_and_column_refits_are_least_squares_optima(shape, seed, num_paths):
    """Each closed-form update is the minimum: a small perturbation of the scales it returns is never better."""
    weight = random_weight(shape, seed)
    start = start_fit(weight, num_paths)
    for objective in objectives(shape, seed):
        rows = refit_row_scales(weight, start.signs, start.col_scales, objective)
        cols = refit_col_scales(weight, start.signs, rows, objective)
        paths_with = lambda g, h: type(start)(start.signs, g, h)  # noqa: E731
        best_rows = objective.error(weight, paths_with(rows, start.col_scales))
        best_cols = objective.error(weight, paths_with(rows, cols))
        g = generator(seed + 9)
        for _ in range(3):
            nudged_rows = rows + 1e-2 * torch.randn(rows.shape, generator=g) * rows.abs().mean()
            nudged_cols = cols + 1e-2 * torch.randn(cols.shape, generator=g) * cols.abs().mean()
            assert at_most(best_rows, objective.error(weight, paths_with(nudged_rows, start.col_scales)))
            assert at_most(best_cols, objective.error(weight, paths_with(rows, nudged_cols)))


@given(shape=shapes, seed=seeds, num_paths=paths)
def test_conjugate_gradient_column_refit_never_raises_the_objective_and_nears_the_direct_solve(shape, seed,
                                                                                              num_paths):
    """Large full-H systems go to CG from the current scales (fit.DIRECT_SOLVE_MAX): forced here on small ones."""
    weight = random_weight(shape, seed)
    start = start_fit(weight, num_paths)
    objective = objectives(shape, seed)[2]
    rows = refit_row_scales(weight, start.signs, start.col_scales, objective)
    direct = refit_col_scales(weight, start.signs, rows, objective)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit, "DIRECT_SOLVE_MAX", 0)
        iterative = refit_col_scales(weight, start.signs, rows, objective, start=start.col_scales)
    paths_with = lambda h: type(start)(start.signs, rows, h)  # noqa: E731
    baseline, best = objective.error(weight, paths_with(start.col_scales)), objective.error(weight, paths_with(direct))
    reached = objective.error(weight, paths_with(iterative))
    assert at_most(reached, baseline)
    # CG in fp32 on a dampened system: within 1e-3 of the gap to the optimum, or at fp32 noise of the whole error
    whole = objective.error(weight, paths_with(torch.zeros_like(direct)))
    assert reached - best <= 1e-3 * max(baseline - best, 0.0) + 1e-6 * whole


@given(shape=shapes, seed=seeds, num_paths=paths)
def test_nearest_signs_are_the_best_of_all_combinations_per_element(shape, seed, num_paths):
    weight = random_weight(shape, seed)
    start = start_fit(weight, num_paths)
    signs = nearest_signs(weight, start.row_scales, start.col_scales)
    assert set(signs.unique().tolist()) <= {-1.0, 1.0}
    chosen = (weight - type(start)(signs, start.row_scales, start.col_scales).dequantize()).abs()
    for candidate in (start.signs, -start.signs, torch.ones_like(start.signs)):
        other = (weight - type(start)(candidate, start.row_scales, start.col_scales).dequantize()).abs()
        assert (chosen <= other + 1e-5).all()


@given(shape=shapes, seed=seeds, num_paths=paths, rounds=st.integers(0, 3))
def test_alternating_and_coupled_fits_never_raise_their_objective(shape, seed, num_paths, rounds):
    weight = random_weight(shape, seed)
    start = start_fit(weight, num_paths)
    greedy = greedy_residual_svid(weight, num_paths)
    for objective in objectives(shape, seed):
        alternating = alternating_fit(weight, start, objective, rounds)
        assert at_most(objective.error(weight, alternating), objective.error(weight, start))
        coupled = coupled_fit(weight, greedy, objective, rounds)
        assert at_most(objective.error(weight, coupled), objective.error(weight, greedy))


@given(shape=shapes, seed=seeds, num_paths=paths, rounds=st.integers(0, 3), block_size=st.integers(1, 40))
def test_error_feedback_never_raises_its_objective(shape, seed, num_paths, rounds, block_size):
    weight = random_weight(shape, seed)
    start = start_fit(weight, num_paths)
    objective = objectives(shape, seed)[2]
    fit = error_feedback_fit(weight, start, objective, rounds, block_size)
    assert at_most(objective.error(weight, fit), objective.error(weight, start))
    assert torch.isfinite(fit.row_scales).all() and torch.isfinite(fit.col_scales).all()


def test_error_feedback_beats_elementwise_signs_on_the_output_error():
    """With correlated inputs, compensating each column's error in the later columns lowers ||R X^T||^2
    well below the best elementwise fit under the same H."""
    weight = random_weight((64, 96), 0)
    objective = Objective(None, dampened(anisotropic_gram(96, 1), 0.01))
    start = start_fit(weight, 2)
    elementwise = alternating_fit(weight, start, objective, 3)
    feedback = error_feedback_fit(weight, start, objective, 3, block_size=32)
    assert objective.error(weight, feedback) < 0.8 * objective.error(weight, elementwise)


@given(shape=shapes, seed=seeds, num_paths=paths)
def test_hessian_weighted_fit_beats_the_unweighted_one_on_the_output_error(shape, seed, num_paths):
    weight = random_weight(shape, seed)
    weighted_objective = Objective(None, dampened(anisotropic_gram(shape[1], seed), 0.01))
    start = start_fit(weight, num_paths)
    unweighted = alternating_fit(weight, start, Objective(), 2)
    weighted = refit_scales(weight, unweighted, weighted_objective)
    assert at_most(weighted_objective.error(weight, weighted), weighted_objective.error(weight, unweighted))


def test_hessian_weighted_fit_is_much_better_on_the_output_error():
    """On a random anisotropic H, the H-weighted fits lower ||R X^T||^2 clearly, not only by rounding."""
    weight = random_weight((48, 80), 5)
    hessian = anisotropic_gram(80, 6)
    weighted_objective = Objective(None, dampened(hessian, 0.01))
    unweighted = alternating_fit(weight, start_fit(weight, 2), Objective(), 3)
    for config in (RaBiTConfig(fit="als", objective="hessian"), RaBiTConfig(fit="gptq", objective="hessian")):
        weighted = fit_weight(weight, config, input_gram=hessian)
        assert weighted_objective.error(weight, weighted) < 0.9 * weighted_objective.error(weight, unweighted)


@given(shape=shapes, seed=seeds, num_paths=paths, rounds=st.integers(0, 3), hessian=st.booleans())
def test_coupled_fit_is_reproduced_by_the_coupled_forward_from_the_weight(shape, seed, num_paths, rounds, hessian):
    weight = random_weight(shape, seed)
    objective = objectives(shape, seed)[2 if hessian else 1]
    fit = coupled_fit(weight, greedy_residual_svid(weight, num_paths), objective, rounds)
    for i, path in enumerate(coupled_residual_paths(weight, fit.row_scales, fit.col_scales)):
        assert torch.equal(path, fit.path(i))


@pytest.mark.parametrize("fit", ["svid", "als", "coupled", "gptq"])
@pytest.mark.parametrize("objective", ["diag", "hessian"])
def test_fit_weight_with_singular_or_missing_statistics_gives_finite_scales(fit, objective):
    """A rank-deficient H (fewer calibration rows than inputs), dead input channels and dead rows."""
    weight = random_weight((20, 37), 1)
    x = torch.randn(5, 37, generator=generator(2))
    x[:, :4] = 0
    config = RaBiTConfig(fit=fit, objective=objective, paths=3)
    input_stat, output_stat = x.abs().mean(0), torch.rand(20, generator=generator(3))
    output_stat[:3] = 0
    for gram in (x.T @ x, None):
        result = fit_weight(weight, config, input_stat, output_stat, gram)
        assert torch.isfinite(result.row_scales).all() and torch.isfinite(result.col_scales).all()
        assert torch.isfinite(result.dequantize()).all()


def test_bad_statistics_and_settings_raise_clear_errors():
    weight = random_weight((8, 12), 0)
    config = RaBiTConfig(fit="gptq", objective="hessian")
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit_weight(weight, config, input_gram=torch.full((12, 12), float("nan")))
    with pytest.raises(ValueError, match="never reached this layer"):
        fit_weight(weight, config, input_gram=torch.zeros(12, 12))
    with pytest.raises(ValueError, match="square"):
        dampened(torch.ones(12, 11), 0.01)
    with pytest.raises(ValueError, match="NaN/Inf"):
        Objective(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="full input second moment"):
        error_feedback_fit(weight, start_fit(weight, 2), Objective(), 1)
    with pytest.raises(ValueError, match="paths"):
        RaBiTConfig(paths=0)
    with pytest.raises(ValueError, match="fit"):
        RaBiTConfig(fit="magic")
    with pytest.raises(ValueError, match="damp"):
        RaBiTConfig(damp=0.0)
    with pytest.raises(ValueError, match="binary paths"):
        fit_residual_binary(weight, 0, 0)
