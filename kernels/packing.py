"""The packed residual-binary format: the one definition every path (eager, passes, kernels, files) uses.

Format version 1, for a linear ``y = x @ W_hat.T + b`` with ``W_hat [N, K] = sum_i g_i * B_i * h_i``:

- ``packed_signs``: int32 ``[k, N, ceil(K / 32)]``. Bit ``j`` of word ``w`` in row ``n`` of plane ``i``
  holds ``B_i[n, 32 * w + j]``: bit set means -1, clear means +1 (so sign(0) = +1 packs to 0). Bits past
  K in the last word are 0 and never change a result: every consumer masks columns >= K.
- ``row_scale``: ``[k, N]`` (g), ``col_scale``: ``[k, K]`` (h), in the scale dtype (fp16 by default).
- ``bias``: ``[N]`` or None, kept as it was.

Storage: k bits per weight + 16 k (N + K) bits of scales, e.g. 2.016 bits/weight for k=2 at 4096 x 4096.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FORMAT_VERSION = 1
BITS_PER_WORD = 32


def words_per_row(in_features: int) -> int:
    """``ceil(K / 32)``: int32 words holding one row of K signs."""
    return -(-in_features // BITS_PER_WORD)


def _bit_weights(device: torch.device) -> torch.Tensor:
    """``[32]`` int64 ``2**j``."""
    return torch.bitwise_left_shift(torch.ones(BITS_PER_WORD, dtype=torch.int64, device=device),
                                    torch.arange(BITS_PER_WORD, device=device))


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` tensor of signs (negative means -1; zero and positive mean +1) -> int32 ``[..., ceil(K/32)]``.

    CUDA tensors are packed by the Triton kernel of :mod:`.triton_pack` (same words), others by torch ops here.
    """
    if signs.device.type == "cuda":
        from .triton_pack import pack_signs_triton  # imports this module

        return pack_signs_triton(signs)
    in_features = signs.shape[-1]
    num_words = words_per_row(in_features)
    negative = (signs < 0).to(torch.int64)
    padded = torch.nn.functional.pad(negative, (0, num_words * BITS_PER_WORD - in_features))
    bits = padded.reshape(*signs.shape[:-1], num_words, BITS_PER_WORD)
    words = (bits * _bit_weights(signs.device)).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_signs(packed_signs: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int32 ``[..., ceil(K/32)]`` -> ``[..., K]`` of +-1 in ``dtype`` (inverse of :func:`pack_signs`)."""
    if packed_signs.dtype != torch.int32:
        raise TypeError(f"packed_signs must be int32, got {packed_signs.dtype}")
    if packed_signs.shape[-1] != words_per_row(in_features):
        raise ValueError(
            f"packed_signs has {packed_signs.shape[-1]} words per row, but K={in_features} needs "
            f"{words_per_row(in_features)}"
        )
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=packed_signs.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(packed_signs.unsqueeze(-1), shifts), 1)
    bits = bits.reshape(*packed_signs.shape[:-1], packed_signs.shape[-1] * BITS_PER_WORD)[..., :in_features]
    return (1 - 2 * bits).to(dtype)


@dataclass
class PackedResidualBinary:
    """One packed linear layer (format version :data:`FORMAT_VERSION`); see the module docstring."""

    packed_signs: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor
    bias: torch.Tensor | None
    in_features: int

    def __post_init__(self) -> None:
        validate_packed(self.packed_signs, self.row_scale, self.col_scale, self.bias, self.in_features)

    @property
    def num_paths(self) -> int:
        return self.packed_signs.shape[0]

    @property
    def out_features(self) -> int:
        return self.packed_signs.shape[1]

    def signs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[k, N, K]`` of +-1."""
        return unpack_signs(self.packed_signs, self.in_features, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [N, K] = sum_i g_i * B_i * h_i``, computed in fp32 (fp64 when ``dtype`` is fp64) then cast to
        ``dtype``."""
        compute = torch.promote_types(dtype, torch.float32)
        signs = self.signs(compute)
        paths = self.row_scale.to(compute)[:, :, None] * signs * self.col_scale.to(compute)[:, None, :]
        return paths.sum(dim=0).to(dtype)

    def nbytes(self) -> int:
        tensors = [self.packed_signs, self.row_scale, self.col_scale]
        if self.bias is not None:
            tensors.append(self.bias)
        return sum(t.numel() * t.element_size() for t in tensors)


def pack_paths(
    signs: torch.Tensor,
    row_scales: torch.Tensor,
    col_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> PackedResidualBinary:
    """Pack ``signs [k, N, K]`` with scales ``[k, N]``, ``[k, K]`` (cast to ``scale_dtype``).

    Raises if a scale overflows ``scale_dtype`` (use fp32 scales for such a layer) rather than storing Inf.
    """
    row_scale = row_scales.to(scale_dtype)
    col_scale = col_scales.to(scale_dtype)
    for name, original, cast in (("row", row_scales, row_scale), ("column", col_scales, col_scale)):
        if torch.isfinite(original).all() and not torch.isfinite(cast).all():
            raise OverflowError(
                f"{name} scales (max |s| = {original.abs().max().item():.3g}) overflow {scale_dtype}; "
                "use scale_dtype=torch.float32 for this layer"
            )
    return PackedResidualBinary(
        packed_signs=pack_signs(signs).contiguous(),
        row_scale=row_scale.contiguous(),
        col_scale=col_scale.contiguous(),
        bias=bias,
        in_features=signs.shape[-1],
    )


def segment_starts(out_features: Sequence[int]) -> list[int]:
    """``[0, N_1, N_1 + N_2, .., N_total]``: where each of S concatenated siblings' rows begin (and the end)."""
    starts = [0]
    for size in out_features:
        starts.append(starts[-1] + int(size))
    return starts


def validate_siblings(
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: Sequence[int],
) -> None:
    """Raise a ValueError naming the first inconsistency of S fused siblings: ``packed_signs [k, N_total, W]``,
    ``row_scale [k, N_total]`` and ``bias [N_total]`` hold the siblings' rows in order (``N_total =
    sum(out_features)``), ``col_scale [S, k, K]`` one set of column scales per sibling."""
    num_siblings = len(out_features)
    if num_siblings == 0:
        raise ValueError("out_features must name at least one sibling")
    if col_scale.dim() != 3 or col_scale.shape[0] != num_siblings:
        raise ValueError(f"col_scale must be [S={num_siblings}, k, K] (one [k, K] per sibling), "
                         f"got {tuple(col_scale.shape)}")
    validate_packed(packed_signs, row_scale, col_scale[0], bias, in_features)
    if min(out_features) < 0 or sum(out_features) != packed_signs.shape[1]:
        raise ValueError(f"out_features {list(out_features)} must be >= 0 and sum to N_total={packed_signs.shape[1]}")


def validate_packed(
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> None:
    """Raise a ValueError naming the first inconsistency between the packed tensors."""
    if packed_signs.dtype != torch.int32 or packed_signs.dim() != 3:
        raise ValueError(f"packed_signs must be int32 [k, N, words], got {packed_signs.dtype} "
                         f"{tuple(packed_signs.shape)}")
    num_paths, out_features, num_words = packed_signs.shape
    if num_words != words_per_row(in_features):
        raise ValueError(f"packed_signs has {num_words} words per row; K={in_features} needs "
                         f"{words_per_row(in_features)}")
    if tuple(row_scale.shape) != (num_paths, out_features):
        raise ValueError(f"row_scale must be [k={num_paths}, N={out_features}], got {tuple(row_scale.shape)}")
    if tuple(col_scale.shape) != (num_paths, in_features):
        raise ValueError(f"col_scale must be [k={num_paths}, K={in_features}], got {tuple(col_scale.shape)}")
    if not row_scale.is_floating_point() or not col_scale.is_floating_point():
        raise ValueError("row_scale and col_scale must be floating point")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [N={out_features}], got {tuple(bias.shape)}")
