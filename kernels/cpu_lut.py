"""The lookup-table (LUT) CPU kernel of the packed residual-binary linear for decode: the C++ operator
``rabit::lut_gemv`` (source: ``cpu_lut.cpp``).

For ``x [M, K]``, S siblings sharing it (format v1, :mod:`.packing`: ``packed_signs`` int32 ``[k, N, W = ceil(K/32)]``,
bit ``j`` of word ``w`` is column ``32 w + j``, set = -1; ``row_scale g [k, N]``; ``col_scale h [S, k, K]``; sibling s
owns rows ``N_1 + .. + N_{s-1} <= n < N_1 + .. + N_s``; bias ``b [N]`` or None)::

    v[m, s, i, c]     = h[s, i, c] * x[m, c]                               (0 for K <= c < 32 W)
    E[m, s, i, q][e]  = sum_{j<4} (-1)^(bit j of e) * v[m, s, i, 4 q + j]   (a table of 16 entries per 4 columns)
    y[m, n]           = b[n] + sum_i g[i, n] * sum_q E[m, s(n), i, q][nibble_q(sign plane i, row n)]

Nibble ``q`` of a row's signs (bits ``4q .. 4q+3``, columns ``4q .. 4q+3``) is exactly the index ``e`` of the entry
with those signs, so one lookup replaces 4 sign flips and 4 additions. The tables are built once per call (per row
of x, sibling and path: ``16 K / 4`` entries), then shared by every output row. Tables:

* **fp32** (exact mode): each entry is summed in fp32 in one fixed order, ``((+-v0 +- v1) +- v2) +- v3``, and so are
  the lookups: the error is fp32 accumulation error (the bound of the sign-flip kernel); with integer-valued
  ``x``, ``h``, ``g`` and sums below ``2^24`` the result is exact.
* **int8**: per 32 columns (one packed word ``w``, 8 groups) ``scale_w = max_q sum_j |v[4q + j]| / 127`` (the
  largest ``|E|`` of the word) and each entry is rounded to the nearest integer multiple of it. The word scales of
  one table set (m, s, i) are in turn whole numbers ``q_w`` of one ``unit = max_w scale_w / L``, ``L = min(32767,
  (2^31 - 1) // (1016 W))``, so a path's lookups are one exact int32 sum ``sum_w q_w * sum_{q in w} T8`` (no
  overflow: a word's 8 lookups are at most 1016), converted to fp32 once: the same bits on every ISA path, and no
  conversion per word. A lookup is off by at most ``scale_w / 2`` and a word scale by at most ``unit / 2``, so per
  output ``|y_int8 - y_fp32| <= sum_i |g[i, n]| * (sum_w 4 scale_w + 508 W unit)`` (8 lookups per word; the second
  term weighs what ~4.7 of the first term's 280 words do at K = 8960 if their scales are alike, ~0.2 of 48 at
  K = 1536). On AVX-512 one ``vpermb`` does 64 lookups, ``vpdpbusd`` adds them in int32 and ``vpdpwssd`` adds
  ``q_w`` times that to the total; on AVX2 a 16-row word is in byte planes, each 128-bit lane one byte position of
  the 16 rows, 4 ``vpshufb`` do its 512 lookups and ``vpmaddwd`` multiplies by ``q_w`` and widens. When a call's
  int8 tables outgrow L1 (``k * W * 128`` bytes over 24 KB, e.g. ``down_proj``'s K = 8960), both look up several
  tiles of a sibling at a time (8 on AVX-512, 4 on AVX2), each word's tables loaded once for all of them (the
  sums, hence the bits, are the same).

The kernel reads the signs in a **tiled layout** derived once from format v1 by :func:`tiled_layout` (the on-disk
format is unchanged): rows in tiles of 16 per sibling (zero rows pad each sibling to a multiple of 16), and within a
tile the 64 bytes of word ``w`` of its 16 rows together, in one of two orders: **row words** (int32
``[k, tiles, W, 16]``: one 512-bit load holds one row per 32-bit lane, what the AVX-512 and fp32 lookups want) or
**byte planes** (uint8 ``[k, tiles, W, 64]``: byte position ``p`` of the 16 rows in plane ``(0, 2, 1, 3)[p]``, what
the AVX2 int8 lookups want: each 128-bit lane one position, no transpose per word). Every path reads both orders
(converting in registers); the backend picks the active path's (:func:`byte_planes_for`). ``g`` and ``b`` in the
same tiles as fp32 (``[k, tiles, 16]``, ``[tiles, 16]``), ``h`` as fp32 ``[S, k, K]``. The compiled graph holds
these (:mod:`rabit_compiler.passes.lower`), so a call does no layout work; the eager op keeps them (row words) per
packed tensor (:func:`cached_layout`, derived again when a tensor changes).

ISA paths, picked at run time from the CPU: ``"avx512"`` (AVX-512 F/BW with VBMI and VNNI), ``"avx2"`` (AVX2 and FMA;
``vpshufb``, one 16-entry table per 128-bit lane) and ``"portable"`` (plain C++); :func:`use_isa` forces a slower
one (tests). The library is built on first use by Inductor's own C++ toolchain and loaded as a real dispatcher
operator with no Python in its call path (:mod:`.cpp_build`); a failed build raises (never a silent fallback).
"""

from __future__ import annotations

import contextlib
import ctypes
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cpp_build
from .packing import segment_starts

OP_NAME = "rabit::lut_gemv"
# the op's AOTInductor C shim (cpu_lut.cpp), for aot_inductor.custom_ops_to_c_shims
C_SHIM = ("AOTITorchError aoti_torch_cpu_lut_gemv(AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, "
          "AtenTensorHandle, AtenTensorHandle*, const int64_t*, int64_t, int64_t, int32_t, AtenTensorHandle*)")
TILE_ROWS = 16
_PLANE_POSITIONS = (0, 2, 1, 3)  # byte position of each byte plane (the planes' order)
# Largest number of rows (prod of x.shape[:-1]) for which the op's CPU kernel and the backend use this kernel; more
# rows unpack the weight once and use the matmul library (``"dense"`` in :mod:`.cpu_lowering`). Measured (1 thread,
# us per 576x576 layer, fp32 tables / int8 tables / dense): 8 rows 89/54/495, 32 rows 356/178/635, 64 rows 749/333/856.
KERNEL_MAX_ROWS = 32
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # x and scale dtypes the kernel takes
ISA_PATHS = ("portable", "avx2", "avx512")  # index = the C++ enum
TABLE_PRECISIONS = ("fp32", "int8")
DEFAULT_TABLE_PRECISION = "fp32"  # the backend's default (options={"cpu_tables": ...})
_SOURCE = Path(__file__).with_name("cpu_lut.cpp")


def load_library() -> ctypes.CDLL:
    """Build if needed and load ``rabit::lut_gemv`` (idempotent, :mod:`.cpp_build`); the library, for the ISA
    controls."""
    return cpp_build.load_library(_SOURCE, "CPU LUT kernel", {OP_NAME: _lut_gemv_fake})


def _lut_gemv_fake(x, tiled_signs, tiled_row_scale, col_scale, tiled_bias, out_features, in_features, int8_tables):
    return x.new_empty(*x.shape[:-1], sum(out_features))


def available_isas() -> tuple[str, ...]:
    """The ISA paths this CPU runs, slowest first (the last is the default)."""
    return ISA_PATHS[:load_library().rabit_lut_best_isa() + 1]


def active_isa() -> str:
    """The ISA path the kernel uses now."""
    return ISA_PATHS[load_library().rabit_lut_isa()]


@contextlib.contextmanager
def use_isa(isa: str) -> Iterator[None]:
    """Run the kernel on ``isa`` (one of :data:`ISA_PATHS` this CPU runs) inside the block."""
    if isa not in available_isas():
        raise ValueError(f"ISA path {isa!r} is not available here; this CPU runs {available_isas()}")
    library = load_library()
    previous = library.rabit_lut_isa()
    library.rabit_lut_set_isa(ISA_PATHS.index(isa))
    try:
        yield
    finally:
        library.rabit_lut_set_isa(previous)


@dataclass
class TiledLayout:
    """A packed (siblings) layer in the kernel's layout: ``signs`` int32 ``[k, tiles, W, 16]`` (row words) or
    uint8 ``[k, tiles, W, 64]`` (byte planes), ``row_scale`` fp32
    ``[k, tiles, 16]``, ``col_scale`` fp32 ``[S, k, K]``, ``bias`` fp32 ``[tiles, 16]`` or None (zero in the
    padding rows)."""

    signs: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor
    bias: torch.Tensor | None


def _tiles(tensor: torch.Tensor, out_features: Sequence[int], dim: int) -> torch.Tensor:
    """Split ``tensor`` along ``dim`` into the siblings' rows, pad each to a multiple of 16 with zeros, unflatten
    ``dim`` into ``(tiles, 16)`` and concatenate the siblings' tiles."""
    parts = []
    for start, end in zip(segment_starts(out_features)[:-1], segment_starts(out_features)[1:], strict=True):
        part = tensor.narrow(dim, start, end - start)
        pad = -(end - start) % TILE_ROWS
        shape = list(part.shape)
        shape[dim] = pad
        part = torch.cat([part, part.new_zeros(shape)], dim)
        parts.append(part.unflatten(dim, (-1, TILE_ROWS)))
    return torch.cat(parts, dim)


def byte_planes_for(table_precision: str, isa: str | None = None) -> bool:
    """Whether the lookups of ``isa`` (default: the active path) with ``table_precision`` tables read the signs
    as byte planes without reordering them (AVX2 int8); every other pair wants row words."""
    return table_precision == "int8" and (isa or active_isa()) == "avx2"


def tiled_layout(packed_signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_features: Sequence[int], byte_planes: bool = False) -> TiledLayout:
    """The kernel's layout of ``packed_signs [k, N, W]``, ``row_scale [k, N]``, ``col_scale [S, k, K]`` (or
    ``[k, K]`` for one linear), ``bias [N]`` (siblings of ``out_features`` rows), the signs as row words or byte
    planes (:func:`byte_planes_for` says which a call reads fastest); see the module docstring."""
    signs = _tiles(packed_signs, out_features, 1).transpose(-1, -2).contiguous()  # [k, tiles, W, 16]
    if byte_planes:
        planes = signs.view(torch.uint8).unflatten(-1, (TILE_ROWS, 4)).transpose(-1, -2)  # [k, tiles, W, 4, 16]
        signs = planes[..., list(_PLANE_POSITIONS), :].flatten(-2).contiguous()
    row_scales = _tiles(row_scale.float(), out_features, 1).contiguous()
    col_scales = col_scale.float().reshape(len(out_features), *col_scale.shape[-2:]).contiguous()
    tiled_bias = None if bias is None else _tiles(bias.float(), out_features, 0).contiguous()
    return TiledLayout(signs, row_scales, col_scales, tiled_bias)


def supports(x: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor) -> bool:
    """The kernel takes these: CPU ``x`` and scales of fp32/fp16/bf16 (any mix)."""
    return (x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and row_scale.dtype in KERNEL_DTYPES
            and col_scale.dtype in KERNEL_DTYPES)


def few_rows(x: torch.Tensor) -> bool:
    """At most :data:`KERNEL_MAX_ROWS` rows (prod of ``x.shape[:-1]``): the kernel beats unpack + matmul."""
    return x.numel() <= KERNEL_MAX_ROWS * max(x.shape[-1], 1)


def uses_kernel(x: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor) -> bool:
    """The op's CPU kernel runs this kernel: supported dtypes (:func:`supports`) and few rows (:func:`few_rows`)."""
    return supports(x, row_scale, col_scale) and few_rows(x)


_CACHE: dict[int, tuple[tuple, TiledLayout]] = {}


def cached_layout(packed_signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_features: Sequence[int]) -> TiledLayout:
    """:func:`tiled_layout`, kept per ``packed_signs`` tensor (dropped with it) and derived again only when one of
    the tensors is replaced or modified in place (its version counter)."""
    tensors = (packed_signs, row_scale, col_scale, bias)
    key = (tuple(out_features), *((id(t), t._version) for t in tensors if t is not None))
    entry = _CACHE.get(id(packed_signs))
    if entry is None or entry[0] != key:
        if entry is None:
            weakref.finalize(packed_signs, _CACHE.pop, id(packed_signs), None)
        entry = _CACHE[id(packed_signs)] = (key, tiled_layout(*tensors, out_features))
    return entry[1]


def lut_linear_siblings(x: torch.Tensor, packed_signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                        bias: torch.Tensor | None, in_features: int, out_features: Sequence[int],
                        table_precision: str = "fp32") -> torch.Tensor:
    """S siblings in format v1 (``packed_signs [k, N_total, W]``, ``row_scale [k, N_total]``, ``col_scale [S, k,
    K]``, ``bias [N_total]``) by the kernel, the layout from :func:`cached_layout` -> ``[..., N_total]``."""
    layout = cached_layout(packed_signs, row_scale, col_scale, bias, out_features)
    return lut_gemv(x, layout, out_features, in_features, table_precision)


def lut_gemv(x: torch.Tensor, layout: TiledLayout, out_features: Sequence[int], in_features: int,
             table_precision: str = "fp32", out: torch.Tensor | None = None) -> torch.Tensor:
    """``rabit::lut_gemv``: S siblings (one linear is ``S = 1``) in ``layout`` on ``x [..., K]`` ->
    ``[..., sum(out_features)]`` in ``x.dtype``, with ``table_precision`` ``"fp32"`` or ``"int8"``; written into
    ``out`` (contiguous, that shape and dtype) if given."""
    if table_precision not in TABLE_PRECISIONS:
        raise ValueError(f"table_precision must be one of {TABLE_PRECISIONS}, got {table_precision!r}")
    load_library()
    args = (x, layout.signs, layout.row_scale, layout.col_scale, layout.bias, list(out_features), in_features,
            table_precision == "int8")
    if out is None:
        return torch.ops.rabit.lut_gemv(*args)
    return torch.ops.rabit.lut_gemv.out(*args, out=out)
