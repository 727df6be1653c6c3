"""Triton kernel that packs signs into the format-v1 words on the GPU (see :mod:`.packing`).

    word[r, w] = sum_j [ value[r, 32 w + j] < 0 ] << j        (int32, two's complement; columns >= K read as 0)

for every row ``r`` of a ``[..., K]`` source viewed as ``[R, K]``: bit set means -1, sign(0) = +1 (and NaN packs
as +1, like ``value < 0`` on the CPU). :func:`.packing.pack_signs` calls :func:`pack_signs_triton` for CUDA
tensors; on CPU tensors it runs in Triton's interpreter (how the tests check it against the torch packer).
Offsets are 64-bit, so sources of any size pack in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpret import SUM, interpreted
from .packing import words_per_row

#: dtypes the kernel reads (bool sources are read as int8).
PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
               torch.int64, torch.uint8)
#: rows x words per program, and warps: 16 x 8 words = 4096 signs per program.
PACK_BLOCK_R = 16
PACK_BLOCK_W = 8
PACK_NUM_WARPS = 4


@triton.jit
def _pack_signs_kernel(src_ptr, packed_ptr, R, K, W, stride_src,
                       BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """packed[r, w] for a block of BLOCK_R rows and BLOCK_W words (grid: row blocks x word blocks)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    bit = tl.arange(0, 32)
    col = offs_w[:, None] * 32 + bit[None, :]  # [BW, 32]
    row_mask = offs_r < R
    values = tl.load(src_ptr + offs_r.to(tl.int64)[:, None, None] * stride_src + col[None, :, :],
                     mask=row_mask[:, None, None] & (col < K)[None, :, :], other=0)  # [BR, BW, 32]
    if src_ptr.dtype.element_ty == tl.bfloat16:  # exact; and the 3.9 interpreter compares bf16 as raw bits
        values = values.to(tl.float32)
    bits = (values < 0).to(tl.int32) << bit[None, None, :]
    words = tl.reduce(bits, 2, SUM)  # distinct bits: the sum is their OR (bit 31 wraps to the sign bit)
    tl.store(packed_ptr + offs_r.to(tl.int64)[:, None] * W + offs_w[None, :], words,
             mask=row_mask[:, None] & (offs_w < W)[None, :])


def pack_signs_triton(signs: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` signs (negative means -1; zero, positive and NaN mean +1) -> int32 ``[..., ceil(K/32)]``,
    bit for bit :func:`.packing.pack_signs`. CUDA tensors run the compiled kernel, CPU tensors the interpreter."""
    if signs.dtype == torch.bool:
        signs = signs.to(torch.int8)
    if signs.dtype not in PACK_DTYPES:
        raise TypeError(f"cannot pack signs of dtype {signs.dtype}; expected one of {PACK_DTYPES} or bool")
    if signs.dim() == 0:
        raise ValueError("signs must have at least one dimension (the K columns)")
    in_features = signs.shape[-1]
    num_words = words_per_row(in_features)
    packed = torch.empty(*signs.shape[:-1], num_words, dtype=torch.int32, device=signs.device)
    rows = signs.reshape(-1, in_features)
    if rows.shape[0] == 0 or num_words == 0:
        return packed
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_rows = rows.shape[0]
    grid = (triton.cdiv(num_rows, PACK_BLOCK_R), triton.cdiv(num_words, PACK_BLOCK_W))
    fn = interpreted(_pack_signs_kernel) if signs.device.type == "cpu" else _pack_signs_kernel
    fn[grid](rows, packed, num_rows, in_features, num_words, rows.stride(0),
             BLOCK_R=PACK_BLOCK_R, BLOCK_W=PACK_BLOCK_W, num_warps=PACK_NUM_WARPS)
    return packed


__all__ = ["PACK_BLOCK_R", "PACK_BLOCK_W", "PACK_DTYPES", "pack_signs_triton"]
