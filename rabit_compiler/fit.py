"""Fits of k residual binary paths to one weight under a weighted output error: the PTQ initialisation.

A fit is ``W_hat = sum_i g_i * B_i * h_i`` (:class:`~rabit_compiler.math.ResidualBinaryPaths`: signs
``[k, N, K]``, row scales ``[k, N]``, column scales ``[k, K]``). Every fit here lowers one objective::

    L(W_hat) = sum_n d_n (W - W_hat)_n H (W - W_hat)_n^T = tr(D R H R^T),    R = W - W_hat  [N, K]

with row weights ``d [N]`` (output-channel importance; None: all 1) and an input weighting ``H``: None (the
identity: the Frobenius error), a vector ``[K]`` (a diagonal ``H``: the I/O preconditioning of
:func:`~rabit_compiler.math.fit_residual_binary`, squared) or ``X^T X [K, K]`` of the layer's calibration
inputs plus a dampening ``lambda * mean(diag) * I`` (then ``L`` is the layer's output error
``||R X^T||^2`` weighted per output row).

- :func:`refit_scales`: signs fixed, the closed-form least squares of every path's row scales (one ``k x k``
  system per row) alternated with that of every column scale (one ``kK x kK`` system, or ``k x k`` per
  column when ``H`` is diagonal).
- :func:`nearest_signs`: scales fixed, per element the best of the ``2^k`` sign combinations: the exact
  sign step when ``H`` is diagonal (the objective is then a sum over elements).
- :func:`alternating_fit`: the two steps alternated (ARB-style).
- :func:`coupled_fit`: the signs of the coupled derivation ``B_i = sign(W - sum_{j<i} W_hat_j)``, only the
  scales fitted, so a latent equal to ``W`` reproduces the fit exactly.
- :func:`error_feedback_fit`: GPTQ/OBQ-style: columns binarised in order, each column's error propagated into
  the columns not yet binarised through the Cholesky factor of ``H^-1``; then the scales refitted.

Each fit keeps the best fit it has seen, so it never ends above the objective of the fit it starts from.
Large products run in fp32; the small solves and the objective's sums in fp64.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from rabit_compiler.math import ResidualBinaryPaths, coupled_residual_signs

logger = logging.getLogger("rabit_compiler")


@dataclass
class Objective:
    """``L = sum_n d_n R_n H R_n^T`` (module docstring): ``row_weight`` d ``[N]`` or None,
    ``input_weight`` H: None, ``[K]`` (diagonal) or ``[K, K]`` (symmetric positive definite)."""

    row_weight: torch.Tensor | None = None
    input_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("row_weight", "input_weight"):
            value = getattr(self, name)
            if value is not None:
                if not torch.isfinite(value).all():
                    raise ValueError(f"Objective.{name} has NaN/Inf values")
                setattr(self, name, value.float())
        self._weight_product: tuple[torch.Tensor, int, torch.Tensor] | None = None

    @property
    def separable(self) -> bool:
        """Whether ``L`` is a weighted sum over elements (``H`` identity or diagonal)."""
        return self.input_weight is None or self.input_weight.dim() == 1

    def times_input(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix @ H`` for ``matrix [..., K]`` (fp32)."""
        matrix = matrix.float()
        if self.input_weight is None:
            return matrix
        if self.input_weight.dim() == 1:
            return matrix * self.input_weight
        return matrix @ self.input_weight

    def weight_times_input(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight @ H`` for the weight being fitted, computed once per weight (every column-scale refit needs
        it; a full ``H`` makes it an ``N x K x K`` product)."""
        cached = self._weight_product
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            cached = self._weight_product = (weight, weight._version, self.times_input(weight))
        return cached[2]

    def error(self, weight: torch.Tensor, fit: ResidualBinaryPaths) -> float:
        """``L(fit.dequantize())`` for ``weight [N, K]``."""
        residual = weight.float() - fit.dequantize().float()
        per_row = (residual.double() * self.times_input(residual).double()).sum(dim=1)
        if self.row_weight is not None:
            per_row = per_row * self.row_weight.double()
        return float(per_row.sum())


def dampened(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` for ``hessian [K, K]`` (fp32), as GPTQ does; a clear error for NaN/Inf
    or an all-zero ``H`` (no calibration signal)."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"expected a square input second moment [K, K], got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("the input second moment X^T X has NaN/Inf values (bad calibration activations)")
    if damp <= 0:
        raise ValueError(f"the dampening must be positive, got {damp}")
    hessian = hessian.float()
    scale = hessian.diagonal().mean()
    if not scale > 0:
        raise ValueError("the input second moment X^T X is zero: the calibration never reached this layer")
    return hessian + damp * scale * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)


def _solve_psd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix x = rhs`` for symmetric positive semi-definite ``matrix [..., m, m]``, ``rhs [..., m]``
    (fp64). A singular system (a zero scale, two identical paths) gets a ridge ``1e-10 * mean(diag)``,
    raised 100x until Cholesky succeeds: the minimum-norm-like solution of an underdetermined fit. The ridge is
    added to ``matrix``'s diagonal in place (callers pass a temporary): a full-``H`` system is ``kK x kK``, up to
    512 MB in fp64 (:data:`DIRECT_SOLVE_MAX`), so no second copy of it is made."""
    matrix, rhs = matrix.double(), rhs.double()
    diagonal = matrix.diagonal(dim1=-2, dim2=-1)
    scale = diagonal.mean(-1).clamp_min(1e-300)[..., None]
    ridge = 0.0
    for _ in range(16):
        factor, info = torch.linalg.cholesky_ex(matrix)
        if not bool((info != 0).any()):
            return torch.cholesky_solve(rhs[..., None], factor)[..., 0]
        del factor
        raised = 1e-10 if ridge == 0 else ridge * 100
        diagonal.add_((raised - ridge) * scale)
        ridge = raised
    raise ValueError("least-squares system is not positive semi-definite (NaN/Inf in the statistics?)")


def refit_row_scales(weight: torch.Tensor, signs: torch.Tensor, col_scales: torch.Tensor,
                     objective: Objective) -> torch.Tensor:
    """The best row scales ``g [k, N]`` for fixed signs and column scales: per row n, with
    ``M_i = B_i[n] * h_i``, ``(M H M^T) g_n = M H W_n^T`` (``k x k``; ``d_n`` does not change row n's optimum)."""
    basis = signs.float() * col_scales.float()[:, None, :]  # M: [k, N, K]
    weighted = objective.times_input(basis)
    gram = torch.einsum("ink,jnk->nij", basis.double(), weighted.double())
    rhs = torch.einsum("ink,nk->ni", weighted.double(), weight.double())
    return _solve_psd(gram, rhs).T.float()


DIRECT_SOLVE_MAX = 8192
"""Full-``H`` column-scale systems of at most this size ``kK`` are solved by Cholesky (O((kK)^3)); larger ones (a
down_proj with K = 8960: 17920 at k = 2, ~2e12 flops) by conjugate gradients from the current scales."""


def _conjugate_gradient(matrix: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor, iterations: int = 200,
                        tolerance: float = 1e-6) -> torch.Tensor:
    """Jacobi-preconditioned CG for ``matrix x = rhs`` (symmetric positive semi-definite ``[m, m]``) from ``start``.
    Every iterate lowers ``x^T A x / 2 - b^T x``, the quadratic the scales minimise, so stopping early (after
    ``iterations``, or at a residual ``tolerance * |rhs|``) never undoes the refit's progress."""
    inverse_diagonal = 1 / matrix.diagonal().clamp_min(torch.finfo(matrix.dtype).tiny)
    x = start.clone()
    residual = rhs - matrix @ x
    direction = inverse_diagonal * residual
    residual_dot = residual @ direction
    stop = tolerance * rhs.norm()
    for _ in range(iterations):
        if not residual.norm() > stop:
            break
        product = matrix @ direction
        curvature = direction @ product
        if not curvature > 0:
            break
        step = residual_dot / curvature
        x.add_(step * direction)
        residual.sub_(step * product)
        preconditioned = inverse_diagonal * residual
        next_dot = residual @ preconditioned
        direction = preconditioned + (next_dot / residual_dot) * direction
        residual_dot = next_dot
    return x


def refit_col_scales(weight: torch.Tensor, signs: torch.Tensor, row_scales: torch.Tensor,
                     objective: Objective, start: torch.Tensor | None = None) -> torch.Tensor:
    """The best column scales ``h [k, K]`` for fixed signs and row scales. With ``S_i = g_i * B_i [N, K]``::

        sum_i [H o (S_j^T D S_i)] h_i = colsum(S_j o (D W H))      for j = 1..k     (o: elementwise)

    one ``kK x kK`` system for a full ``H`` (above :data:`DIRECT_SOLVE_MAX`, approached by conjugate gradients
    from ``start``, the current ``h``); ``k x k`` per column when ``H`` is diagonal.
    """
    num_paths, rows, in_features = signs.shape
    scaled = signs.float() * row_scales.float()[:, :, None]  # S: [k, N, K]
    weighted = scaled if objective.row_weight is None else scaled * objective.row_weight[None, :, None]  # D S
    rhs = (weighted * objective.weight_times_input(weight)[None]).double().sum(dim=1)  # [k, K]
    if objective.separable:
        gram = torch.einsum("jnc,inc->cji", weighted.double(), scaled.double())  # [K, k, k]
        if objective.input_weight is not None:
            gram = gram * objective.input_weight.double()[:, None, None]
        return _solve_psd(gram, rhs.T).T.float()
    direct = num_paths * in_features <= DIRECT_SOLVE_MAX
    dtype = torch.float64 if direct else torch.float32
    # the kK x kK system, built block by block (one copy of it in memory). Every block is computed, none mirrored from
    # its transpose: the GPTQ sign decisions amplify such rounding differences (RESULTS.md, "SmolLM2 peer table again")
    hessian = objective.input_weight.to(dtype)
    gram = torch.empty(num_paths * in_features, num_paths * in_features, dtype=dtype, device=signs.device)
    for j in range(num_paths):
        for i in range(num_paths):
            block = gram[j * in_features:(j + 1) * in_features, i * in_features:(i + 1) * in_features]
            torch.mul((weighted[j].T @ scaled[i]).to(dtype), hessian, out=block)
    del hessian
    if direct:
        return _solve_psd(gram, rhs.reshape(-1)).reshape(num_paths, in_features).float()
    initial = torch.zeros_like(rhs, dtype=dtype) if start is None else start.to(dtype)
    return _conjugate_gradient(gram, rhs.to(dtype).reshape(-1), initial.reshape(-1)).reshape(num_paths,
                                                                                              in_features).float()


def refit_scales(weight: torch.Tensor, fit: ResidualBinaryPaths, objective: Objective,
                 sweeps: int = 2) -> ResidualBinaryPaths:
    """Up to ``sweeps`` alternations of :func:`refit_row_scales` and :func:`refit_col_scales` with ``fit``'s
    signs; a sweep is kept only if it lowers the objective (each update is an exact minimiser, so only rounding
    could raise it; then the sweeps stop)."""
    return _refit_scales(weight, fit, objective, sweeps)[0]


def _refit_scales(weight: torch.Tensor, fit: ResidualBinaryPaths, objective: Objective,
                  sweeps: int = 2) -> tuple[ResidualBinaryPaths, float]:
    """:func:`refit_scales` and the objective of its result."""
    best, best_error = fit, objective.error(weight, fit)
    for _ in range(sweeps):
        rows = refit_row_scales(weight, best.signs, best.col_scales, objective)
        cols = refit_col_scales(weight, best.signs, rows, objective, start=best.col_scales)
        candidate = ResidualBinaryPaths(best.signs, rows, cols)
        error = objective.error(weight, candidate)
        if not error < best_error:
            break
        best, best_error = candidate, error
    return best, best_error


def sign_combinations(num_paths: int) -> torch.Tensor:
    """All ``2^k`` sign vectors ``[2^k, k]`` (fp32, +-1); in row m, path i is -1 where bit ``k-1-i`` of m is set."""
    return torch.tensor(list(itertools.product((1.0, -1.0), repeat=num_paths)))


def nearest_signs(target: torch.Tensor, row_scales: torch.Tensor, col_scales: torch.Tensor) -> torch.Tensor:
    """Per element of ``target [N, K]``, the signs ``b [k]`` minimising ``(T - sum_i g_i b_i h_i)^2``, from all
    ``2^k`` combinations -> signs ``[k, N, K]``. Ties keep the earlier combination (``+1`` first)."""
    target = target.float()
    best_signs = best_distance = None
    for combination in sign_combinations(row_scales.shape[0]):
        level = torch.einsum("i,in,ik->nk", combination, row_scales.float(), col_scales.float())
        distance = (target - level).square()
        if best_distance is None:
            best_distance = distance
            best_signs = combination[:, None, None].expand(-1, *target.shape).clone()
        else:
            closer = distance < best_distance
            best_distance = torch.where(closer, distance, best_distance)
            best_signs = torch.where(closer[None], combination[:, None, None], best_signs)
    return best_signs


def alternating_fit(weight: torch.Tensor, start: ResidualBinaryPaths, objective: Objective,
                    rounds: int) -> ResidualBinaryPaths:
    """ARB-style alternation from ``start``: refit all scales (signs fixed), then reassign every sign to the
    nearest of the ``2^k`` levels, ``rounds`` times. The sign step is exact for a diagonal ``H``; for a full
    ``H`` it is the elementwise approximation (use :func:`error_feedback_fit` there)."""
    weight = weight.float()
    best, best_error = start, objective.error(weight, start)
    fit = start
    for _ in range(rounds):
        fit = refit_scales(weight, fit, objective)
        fit = ResidualBinaryPaths(nearest_signs(weight, fit.row_scales, fit.col_scales), fit.row_scales,
                                  fit.col_scales)
        error = objective.error(weight, fit)
        if error < best_error:
            best, best_error = fit, error
    return refit_scales(weight, best, objective)


def coupled_fit(weight: torch.Tensor, start: ResidualBinaryPaths, objective: Objective,
                rounds: int) -> ResidualBinaryPaths:
    """Scales fitted under the coupled sign rule ``B_1 = sign(W)``, ``B_i = sign(W - sum_{j<i} W_hat_j)``,
    from ``start``'s scales: alternate the signs the rule derives from ``W`` (in fp32, as the coupled forward
    of :class:`~rabit_compiler.qat.ResidualBinaryTrainLinear` does) with a refit of the scales, ``rounds``
    times. The result's signs are always the rule's for its scales, so a latent equal to ``weight``
    reproduces it exactly; a greedy residual SVID ``start`` already obeys the rule."""
    weight = weight.float()

    def consistent(row_scales: torch.Tensor, col_scales: torch.Tensor) -> ResidualBinaryPaths:
        signs = torch.stack(coupled_residual_signs(weight, row_scales, col_scales))
        return ResidualBinaryPaths(signs, row_scales, col_scales)

    best = consistent(start.row_scales.float(), start.col_scales.float())
    best_error = objective.error(weight, best)
    fit = best
    for _ in range(rounds):
        refit = refit_scales(weight, fit, objective)
        fit = consistent(refit.row_scales, refit.col_scales)
        error = objective.error(weight, fit)
        if error < best_error:
            best, best_error = fit, error
    return best


def inverse_hessian_factor(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), ``[K, K]`` fp32, for a dampened ``H``."""
    factor, info = torch.linalg.cholesky_ex(hessian.double())
    if info != 0:
        raise ValueError("the dampened input second moment is not positive definite; raise the dampening")
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True).float()


def propagate_signs(weight: torch.Tensor, row_scales: torch.Tensor, col_scales: torch.Tensor,
                    inverse_factor: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """GPTQ's column loop with the residual-binary quantizer: column c of the error-compensated weight takes
    the nearest of its ``2^k`` levels ``sum_i b_i g_i h_i[c]`` per row, and its error divided by ``U[c, c]``
    is propagated into the later columns along ``U[c, c+1:]`` (lazily, ``block_size`` columns at a time).
    ``weight [N, K]``, scales ``[k, N]`` / ``[k, K]``, ``inverse_factor`` U ``[K, K]`` -> signs ``[k, N, K]``."""
    work = weight.float().T.contiguous()  # [K, N]: a column of the weight is a contiguous row here
    num_paths, (in_features, rows) = row_scales.shape[0], work.shape
    combinations = sign_combinations(num_paths).to(work.device)
    choice = torch.empty(in_features, rows, dtype=torch.long, device=work.device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = work[start:end]
        errors = torch.empty_like(block)
        factor = inverse_factor[start:end, start:end]
        levels = torch.einsum("mi,in,ik->kmn", combinations, row_scales.float(), col_scales[:, start:end].float())
        for j in range(end - start):
            column = block[j]
            nearest = (levels[j] - column).abs_().min(dim=0).indices  # min(dim=0) is ~10x faster than argmin here
            choice[start + j] = nearest
            error = (column - levels[j].gather(0, nearest[None])[0]).div_(factor[j, j])
            block[j + 1:].addr_(factor[j, j + 1:], error, alpha=-1)
            errors[j] = error
        work[end:].addmm_(inverse_factor[start:end, end:].T, errors, alpha=-1)
    bits = torch.arange(num_paths - 1, -1, -1, device=work.device)  # combination m: path i is -1 where bit k-1-i is set
    return (1 - 2 * ((choice[None] >> bits[:, None, None]) & 1)).float().transpose(1, 2).contiguous()


def error_feedback_fit(weight: torch.Tensor, start: ResidualBinaryPaths, objective: Objective, rounds: int,
                       block_size: int = 128, act_order: bool = True) -> ResidualBinaryPaths:
    """GPTQ/OBQ-style error feedback under the objective's full ``H`` (dampened; ``[K, K]``): with the current
    scales, :func:`propagate_signs` (columns by descending ``diag H`` when ``act_order``), then
    :func:`refit_scales` under the objective; ``rounds`` times from ``start``'s scales. Keeps the best."""
    if objective.separable:
        raise ValueError("error feedback needs the full input second moment H [K, K] in the objective")
    weight = weight.float()
    hessian = objective.input_weight
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(hessian.shape[0])
    inverse_order = torch.argsort(order)
    factor = inverse_hessian_factor(hessian[order][:, order])
    best, best_error = start, objective.error(weight, start)
    fit = start
    for _ in range(rounds):
        signs = propagate_signs(weight[:, order], fit.row_scales, fit.col_scales[:, order], factor, block_size)
        fit, error = _refit_scales(weight, ResidualBinaryPaths(signs[:, :, inverse_order], fit.row_scales,
                                                               fit.col_scales), objective)
        if error < best_error:
            best, best_error = fit, error
    return best


def check_fit(fit: ResidualBinaryPaths, name: str = "weight") -> ResidualBinaryPaths:
    """``fit`` if its scales are finite, else a clear error (a fit never hands out NaN scales)."""
    if not (torch.isfinite(fit.row_scales).all() and torch.isfinite(fit.col_scales).all()):
        raise ValueError(f"the fit of {name} produced NaN/Inf scales")
    if not torch.equal(fit.signs.abs(), torch.ones_like(fit.signs)):
        raise ValueError(f"the fit of {name} produced signs other than +-1")
    return fit

