"""Triton kernels for the packed residual-binary linear ``y = sum_i g_i * (B_i @ (h_i * x)) + b``.

Format: see :mod:`.packing` (int32 sign words ``[k, N, ceil(K/32)]``, bit set = -1). Two algorithms, one source
each, every size and option a ``tl.constexpr``:

* :func:`_rbl_gemv_kernel` -- decode / small batch (CUDA cores, no multiplies by a weight). A program owns
  ``BLOCK_N`` output rows and walks K in blocks of ``BLOCK_KW`` words (``32 * BLOCK_KW`` columns). Per block it
  loads the sign words of all paths once (contiguous int32 along K: 16-byte vector loads when a row is 16-byte
  aligned). Two inner loops, the constexpr ``LUT_BITS``: 0 reads x once per row, forms ``h_i * x`` per path in
  fp32, and for every bit picks ``+xh`` or ``-xh`` with a select (``tl.where``) before an fp32 add; 4 (LUT)
  takes, per nibble of a sign word, the signed sum of ``h_i * x`` over its 4 columns from tables that
  :func:`_rbl_lut_kernel` writes just before (16 fp32 entries per path and group of 4 columns: ``64 k K`` bytes
  per row of x), one shared-memory lookup (``tl.gather``) before an fp32 add. Partial sums stay per (path, row,
  word column) in registers (a word's bits or nibbles are reduced inside a thread, no shuffles in the loop); the
  epilogue reduces them, applies ``g_i`` and the bias, and stores in x's dtype. ``BLOCK_M`` rows of x share one
  load of the sign words.
* :func:`_rbl_gemm_kernel` -- small batches beyond :data:`GEMV_MAX_ROWS` rows and prefill (tensor cores, fp16 /
  bf16 x). Per K block it loads the sign words of all paths as ``[paths, BLOCK_N, 4]`` (16 bytes per row and
  path), splits them into word columns, and unpacks each column to a ``32 x BLOCK_N`` tile of the dequantized
  weight ``sum_i g_i * (+-h_i)`` (fp32, rounded once to x's dtype), multiplied with the matching 32 columns of x
  by ``tl.dot`` with fp32 accumulation. One accumulator whatever the number of paths; bias in the epilogue.

Siblings (q/k/v, gate/up: S linears sharing x, their rows concatenated along N, each with its own column scales
``col_scale[s]``) are the same kernels: the launch's segment bounds are scalar arguments and ``NUM_SEGMENTS``
(1..:data:`MAX_SEGMENTS`) a constexpr; :func:`_segment_block` maps program ``pid`` along N to (segment, block
within it), so a block never straddles two segments and reads one segment's h. One linear is S = 1, where the
mapping folds to ``start = pid * BLOCK_N``; more than :data:`MAX_SEGMENTS` siblings take one launch per group.

Padding: columns ``>= K`` read x and h as 0 and words past the row as 0, so neither the padded bits of the last
word nor anything beyond the tensors changes a result; rows ``>= N`` and ``>= M`` are masked on load and store.

On CPU tensors the launcher runs the same kernels through Triton's interpreter (``TRITON_INTERPRET=1``
semantics, whether or not the variable was set when this module was imported), which is how the tests prove
them without a GPU; ``INTERPRET_BF16`` works around two bf16 bugs of the 3.9 interpreter (see the launcher).
Only Triton APIs present in 3.6 and later are used. Offsets are int32: tensors stay below 2**31 elements.

Static cost (SASS of the K loop, ptxas 12.9 / 13.x, fp16 x; ``benchmarks/kernel_report.py``, recorded in
``benchmarks/RESULTS.md``): the select loop (``LUT_BITS = 0``) spends about 3.5 instructions per sign bit per
path per row of x (3.3-3.7 for k = 1..4: one LOP3, one FSEL, one FADD per bit, the rest is loads and the
shared-memory relayout of x), 2.8-3.2 with two rows per program, 2.1 of them on the ALU pipe (64 lanes per SM per
clock on sm_89 / sm_90). The LUT loop (``LUT_BITS = 4``) spends 1.16-1.30 (sm_89: 1.20-1.29; sm_90: 1.16-1.30),
0.9-1.2 with two rows, 0.52-0.59 of them on the ALU pipe: per nibble a SHF and a LOP3 (the nibble as a byte
offset), one LDS, one FADD, and per K block the tables' 16-byte loads, their stores to shared memory and two
barriers (k = 3 computes on a padded fourth plane: 1.7 per useful bit). The GEMM spends about 6.7 per bit per
path for a whole 16-row tile. Those counts set :data:`GEMV_MAX_ROWS`; GPU timings should refine it. Against the
per-SM issue and ALU rates, the select loop predicts an instruction-bound GEMV on the H100 at about 1 TB/s of
sign bytes (30% of its DRAM bandwidth; k = 3: 22%) and a DRAM-bound one on the RTX 4090 (k = 3: 91%); the LUT
loop predicts a DRAM-bound GEMV on both for k = 1, 2 and on the RTX 4090 for every k, and 97% (k = 4) and 72%
(k = 3) of the H100's bandwidth. :data:`GEMV_LUT_BITS` is nevertheless 0: the LUT loop is predicted faster on
sm_90 for every k but on sm_89 only for k = 3 (both loops DRAM-bound there otherwise), and the model prices
neither its extra launch, nor its tables' reads from L2 (``128 / BLOCK_N`` bytes of fp32 table per sign byte:
1 for k = 1, 2 for k = 2, 4 for k = 3, 4, against 0.25-0.6 bytes of x and h for the select loop), nor the
occupancy of a batch-1 grid (N = 4096, k = 2: 64 programs of 4 warps for 132 SMs). GPU timings
(``benchmarks/kernels.py --lut-bits 0`` / ``4``) should decide, e.g. a default per architecture.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .interpret import SUM as _SUM
from .interpret import interpreted
from .packing import BITS_PER_WORD, segment_starts, validate_packed, validate_siblings

#: dtypes the kernels accept for x (the output has x's dtype).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: largest number of sign planes (paths) the kernels take (tiles pad the path axis to a power of two).
MAX_PATHS = 4
#: fp16 / bf16 batches of at most this many rows go to the GEMV kernel, larger ones to the GEMM kernel (from the
#: static instruction counts in the module docstring, not yet from GPU timings). fp32 always takes the GEMV.
GEMV_MAX_ROWS = 2
#: siblings (segments) one launch handles; the launcher splits more into launches of at most this many.
MAX_SEGMENTS = 4
#: the GEMV's inner loops: 0 = a select and an add per sign bit, 4 = a lookup and an add per nibble (LUT).
LUT_BITS_CHOICES = (0, 4)
#: the GEMV's inner loop by default, for batches of up to GEMV_MAX_ROWS rows: the select loop, as the static model
#: does not predict the LUT loop faster on both sm_89 and sm_90 (see "Static cost" in the module docstring).
GEMV_LUT_BITS = 0
#: column groups (4 columns each) per program of the table kernel, and its warps.
LUT_BLOCK_G = 64
LUT_NUM_WARPS = 4
_INT32_LIMIT = 2**31


@triton.jit
def _advance_segment(pid, first, start, end, next_end, segment, BLOCK_N: tl.constexpr):
    """Step from segment ``[start, end)``, whose blocks are programs ``first ..``, to ``[end, next_end)`` if
    program ``pid`` lies past that segment's blocks."""
    after = first + (end - start + BLOCK_N - 1) // BLOCK_N
    past = pid >= after
    return (tl.where(past, after, first), tl.where(past, end, start), tl.where(past, next_end, end),
            segment + past.to(tl.int32))


@triton.jit
def _segment_block(pid, bound0, bound1, bound2, bound3, bound4, BLOCK_N: tl.constexpr,
                   NUM_SEGMENTS: tl.constexpr):
    """Program ``pid`` -> (segment, first output row of its block, end of its segment).

    Segment ``s`` holds output rows ``[bound_s, bound_{s+1})``; its ``ceil(len / BLOCK_N)`` blocks are
    consecutive programs, so a block never straddles two segments (each segment has its own column scales).
    """
    first = 0
    start = bound0
    end = bound1
    segment = 0
    if NUM_SEGMENTS > 1:
        first, start, end, segment = _advance_segment(pid, first, start, end, bound2, segment, BLOCK_N)
    if NUM_SEGMENTS > 2:
        first, start, end, segment = _advance_segment(pid, first, start, end, bound3, segment, BLOCK_N)
    if NUM_SEGMENTS > 3:
        first, start, end, segment = _advance_segment(pid, first, start, end, bound4, segment, BLOCK_N)
    return segment, start + (pid - first) * BLOCK_N, end


@triton.jit
def _nibble_columns(ptrs, mask, group_col, K):
    """The 4 columns ``group_col + j`` (j = 0..3) of nibble groups, loaded through ``ptrs`` (pointing at column
    ``group_col``) as fp32; columns ``>= K`` (and ``mask`` false) read as 0."""
    c0 = tl.load(ptrs, mask=mask & (group_col < K), other=0.0).to(tl.float32)
    c1 = tl.load(ptrs + 1, mask=mask & (group_col + 1 < K), other=0.0).to(tl.float32)
    c2 = tl.load(ptrs + 2, mask=mask & (group_col + 2 < K), other=0.0).to(tl.float32)
    c3 = tl.load(ptrs + 3, mask=mask & (group_col + 3 < K), other=0.0).to(tl.float32)
    return c0, c1, c2, c3


@triton.jit
def _signed_pairs(v0, v1):
    """``[P, G, 4]`` from ``[P, G]``: ``(bit 0 of q ? -v0 : v0) + (bit 1 of q ? -v1 : v1)`` for q = 0..3."""
    q = tl.arange(0, 4)
    first = tl.where((q & 1)[None, None, :] != 0, -v0[:, :, None], v0[:, :, None])
    return first + tl.where((q & 2)[None, None, :] != 0, -v1[:, :, None], v1[:, :, None])


@triton.jit
def _rbl_lut_kernel(
    x_ptr, col_scale_ptr, lut_ptr, M, K, num_groups, stride_xm, segment_base,
    NUM_PATHS: tl.constexpr, PATHS_P2: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Nibble tables of the LUT GEMV (grid: blocks of BLOCK_G column groups x M rows x S segments), fp32
    ``lut [S, M, PATHS_P2, num_groups, 16]``:

        lut[s, m, i, g, q] = sum_{j<4} (bit j of q ? -1 : +1) * h_{s,i}[4 g + j] * x[m, 4 g + j]

    columns ``>= K`` and paths ``>= NUM_PATHS`` add 0 (``num_groups``: 8 per sign word, padded to whole K blocks
    of the GEMV, so that it reads whole tables without masks). Built as (q bits 2, 3) + (q bits 0, 1): two signed
    pairs per group, then one add per entry.
    """
    pid_g = tl.program_id(0)
    row = tl.program_id(1)
    segment = tl.program_id(2)
    offs_p = tl.arange(0, PATHS_P2)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_q = tl.arange(0, 16)
    col = offs_g * 4  # [G]: first column of each group
    x0, x1, x2, x3 = _nibble_columns(x_ptr + row * stride_xm + col, col < K, col, K)  # 4 x [G]
    h_ptrs = col_scale_ptr + (segment_base + segment) * (NUM_PATHS * K) + offs_p[:, None] * K + col[None, :]
    h0, h1, h2, h3 = _nibble_columns(h_ptrs, (offs_p < NUM_PATHS)[:, None], col[None, :], K)  # 4 x [P, G]
    low = _signed_pairs(x0[None, :] * h0, x1[None, :] * h1)  # [P, G, 4]: q bits 0, 1
    high = _signed_pairs(x2[None, :] * h2, x3[None, :] * h3)  # [P, G, 4]: q bits 2, 3
    table = tl.reshape(high[:, :, :, None] + low[:, :, None, :], [PATHS_P2, BLOCK_G, 16])  # q = 4 * hi + lo
    plane = (segment * M + row) * PATHS_P2 + offs_p  # [P]
    tl.store(lut_ptr + (plane[:, None, None] * num_groups + offs_g[None, :, None]) * 16 + offs_q[None, None, :],
             table, mask=(offs_g < num_groups)[None, :, None])


@triton.jit
def _rbl_gemv_kernel(
    x_ptr, signs_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, y_ptr, lut_ptr,
    M, N, K, W, stride_xm, stride_ym, bound0, bound1, bound2, bound3, bound4, segment_base,
    NUM_PATHS: tl.constexpr, PATHS_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, WORD_ALIGN: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, LUT_BITS: tl.constexpr,
):
    """y[m, n] for m in a block of BLOCK_M rows and n in a block of BLOCK_N outputs of one segment (grid: blocks
    of all segments x M blocks). Two inner loops over a block's ``[paths, BLOCK_N, BLOCK_KW]`` sign words:

    * ``LUT_BITS = 0``: per bit, ``+-h_i * x`` by a select, then an fp32 add. Tensors are bit-major
      (``[32, paths, rows, words]``) so that the 32 bits of a word are handled by one thread: the shifts are
      compile-time constants and the sum over bits needs no cross-lane reduction.
    * ``LUT_BITS = 4``: per nibble (4 bits), one lookup in the row's tables ``lut_ptr`` (fp32
      ``[S, M, PATHS_P2, groups, 16]`` from :func:`_rbl_lut_kernel`: the 16 signed sums of ``h_i * x`` over the
      nibble's 4 columns), then an fp32 add; x and h are not read here. Per K block the block's tables
      ``[paths, 8 * BLOCK_KW, 16]`` are loaded (16-byte loads) and handed to ``tl.gather``, which Triton lowers
      to a store to shared memory, a barrier and one shared-memory load per lookup (a group's 16 entries lie in
      16 banks and a warp's lanes look up the same group, so lookups are conflict-free wherever a warp holds
      rows of one plane: every tile but BLOCK_M = 2 with 3 or 4 paths, up to 2-way there). Tensors are nibble-major
      (``[8, words, paths, rows]``): a row's words and their 32 nibbles stay in one thread.
    """
    segment, block_start, segment_end = _segment_block(tl.program_id(0), bound0, bound1, bound2, bound3, bound4,
                                                       BLOCK_N, NUM_SEGMENTS)
    pid_m = tl.program_id(1)
    # W is a multiple of WORD_ALIGN (checked by the launcher); saying so lets the compiler prove each row
    # start 4 * WORD_ALIGN-byte aligned and emit vector loads of the sign words even when W % 16 != 0.
    W = (W // WORD_ALIGN) * WORD_ALIGN
    offs_p = tl.arange(0, PATHS_P2)
    offs_n = block_start + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_KW)
    offs_m = tl.arange(0, BLOCK_M)
    bit = tl.arange(0, 32)
    p_mask = offs_p < NUM_PATHS
    n_mask = offs_n < segment_end
    pn_mask = p_mask[:, None] & n_mask[None, :]
    col_scale_ptr += (segment_base + segment) * (NUM_PATHS * K)  # this segment's h [paths, K]
    row_start = (offs_p[:, None] * N + offs_n[None, :]) * W  # [P, BN]: word offset of row n in plane p

    if LUT_BITS == 0:
        acc = tl.full([BLOCK_M, PATHS_P2, BLOCK_N, BLOCK_KW], 0.0, tl.float32)
    else:
        acc = tl.full([BLOCK_M, BLOCK_KW, PATHS_P2, BLOCK_N], 0.0, tl.float32)  # word-major, like the lookups
        offs_j = tl.arange(0, 8)  # nibble of a word
        GROUPS: tl.constexpr = BLOCK_KW * 8  # nibble groups (4 columns each) of a K block
        # a row's tables: [PATHS_P2, 8 * W padded to whole K blocks, 16] (_rbl_lut_kernel); a block's: [P, G, 16]
        lut_groups = (W + BLOCK_KW - 1) // BLOCK_KW * GROUPS
        offs_t = tl.arange(0, PATHS_P2 * GROUPS * 16)
        table_offs = (offs_t // (GROUPS * 16)) * (lut_groups * 16) + offs_t % (GROUPS * 16)
    for kb in range(0, (W + BLOCK_KW - 1) // BLOCK_KW):
        w_idx = kb * BLOCK_KW + offs_w
        words = tl.load(signs_ptr + row_start[:, :, None] + w_idx[None, None, :],
                        mask=pn_mask[:, :, None] & (w_idx < W)[None, None, :], other=0)  # [P, BN, BKW] int32
        if LUT_BITS == 0:
            negative = ((words[None, :, :, :] >> bit[:, None, None, None]) & 1) != 0  # [32, P, BN, BKW]
            k_idx = bit[:, None] + w_idx[None, :] * 32  # [32, BKW]: column of bit j of word w
            k_mask = k_idx < K
            h = tl.load(col_scale_ptr + offs_p[None, :, None] * K + k_idx[:, None, :],
                        mask=p_mask[None, :, None] & k_mask[:, None, :], other=0.0).to(tl.float32)  # [32, P, BKW]
        else:
            # entry of (nibble j, word w, path p, row n) in the block's tables: (p * G + 8 w + j) * 16 + nibble.
            # The order [8, BKW, P, BN] keeps a row's 4 words and their 32 nibbles in one thread.
            nibble = (tl.permute(words, (2, 0, 1))[None, :, :, :] >> (4 * offs_j)[:, None, None, None]) & 15
            entry = tl.reshape(nibble + (offs_j[:, None, None, None] + offs_w[None, :, None, None] * 8
                                         + offs_p[None, None, :, None] * GROUPS) * 16,
                               [8 * BLOCK_KW * PATHS_P2 * BLOCK_N])
        for m in tl.static_range(BLOCK_M):
            # rows past M read row M - 1 (their results are never stored): no row mask on the load
            row = tl.minimum(pid_m * BLOCK_M + m, M - 1)
            if LUT_BITS == 0:
                x = tl.load(x_ptr + row * stride_xm + k_idx, mask=k_mask, other=0.0).to(tl.float32)
                xh = x[:, None, :] * h  # [32, P, BKW]
                signed = tl.where(negative, -xh[:, :, None, :], xh[:, :, None, :])  # [32, P, BN, BKW]
                part = tl.reduce(signed, 0, _SUM)  # [P, BN, BKW], reduced inside each thread
            else:
                # this row's tables for the block's G nibble groups (_rbl_lut_kernel), one lookup per nibble
                tables = tl.load(lut_ptr + ((segment * M + row) * PATHS_P2 * lut_groups + kb * GROUPS) * 16
                                 + table_offs)  # [P * G * 16] fp32
                looked_up = tl.reshape(tl.gather(tables, entry, 0), [8, BLOCK_KW, PATHS_P2, BLOCK_N])
                part = tl.reduce(looked_up, 0, _SUM)  # [BKW, P, BN], reduced inside each thread
            if BLOCK_M == 1:
                acc += part[None]
            else:
                acc += tl.where((offs_m == m)[:, None, None, None], part[None], 0.0)
    if LUT_BITS != 0:
        acc = tl.permute(acc, (0, 2, 3, 1))  # [BM, P, BN, BKW]

    g = tl.load(row_scale_ptr + offs_p[:, None] * N + offs_n[None, :], mask=pn_mask, other=0.0).to(tl.float32)
    paths = tl.reduce(acc, 3, _SUM)  # [BM, P, BN]
    out = tl.reduce(paths * g[None, :, :], 1, _SUM)  # [BM, BN]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    rows = pid_m * BLOCK_M + offs_m
    if INTERPRET_BF16:  # round to nearest even by hand (see the launcher); then the cast below is exact
        out = ((out.to(tl.int32, bitcast=True) + 0x7FFF + ((out.to(tl.int32, bitcast=True) >> 16) & 1))
               & -65536).to(tl.float32, bitcast=True)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & n_mask[None, :])


@triton.jit
def _rbl_gemm_kernel(
    x_ptr, signs_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, y_ptr,
    M, N, K, W, stride_xm, stride_ym, bound0, bound1, bound2, bound3, bound4, segment_base,
    NUM_PATHS: tl.constexpr, PATHS_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, WORD_ALIGN: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """y[BLOCK_M rows, BLOCK_N outputs of one segment] with tl.dot on dequantized tiles (grid as the GEMV).

    Per K block the sign words of all paths are loaded at once as ``[paths, BLOCK_N, 4]`` (16 bytes per row
    and path), then split into the 4 word columns; each column is unpacked to a 32 x BLOCK_N tile
    ``sum_i g_i * (+-h_i)`` in fp32, rounded once to x's dtype and multiplied with the matching 32 columns of x
    by ``tl.dot`` (fp32 accumulation). Working one word column at a time keeps the unpacked tile small.
    """
    tl.static_assert(BLOCK_KW == 4, "the GEMM kernel unpacks one 16-byte group of 4 words per K block")
    segment, block_start, segment_end = _segment_block(tl.program_id(0), bound0, bound1, bound2, bound3, bound4,
                                                       BLOCK_N, NUM_SEGMENTS)
    pid_m = tl.program_id(1)
    W = (W // WORD_ALIGN) * WORD_ALIGN  # see _rbl_gemv_kernel
    offs_p = tl.arange(0, PATHS_P2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_start + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_KW)
    bit = tl.arange(0, 32)
    p_mask = offs_p < NUM_PATHS
    m_mask = offs_m < M
    n_mask = offs_n < segment_end
    pn_mask = p_mask[:, None] & n_mask[None, :]
    col_scale_ptr += (segment_base + segment) * (NUM_PATHS * K)  # see _rbl_gemv_kernel
    dtype = x_ptr.dtype.element_ty
    row_start = (offs_p[:, None] * N + offs_n[None, :]) * W  # [P, BN]
    g = tl.load(row_scale_ptr + offs_p[:, None] * N + offs_n[None, :], mask=pn_mask, other=0.0).to(tl.float32)

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for kb in range(0, (W + BLOCK_KW - 1) // BLOCK_KW):
        w_idx = kb * BLOCK_KW + offs_w
        words = tl.load(signs_ptr + row_start[:, :, None] + w_idx[None, None, :],
                        mask=pn_mask[:, :, None] & (w_idx < W)[None, None, :], other=0)  # [P, BN, 4]
        even, odd = tl.split(tl.reshape(words, [PATHS_P2, BLOCK_N, 2, 2]))  # words 0, 2 and 1, 3
        word0, word2 = tl.split(even)
        word1, word3 = tl.split(odd)
        for c in tl.static_range(4):
            if c == 0:
                column = word0
            elif c == 1:
                column = word1
            elif c == 2:
                column = word2
            else:
                column = word3  # [P, BN]: word kb * 4 + c of every row and path
            k_idx = (kb * BLOCK_KW + c) * 32 + bit  # [32]
            k_mask = k_idx < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_idx[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, 32]
            h = tl.load(col_scale_ptr + offs_p[:, None] * K + k_idx[None, :],
                        mask=p_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [P, 32]
            negative = ((column[:, None, :] >> bit[None, :, None]) & 1) != 0  # [P, 32, BN]
            signed = tl.where(negative, -h[:, :, None], h[:, :, None]) * g[:, None, :]
            tile = tl.reduce(signed, 0, _SUM)  # [32, BN] = (sum_i g_i B_i h_i)^T, fp32
            if INTERPRET_BF16:  # the same bf16 tile and exact products, in fp32 (see the launcher)
                bits = tile.to(tl.int32, bitcast=True)
                tile = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                acc = tl.dot(x.to(tl.float32), tile, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tile.to(dtype), acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if INTERPRET_BF16:
        acc = ((acc.to(tl.int32, bitcast=True) + 0x7FFF + ((acc.to(tl.int32, bitcast=True) >> 16) & 1))
               & -65536).to(tl.float32, bitcast=True)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: which kernel and its constexpr tile sizes (the other constexprs follow from
    the tensors: NUM_PATHS, PATHS_P2, WORD_ALIGN, HAS_BIAS). ``lut_bits`` picks the GEMV's inner loop: 0 = a
    select per sign bit, 4 = one lookup per nibble in tables built by :func:`_rbl_lut_kernel` (GEMM: 0)."""

    kernel: str  # "gemv" or "gemm"
    block_m: int
    block_n: int
    block_kw: int
    num_warps: int
    num_stages: int = 2
    lut_bits: int = 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def word_align(num_words: int) -> int:
    """Largest of 4, 2, 1 dividing the words per row: the sign rows are ``4 * word_align`` bytes aligned."""
    for align in (4, 2):
        if num_words % align == 0:
            return align
    return 1


def gemv_config(rows: int, num_paths: int, lut_bits: int | None = None) -> KernelConfig:
    """GEMV tiles (any x dtype): a ``[paths, BLOCK_N, 4]`` word tile holds 4 words (one 16-byte load) per thread;
    BLOCK_M = 2 shares each sign bit between two rows. Larger BLOCK_M spill registers (measured with ptxas for
    sm_89 / sm_90), so more rows take more programs along the grid's second axis. ``lut_bits`` (0 or 4): the
    inner loop; default :data:`GEMV_LUT_BITS` up to :data:`GEMV_MAX_ROWS` rows, else 0 (the tables take
    ``64 * k * K`` bytes per row of x)."""
    if lut_bits is None:
        lut_bits = GEMV_LUT_BITS if rows <= GEMV_MAX_ROWS else 0
    if lut_bits not in LUT_BITS_CHOICES:
        raise ValueError(f"lut_bits must be one of {LUT_BITS_CHOICES}, got {lut_bits!r}")
    paths_p2 = _next_pow2(num_paths)
    if rows <= 1:
        return KernelConfig("gemv", block_m=1, block_n=128 // paths_p2, block_kw=4, num_warps=4, lut_bits=lut_bits)
    return KernelConfig("gemv", block_m=2, block_n=64 // paths_p2, block_kw=4, num_warps=2, lut_bits=lut_bits)


def gemm_config(rows: int, num_paths: int, arch: int = 90) -> KernelConfig:
    """GEMM tiles (fp16 / bf16 x): BLOCK_M 16 for small batches, 64 for prefill; BLOCK_N 128 for up to two
    paths, 64 for three or four; 4 words (16 bytes) per row and path per K block. On sm_8x the 16-row tile is
    not software-pipelined (num_stages=1): with two stages ptxas 12.9/13.0 settles on 80 registers and spills."""
    block_m = 16 if rows <= 16 else 64
    num_stages = 1 if arch < 90 and block_m == 16 else 2
    return KernelConfig("gemm", block_m=block_m, block_n=128 if num_paths <= 2 else 64, block_kw=4, num_warps=4,
                        num_stages=num_stages)


def choose_config(rows: int, num_paths: int, dtype: torch.dtype, kernel: str | None = None,
                  arch: int = 90, lut_bits: int | None = None) -> KernelConfig:
    """The configuration the launcher uses for ``rows`` rows of x on compute capability ``arch`` (e.g. 89, 90;
    ``kernel`` forces "gemv" or "gemm"; ``lut_bits`` the GEMV's inner loop, see :func:`gemv_config`).

    fp32 always takes the GEMV kernel: an IEEE fp32 ``tl.dot`` runs on the FMA units anyway and needs so many
    registers that the GEMM tiles spill.
    """
    if kernel is None:
        kernel = "gemv" if rows <= GEMV_MAX_ROWS or dtype == torch.float32 else "gemm"
    if kernel == "gemv":
        return gemv_config(rows, num_paths, lut_bits)
    if lut_bits:
        raise ValueError("lookup tables are an option of the GEMV kernel; the GEMM kernel takes lut_bits=0")
    if kernel == "gemm":
        if dtype == torch.float32:
            raise ValueError("the GEMM kernel takes fp16 / bf16 inputs; fp32 uses the GEMV kernel")
        return gemm_config(rows, num_paths, arch)
    raise ValueError(f"kernel must be 'gemv', 'gemm' or None, got {kernel!r}")


def launch_configs(arch: int = 90) -> list[dict]:
    """Every compiled variant the launcher can pick on compute capability ``arch``: one dict per
    (kernel, x dtype, paths, siblings per launch, tile config) with ``kernel`` (the JIT function's name),
    ``dtype`` (torch dtype of x), ``constexprs`` and ``num_warps`` / ``num_stages``. HAS_BIAS is True and
    WORD_ALIGN 4 (the case the loads are specialised for); the remaining constexprs only remove code. For
    ahead-of-time compile checks (tests/test_kernel_aot.py)."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        for num_paths in range(1, MAX_PATHS + 1):
            loops = [("gemv", bits) for bits in LUT_BITS_CHOICES] + ([] if dtype == torch.float32 else [("gemm", 0)])
            seen = set()
            for kernel, lut_bits in loops:
                for rows in (1, 2, 16, 17):
                    if lut_bits and rows > GEMV_MAX_ROWS:
                        continue
                    cfg = choose_config(rows, num_paths, dtype, kernel, arch, lut_bits)
                    if cfg in seen:
                        continue
                    seen.add(cfg)
                    for num_segments in range(1, MAX_SEGMENTS + 1):
                        constexprs = dict(NUM_PATHS=num_paths, PATHS_P2=_next_pow2(num_paths), BLOCK_M=cfg.block_m,
                                          BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw, WORD_ALIGN=4, HAS_BIAS=True,
                                          NUM_SEGMENTS=num_segments, INTERPRET_BF16=False)
                        if kernel == "gemv":
                            constexprs["LUT_BITS"] = cfg.lut_bits
                        out.append(dict(kernel=f"_rbl_{kernel}_kernel", dtype=dtype, constexprs=constexprs,
                                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, config=cfg))
    return out


def lut_table_configs() -> list[dict]:
    """The table kernel :func:`_rbl_lut_kernel` of the LUT GEMV, per x dtype and number of paths (``kernel``,
    ``dtype``, ``constexprs``, ``num_warps``, ``num_stages``), for ahead-of-time compile checks."""
    return [dict(kernel="_rbl_lut_kernel", dtype=dtype, num_warps=LUT_NUM_WARPS, num_stages=1,
                 constexprs=dict(NUM_PATHS=num_paths, PATHS_P2=_next_pow2(num_paths), BLOCK_G=LUT_BLOCK_G))
            for dtype in SUPPORTED_DTYPES for num_paths in range(1, MAX_PATHS + 1)]


def _check(x, packed_signs, row_scale, col_scale, bias, in_features, out_features):
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, layer expects {in_features}")
    validate_siblings(packed_signs, row_scale, col_scale, bias, in_features, out_features)
    num_paths = packed_signs.shape[0]
    if not 1 <= num_paths <= MAX_PATHS:
        raise ValueError(f"the kernels support 1..{MAX_PATHS} paths, got {num_paths}")
    tensors = {"x": x, "packed_signs": packed_signs, "row_scale": row_scale, "col_scale": col_scale}
    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        tensors["bias"] = bias
    for name, tensor in tensors.items():
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device}, x on {x.device}")
    out_numel = x.numel() // max(in_features, 1) * packed_signs.shape[1]
    if max(x.numel(), packed_signs.numel(), col_scale.numel(), out_numel) >= _INT32_LIMIT:
        raise ValueError("tensors of 2**31 or more elements need 64-bit offsets, which these kernels do not use")


def residual_binary_linear_siblings_triton(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: Sequence[int],
    *,
    out: torch.Tensor | None = None,
    kernel: str | None = None,
    lut_bits: int | None = None,
    config: KernelConfig | None = None,
    wrap: Callable | None = None,
) -> torch.Tensor:
    """S sibling linears sharing x, in one launch per :data:`MAX_SEGMENTS` siblings:
    ``y[..., rows of s] = sum_i g_i * (B_i @ (h_{s,i} * x)) + b``, in x's dtype.

    ``packed_signs`` int32 ``[k, N_total, ceil(K/32)]`` and ``row_scale [k, N_total]`` hold the siblings' rows
    concatenated in order (sibling s has ``out_features[s]`` rows), ``col_scale [S, k, K]`` each sibling's
    column scales, ``bias [N_total]`` or None. Same result as
    :func:`.reference.residual_binary_linear_siblings_reference` (x in fp16 / bf16 / fp32; 1 to 4 paths).

    * ``out``: a contiguous ``[..., N_total]`` tensor of x's dtype to write into (returned).
    * ``kernel``: force "gemv" or "gemm" (default: GEMV for up to :data:`GEMV_MAX_ROWS` rows and for fp32,
      GEMM otherwise); ``lut_bits``: the GEMV's inner loop (0 or 4, default: see :func:`gemv_config`); ``config``:
      force a whole :class:`KernelConfig`. With ``lut_bits=4`` the GEMV launch is preceded by a launch of
      :func:`_rbl_lut_kernel` writing the row's nibble tables to a scratch tensor (``torch.empty`` on x's device,
      ``64 * k * K`` bytes per row and sibling: no host synchronisation, CUDA graphs capture both launches).
    * ``wrap``: applied to the ``@triton.jit`` kernel before the launch, e.g. ``torch.library.wrap_triton``
      inside a ``torch.library.triton_op``.

    CUDA tensors run the compiled kernels; CPU tensors (without ``wrap``) run the same kernels in Triton's
    interpreter (slow; that is how the tests check them without a GPU).
    """
    out_features = [int(n) for n in out_features]
    _check(x, packed_signs, row_scale, col_scale, bias, in_features, out_features)
    num_paths, total_out, num_words = packed_signs.shape
    batch_shape = tuple(x.shape[:-1])
    num_rows = 1
    for size in batch_shape:
        num_rows *= size
    if out is None:
        out = torch.empty(*batch_shape, total_out, dtype=x.dtype, device=x.device)
    elif (tuple(out.shape) != (*batch_shape, total_out) or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*batch_shape, total_out)} on "
                         f"{x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if num_rows == 0 or total_out == 0:
        return out
    if in_features == 0:  # empty sums: y = b
        out.copy_(bias.expand_as(out) if bias is not None else torch.zeros_like(out))
        return out
    rows = x.reshape(num_rows, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_rows = out.view(num_rows, total_out)
    arch = 90
    if x.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(x.device)
        arch = 10 * major + minor
    cfg = config or choose_config(num_rows, num_paths, x.dtype, kernel, arch, lut_bits)
    if cfg.kernel == "gemv":
        fn = _rbl_gemv_kernel
    elif cfg.kernel == "gemm":
        if x.dtype == torch.float32:
            raise ValueError("the GEMM kernel takes fp16 / bf16 inputs; fp32 uses the GEMV kernel")
        if cfg.lut_bits:
            raise ValueError("lookup tables are an option of the GEMV kernel; the GEMM kernel takes lut_bits=0")
        fn = _rbl_gemm_kernel
    else:
        raise ValueError(f"unknown kernel {cfg.kernel!r}")
    if cfg.lut_bits not in LUT_BITS_CHOICES:
        raise ValueError(f"lut_bits must be one of {LUT_BITS_CHOICES}, got {cfg.lut_bits!r}")
    table_fn = _rbl_lut_kernel
    if wrap is not None:
        fn, table_fn = wrap(fn), wrap(table_fn)
    elif x.device.type == "cpu":
        fn, table_fn = interpreted(fn), interpreted(table_fn)
    col_scale = col_scale.contiguous()
    pointers = (rows, packed_signs.contiguous(), row_scale.contiguous(), col_scale,
                bias.contiguous() if bias is not None else rows,  # never read when HAS_BIAS is False
                out_rows)
    sizes = (num_rows, total_out, in_features, num_words, rows.stride(0), out_rows.stride(0))
    paths_p2 = _next_pow2(num_paths)
    constexprs = dict(NUM_PATHS=num_paths, PATHS_P2=paths_p2, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw, WORD_ALIGN=word_align(num_words),
                      HAS_BIAS=bias is not None,
                      # Triton's interpreter (3.9) multiplies bf16 dot operands as their uint16 bit patterns and
                      # truncates fp32 -> bf16 casts; on CPU the kernels then round to nearest even by integer
                      # ops and run the (exact) bf16 products as an fp32 dot: the values the GPU computes.
                      INTERPRET_BF16=x.device.type == "cpu" and x.dtype == torch.bfloat16)
    if cfg.kernel == "gemv":
        constexprs["LUT_BITS"] = cfg.lut_bits
    # LUT GEMV: tables [S, rows, paths_p2, groups, 16] fp32, groups = 8 per word padded to whole K blocks
    lut_groups = triton.cdiv(num_words, cfg.block_kw) * cfg.block_kw * BITS_PER_WORD // 4
    table_numel = min(len(out_features), MAX_SEGMENTS) * num_rows * paths_p2 * lut_groups * 16
    if cfg.lut_bits and table_numel >= _INT32_LIMIT:
        raise ValueError(f"the LUT GEMV's tables for {num_rows} rows would hold {table_numel} >= 2**31 elements; "
                         "use lut_bits=0 for batches this large")
    starts = segment_starts(out_features)
    for first in range(0, len(out_features), MAX_SEGMENTS):
        last = min(first + MAX_SEGMENTS, len(out_features))
        bounds = starts[first:last + 1]
        blocks = sum(triton.cdiv(end - start, cfg.block_n) for start, end in itertools.pairwise(bounds))
        if blocks == 0:  # siblings with no rows
            continue
        bounds = bounds + [bounds[-1]] * (MAX_SEGMENTS + 1 - len(bounds))
        launch_pointers = pointers
        if cfg.kernel == "gemv":
            tables = rows  # never read when LUT_BITS is 0
            if cfg.lut_bits:
                tables = torch.empty((last - first) * num_rows * paths_p2 * lut_groups * 16, dtype=torch.float32,
                                     device=x.device)
                table_fn[(triton.cdiv(lut_groups, LUT_BLOCK_G), num_rows, last - first)](
                    rows, col_scale, tables, num_rows, in_features, lut_groups, rows.stride(0), first,
                    NUM_PATHS=num_paths, PATHS_P2=paths_p2, BLOCK_G=LUT_BLOCK_G, num_warps=LUT_NUM_WARPS,
                    num_stages=1)
            launch_pointers = (*pointers, tables)
        fn[(blocks, triton.cdiv(num_rows, cfg.block_m))](*launch_pointers, *sizes, *bounds, first, **constexprs,
                                                         NUM_SEGMENTS=last - first,
                                                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def residual_binary_linear_triton(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    *,
    out: torch.Tensor | None = None,
    kernel: str | None = None,
    lut_bits: int | None = None,
    config: KernelConfig | None = None,
    wrap: Callable | None = None,
) -> torch.Tensor:
    """One linear ``y [..., N] = sum_i g_i * (B_i @ (h_i * x)) + b`` (``col_scale [k, K]``): the one-sibling case
    of :func:`residual_binary_linear_siblings_triton`, with the same keyword options."""
    validate_packed(packed_signs, row_scale, col_scale, bias, in_features)
    return residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale.unsqueeze(0), bias,
                                                  in_features, [packed_signs.shape[1]], out=out, kernel=kernel,
                                                  lut_bits=lut_bits, config=config, wrap=wrap)


__all__ = [
    "BITS_PER_WORD",
    "GEMV_LUT_BITS",
    "GEMV_MAX_ROWS",
    "LUT_BITS_CHOICES",
    "MAX_SEGMENTS",
    "KernelConfig",
    "choose_config",
    "launch_configs",
    "lut_table_configs",
    "gemm_config",
    "gemv_config",
    "residual_binary_linear_siblings_triton",
    "residual_binary_linear_triton",
    "word_align",
]
