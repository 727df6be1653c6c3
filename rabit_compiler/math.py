"""The RaBiT math, written once and used by the eager/QAT path and by the compiler passes.

Shapes: a linear layer computes ``y = x @ W.T (+ b)`` with ``W`` of shape ``[N, K]`` (N outputs,
K inputs). A *binary path* is ``W_i = g_i[:, None] * B_i * h_i[None, :]`` with ``B_i`` in {-1, +1}^{N x K},
row scale ``g_i`` of shape ``[N]`` and column scale ``h_i`` of shape ``[K]``. ``sign(0) = +1`` always.

Coupled residual hierarchy (RaBiT), derived from one shared latent ``W_FP`` on every forward::

    R_0 = W_FP,   B_i = sign(R_{i-1}),   W_i = g_i * B_i * h_i,   R_i = R_{i-1} - W_i,   W_hat = sum_i W_i

Straight-through gradient: ``dL/dW_FP = dL/dW_hat`` (identity through every sign); ``g_i``, ``h_i`` get
ordinary gradients with ``B_i`` held constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def hard_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) = +1``, in ``x.dtype``, as a constant (no gradient)."""
    return torch.where(x.detach() >= 0, 1.0, -1.0).to(x.dtype)


def binary_path(signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
    """``g[:, None] * B * h[None, :]``: signs ``[N, K]``, row_scale ``[N]``, col_scale ``[K]`` -> ``[N, K]``."""
    return row_scale[:, None] * signs * col_scale[None, :]


def coupled_residual_paths(
    latent: torch.Tensor, row_scales: Sequence[torch.Tensor], col_scales: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The coupled residual derivation: every path re-derived from the one shared latent.

    latent ``[N, K]`` (W_FP); row_scales: k tensors ``[N]`` (a ``[k, N]`` tensor works too), col_scales:
    k tensors ``[K]`` -> k paths ``[N, K]``: path i is ``g_i * sign(R_{i-1}) * h_i``, ``R_i = R_{i-1} -
    path_i``, ``R_0 = latent``. The signs are constants (gradients reach g_i, h_i with B_i held fixed, and
    the latent through :func:`coupled_residual_weight`'s straight-through term). The loop over k is plain
    Python, so calling this on FX proxies (the rewrite pass does) unrolls it into explicit
    sign / scale / subtract nodes.
    """
    signs = coupled_residual_signs(latent, row_scales, col_scales)
    return [
        binary_path(sign, row_scale, col_scale)
        for sign, row_scale, col_scale in zip(signs, row_scales, col_scales, strict=True)
    ]


def coupled_residual_signs(
    latent: torch.Tensor, row_scales: Sequence[torch.Tensor], col_scales: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The k sign planes ``B_i = sign(R_{i-1}) [N, K]`` of :func:`coupled_residual_paths` (constants)."""
    if len(row_scales) != len(col_scales):
        raise ValueError(f"{len(row_scales)} row scales but {len(col_scales)} column scales")
    residual = latent.detach()
    signs = []
    for row_scale, col_scale in zip(row_scales, col_scales, strict=True):
        sign = hard_sign(residual)
        signs.append(sign)
        residual = residual - binary_path(sign, row_scale, col_scale).detach()
    return signs


def coupled_residual_weight(
    latent: torch.Tensor, row_scales: Sequence[torch.Tensor], col_scales: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``W_hat = sum_i path_i + (W_FP - W_FP.detach())`` -> ``[N, K]``.

    The added term is exactly zero in the forward (the value is the sum of the paths, bit for bit) and
    carries the straight-through estimator: ``dL/dW_FP = dL/dW_hat``, identity through every sign.
    """
    paths = coupled_residual_paths(latent, row_scales, col_scales)
    weight = paths[0]
    for path in paths[1:]:
        weight = weight + path
    return weight + (latent - latent.detach())


@dataclass
class ResidualBinaryPaths:
    """k binary paths of one weight: ``signs [k, N, K]`` (+-1, float), ``row_scales [k, N]``,
    ``col_scales [k, K]``; ``dequantize() = sum_i g_i * B_i * h_i``."""

    signs: torch.Tensor
    row_scales: torch.Tensor
    col_scales: torch.Tensor

    @property
    def num_paths(self) -> int:
        return self.signs.shape[0]

    def path(self, index: int) -> torch.Tensor:
        return binary_path(self.signs[index], self.row_scales[index], self.col_scales[index])

    def dequantize(self) -> torch.Tensor:
        return sum(self.path(i) for i in range(self.num_paths))


def leading_singular_pair(
    matrix: torch.Tensor, max_iters: int = 100, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading singular triple of a non-negative matrix ``[N, K]`` by power iteration (fp32).

    Returns ``(u [N], v [K], sigma)`` with ``u, v >= 0`` (Perron vectors of a non-negative matrix) and
    ``matrix ~ sigma * u v^T`` the best rank-1 approximation. Only this pair is needed by SVID, and power
    iteration costs O(N K) per step instead of a full SVD's O(N K min(N, K)).
    """
    a = matrix.float()
    v = a.mean(dim=0)
    if not torch.any(v > 0):
        return a.new_zeros(a.shape[0]), a.new_zeros(a.shape[1]), a.new_zeros(())
    v = v / v.norm()
    sigma = a.new_zeros(())
    for _ in range(max_iters):
        u = a @ v
        sigma_u = u.norm()
        u = u / sigma_u
        v_next = a.T @ u
        new_sigma = v_next.norm()
        v_next = v_next / new_sigma
        converged = (v_next - v).abs().max() <= tol
        v, sigma = v_next, new_sigma
        if converged:
            break
    u = a @ v
    u = u / u.norm()
    return u.clamp_min(0), v.clamp_min(0), sigma


def svid(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign-value-independent decomposition of ``target [N, K]``.

    ``B = sign(target)``; rank-1 ``|target| ~ sigma u v^T``; ``g = sqrt(sigma) u``, ``h = sqrt(sigma) v``.
    Minimises ``||target - g * B * h||_F`` over g, h for these signs (because ``B * target = |target|``).
    Returns ``(signs [N, K], row_scale [N], col_scale [K])`` in fp32.
    """
    target = target.float()
    u, v, sigma = leading_singular_pair(target.abs())
    root = sigma.sqrt()
    return hard_sign(target), root * u, root * v


def _stack(paths: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> ResidualBinaryPaths:
    return ResidualBinaryPaths(
        signs=torch.stack([p[0] for p in paths]),
        row_scales=torch.stack([p[1] for p in paths]),
        col_scales=torch.stack([p[2] for p in paths]),
    )


def greedy_residual_svid(target: torch.Tensor, num_paths: int) -> ResidualBinaryPaths:
    """Greedy residual SVID: path i is the SVID of the residual left by paths < i."""
    _check_paths(num_paths)
    residual = target.float()
    paths = []
    for _ in range(num_paths):
        signs, row_scale, col_scale = svid(residual)
        paths.append((signs, row_scale, col_scale))
        residual = residual - binary_path(signs, row_scale, col_scale)
    return _stack(paths)


def iterative_residual_svid(target: torch.Tensor, num_paths: int, rounds: int) -> ResidualBinaryPaths:
    """Greedy residual SVID, then ``rounds`` Gauss-Seidel sweeps refitting path i by SVID to
    ``target - sum_{j != i} path_j``. Each refit is the best scales for its new signs, so the error
    can only shrink or stay: the sweep keeps the old path if the refit is not better."""
    fit = greedy_residual_svid(target, num_paths)
    target = target.float()
    paths = [fit.path(i) for i in range(num_paths)]
    total = sum(paths)
    for _ in range(rounds):
        for i in range(num_paths):
            others = total - paths[i]
            signs, row_scale, col_scale = svid(target - others)
            candidate = binary_path(signs, row_scale, col_scale)
            if (target - others - candidate).norm() <= (target - total).norm():
                fit.signs[i], fit.row_scales[i], fit.col_scales[i] = signs, row_scale, col_scale
                paths[i] = candidate
                total = others + candidate
    return fit


def precondition_scales(
    input_stat: torch.Tensor | None,
    output_stat: torch.Tensor | None,
    alpha_in: float,
    alpha_out: float,
    eps: float = 1e-8,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Channel-importance weights ``a = s_out^alpha_out [N]`` and ``b = s_in^alpha_in [K]``.

    Each is normalised to mean 1 (only relative importance matters) and floored at ``eps`` so dead
    channels do not divide by zero when mapping the paths back.
    """

    def weights(stat: torch.Tensor | None, alpha: float) -> torch.Tensor | None:
        if stat is None or alpha == 0:
            return None
        w = stat.float().clamp_min(eps).pow(alpha)
        return (w / w.mean()).clamp_min(eps)

    return weights(input_stat, alpha_in), weights(output_stat, alpha_out)


def fit_residual_binary(
    weight: torch.Tensor,
    num_paths: int,
    rounds: int,
    input_importance: torch.Tensor | None = None,
    output_importance: torch.Tensor | None = None,
) -> ResidualBinaryPaths:
    """Initialise k paths for ``weight [N, K]``: iterative residual SVID (``rounds = 0``: greedy) of the
    preconditioned ``W' = diag(a) W diag(b)``, then map back ``g_i /= a``, ``h_i /= b`` (signs unchanged).
    ``a = output_importance [N]``, ``b = input_importance [K]`` (see :func:`precondition_scales`).
    """
    _check_weight(weight)
    target = weight.float()
    if output_importance is not None:
        target = target * output_importance[:, None]
    if input_importance is not None:
        target = target * input_importance[None, :]
    fit = iterative_residual_svid(target, num_paths, rounds) if rounds > 0 else greedy_residual_svid(
        target, num_paths
    )
    if output_importance is not None:
        fit.row_scales = fit.row_scales / output_importance[None, :]
    if input_importance is not None:
        fit.col_scales = fit.col_scales / input_importance[None, :]
    return fit


def reanchor_latent(fit: ResidualBinaryPaths, margin: float = 0.5) -> tuple[torch.Tensor, int]:
    """A latent ``W_FP [N, K]`` whose coupled derivation reproduces ``fit``'s signs (hence its paths).

    Per element, with partial sums ``S_i = sum_{j<=i} path_j`` (S_0 = 0), the coupled forward needs
    ``sign(W_FP - S_{i-1}) = B_i`` for every i, i.e. ``W_FP >= S_{i-1}`` where ``B_i = +1`` and
    ``W_FP < S_{i-1}`` where ``B_i = -1``: an interval [lower, upper). We take its midpoint (``margin``
    sets the position, 0 < margin < 1); a half-open side is extended by ``margin * max_i |path_i|``.
    For k = 2 the interval is never empty (this gives ``W_1 + c * B_2 * |W_1|``); for k >= 3 it can be, or
    be narrower than one fp32 ulp. Returns ``(latent fp32, elements)``: ``elements`` is the number of
    entries at which the coupled forward from this latent (computed in fp32, as training will) does *not*
    reproduce ``fit``'s signs, so the caller can report them; 0 means an exact re-anchor.
    """
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must lie in (0, 1), got {margin}")
    paths = [fit.path(i).double() for i in range(fit.num_paths)]
    shape = paths[0].shape
    lower = torch.full(shape, -torch.inf, dtype=torch.float64)
    upper = torch.full(shape, torch.inf, dtype=torch.float64)
    partial = torch.zeros(shape, dtype=torch.float64)
    for i, path in enumerate(paths):
        positive = fit.signs[i] > 0
        lower = torch.where(positive, torch.maximum(lower, partial), lower)
        upper = torch.where(positive, upper, torch.minimum(upper, partial))
        partial = partial + path
    magnitude = torch.stack([p.abs() for p in paths]).amax(dim=0)
    floor = magnitude.mean().clamp_min(torch.finfo(torch.float32).tiny) * 1e-3
    step = margin * magnitude.clamp_min(floor)
    both = torch.isfinite(lower) & torch.isfinite(upper)
    latent = torch.where(
        both,
        lower + margin * (upper - lower),
        torch.where(torch.isfinite(lower), lower + step, upper - step),
    ).float()
    residual = latent
    mismatched = torch.zeros(shape, dtype=torch.bool)
    for i in range(fit.num_paths):
        mismatched |= hard_sign(residual) != fit.signs[i]
        residual = residual - fit.path(i)
    return latent, int(mismatched.sum())


def standard_residual_weight(
    latents: Sequence[torch.Tensor], row_scales: Sequence[torch.Tensor], col_scales: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Standard residual QAT (the baseline): ``W_hat = sum_i g_i * sign(W_i) * h_i`` -> ``[N, K]``.

    Each path i has its own latent ``W_i [N, K]`` binarized on its own (no residual coupling); the
    straight-through term ``W_i - W_i.detach()`` gives ``dL/dW_i = dL/dW_hat``, the same identity STE as
    :func:`coupled_residual_weight`.
    """
    if not len(latents) == len(row_scales) == len(col_scales):
        raise ValueError(f"{len(latents)} latents, {len(row_scales)} row scales, {len(col_scales)} column scales")
    weight = None
    for latent, row_scale, col_scale in zip(latents, row_scales, col_scales, strict=True):
        path = binary_path(hard_sign(latent), row_scale, col_scale) + (latent - latent.detach())
        weight = path if weight is None else weight + path
    return weight


def sign_preserving_latents(fit: ResidualBinaryPaths) -> torch.Tensor:
    """Independent latents ``[k, N, K]`` for :func:`standard_residual_weight` that reproduce ``fit``:
    ``W_i = B_i * max(|path_i|, tiny)``, so ``sign(W_i) = B_i`` exactly even where a scale is 0."""
    tiny = torch.finfo(torch.float32).tiny
    magnitude = torch.stack([fit.path(i).abs() for i in range(fit.num_paths)]).float()
    return fit.signs.float() * magnitude.clamp_min(tiny)


def rtn_dequantized(weight: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Round-to-nearest, per output channel, asymmetric min/max: ``2**bits`` levels per row.

    ``scale_n = (max_n - min_n) / (2**bits - 1)``, ``q = clamp(round((W - min_n) / scale_n), 0, 2**bits - 1)``,
    returns ``q * scale_n + min_n`` ``[N, K]`` (fp32). A constant row (scale 0) is returned unchanged.
    """
    _check_weight(weight)
    if not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be an integer >= 1, got {bits!r}")
    w = weight.float()
    low = w.amin(dim=1, keepdim=True)
    levels = 2**bits - 1
    scale = (w.amax(dim=1, keepdim=True) - low) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((w - low) / safe), 0, levels)
    return torch.where(scale > 0, q * scale + low, w)


def _check_paths(num_paths: int) -> None:
    if not isinstance(num_paths, int) or num_paths < 1:
        raise ValueError(f"the number of binary paths must be an integer >= 1, got {num_paths!r}")


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"cannot binarize an empty weight of shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"weight of shape {tuple(weight.shape)} has {bad} NaN/Inf values; refusing to binarize")
