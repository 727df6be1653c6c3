"""The lookup-table CPU kernel ``rabit::lut_gemv`` (kernels/cpu_lut.py, cpu_lut.cpp) against a float64 reference, on
every ISA path this CPU runs; its use by the op and by ``backend="rabit"``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import cpu_lut, ops
from rabit_compiler.kernels.cpu_lut import KERNEL_MAX_ROWS, uses_kernel
from rabit_compiler.kernels.packing import pack_signs, segment_starts, unpack_signs

from rabit_compiler import RaBiTConfig, quantize_

from .reference import RELATIVE_TOLERANCE, assert_close_scaled, packed_linear_float64
from .test_op import DTYPES

ISAS = cpu_lut.available_isas()


def random_siblings(paths, sizes, in_features, bias, scale_dtype, generator):
    """Random signs packed for ``sum(sizes)`` rows, row scales ``[k, N]``, column scales ``[S, k, K]``."""
    total = sum(sizes)
    signs = torch.where(torch.rand(paths, total, in_features, generator=generator) < 0.5, -1.0, 1.0)
    packed_signs = torch.stack([pack_signs(plane) for plane in signs])
    row_scale = (torch.rand(paths, total, generator=generator) + 0.1).to(scale_dtype)
    col_scale = (torch.rand(len(sizes), paths, in_features, generator=generator) + 0.1).to(scale_dtype)
    bias_values = torch.randn(total, generator=generator) if bias else None
    return packed_signs, row_scale, col_scale, bias_values


def expected_siblings(x, packed_signs, row_scale, col_scale, bias, in_features, sizes):
    """Float64 result and the magnitude of its terms, sibling by sibling."""
    outputs, scales, start = [], [], 0
    for segment, size in enumerate(sizes):
        rows = slice(start, start + size)
        start += size
        part_bias = None if bias is None else bias[rows]
        outputs.append(packed_linear_float64(x, packed_signs[:, rows], row_scale[:, rows], col_scale[segment],
                                             part_bias, in_features))
        scale = packed_linear_float64(x.abs(), torch.zeros_like(packed_signs[:, rows]), row_scale[:, rows],
                                      col_scale[segment], None, in_features)
        scales.append(scale if part_bias is None else scale + part_bias.double().abs())
    return torch.cat(outputs, -1), torch.cat(scales, -1)


def run_kernel(x, packed_signs, row_scale, col_scale, bias, in_features, sizes, precision, isa, threads=1,
               byte_planes=False):
    """The kernel's result, written into a NaN-poisoned output (so an element it never writes shows), the signs in
    either order (every path reads both)."""
    layout = cpu_lut.tiled_layout(packed_signs, row_scale, col_scale, bias, sizes, byte_planes=byte_planes)
    out = torch.full((*x.shape[:-1], sum(sizes)), float("nan"), dtype=x.dtype)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with cpu_lut.use_isa(isa):
            result = cpu_lut.lut_gemv(x, layout, sizes, in_features, precision, out=out)
    finally:
        torch.set_num_threads(previous_threads)
    assert result.data_ptr() == out.data_ptr()
    return out


def word_step_limit(words):
    """The kernel's largest integer step count of a word scale: int16, and no int32 overflow over W words."""
    return min(32767, (2**31 - 1) // (8 * 127 * words))


def int8_table_error_bound(x, row_scale, col_scale, in_features, sizes):
    """``sum_i |g[i, n]| * (sum_w 4 scale_w + W * 508 * unit)`` for each path i of row m, with ``scale_w = max_{q in
    w} sum_j |h x|[4q + j] / 127`` and ``unit = max_w scale_w / word_step_limit(W)``: each int8 entry is within half
    a step (``scale_w / 2``) of the fp32 entry and a row looks up 8 per word; each word scale is within ``unit / 2``
    of an integer number of units, and a word's 8 lookups add to at most 1016 steps. -> ``[M, N]`` float64."""
    rows = x.reshape(-1, in_features).double()
    words = -(-in_features // 32)
    parts = []
    for s, (start, end) in enumerate(zip(segment_starts(sizes)[:-1], segment_starts(sizes)[1:], strict=True)):
        v = (rows[:, None, :] * col_scale[s].double()[None]).abs()                       # [M, k, K]
        v = torch.nn.functional.pad(v, (0, 32 * words - in_features))
        scales = v.unflatten(-1, (words, 8, 4)).sum(-1).amax(-1) / 127                  # [M, k, W]
        unit = scales.amax(-1) / word_step_limit(words)                                  # [M, k]
        per_path = 4 * scales.sum(-1) + words * 508 * unit                               # [M, k]
        parts.append(per_path @ row_scale[:, start:end].double().abs())                  # [M, N_s]
    return torch.cat(parts, -1)


def assert_within_int8_bound(out, expected, scale, x, row_scale, col_scale, in_features, sizes):
    """An int8-table result: finite, and within the table-rounding bound (:func:`int8_table_error_bound`) plus the
    rounding of ``out``'s dtype of the float64 reference."""
    bound = int8_table_error_bound(x, row_scale, col_scale, in_features, sizes)
    error = (out.double() - expected).abs()
    assert torch.isfinite(out).all()
    assert (error <= bound * (1 + 1e-5) + RELATIVE_TOLERANCE[out.dtype] * scale).all(), \
        f"int8 tables: error {error.max().item():.3g} exceeds the table-rounding bound"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", cpu_lut.TABLE_PRECISIONS)
@given(
    paths=st.integers(1, 4),
    # whole words (fp32 x is then read in place) as well as any other width (converted and zero-padded)
    in_features=st.one_of(st.integers(1, 300), st.integers(1, 9).map(lambda words: 32 * words)),
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=3), rows=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES), scale_dtype=st.sampled_from(DTYPES), bias=st.booleans(),
    threads=st.sampled_from([1, 2]), byte_planes=st.booleans(), seed=st.integers(0, 2**31),
)
def test_lut_kernel_matches_float64(paths, in_features, sizes, rows, dtype, scale_dtype, bias, threads, byte_planes,
                                    precision, isa, seed):
    """fp32 tables: within fp32 accumulation error of the float64 reference (the bound of the sign-flip kernel,
    ``tests/reference.py``); int8 tables: within that plus the table-rounding bound of
    :func:`int8_table_error_bound`. Every output is written (poisoned first)."""
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, bias_values = random_siblings(paths, sizes, in_features, bias, scale_dtype,
                                                                      generator)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    out = run_kernel(x, packed_signs, row_scale, col_scale, bias_values, in_features, sizes, precision, isa, threads,
                     byte_planes)
    expected, scale = expected_siblings(x, packed_signs, row_scale, col_scale, bias_values, in_features, sizes)
    assert out.shape == expected.shape and out.dtype == dtype
    if precision == "fp32":
        assert_close_scaled(out, expected, scale, dtype)
        return
    assert_within_int8_bound(out, expected, scale, x, row_scale, col_scale, in_features, sizes)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale_dtype", DTYPES)
@pytest.mark.parametrize("byte_planes", [False, True])
def test_fp32_tables_are_exact_on_integers(isa, scale_dtype, byte_planes):
    """Integer-valued x, h, g and bias keep every table entry and partial sum an exact fp32 integer (all below
    2^24): the result equals the float64 reference bit for bit, so one misread nibble anywhere shows. The layer is
    large enough for the kernel to use both threads."""
    generator = torch.Generator().manual_seed(11)
    paths, sizes, in_features = 3, [37, 16, 5], 301
    packed_signs, _, _, _ = random_siblings(paths, sizes, in_features, False, torch.float32, generator)
    row_scale = torch.randint(-3, 4, (paths, sum(sizes)), generator=generator).to(scale_dtype)
    col_scale = torch.randint(-3, 4, (len(sizes), paths, in_features), generator=generator).to(scale_dtype)
    bias = torch.randint(-50, 51, (sum(sizes),), generator=generator).float()
    x = torch.randint(-4, 5, (4, in_features), generator=generator).float()
    out = run_kernel(x, packed_signs, row_scale, col_scale, bias, in_features, sizes, "fp32", isa, threads=2,
                     byte_planes=byte_planes)
    expected, _ = expected_siblings(x, packed_signs, row_scale, col_scale, bias, in_features, sizes)
    assert torch.equal(out.double(), expected)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("byte_planes", [False, True])
def test_int8_lookups_read_the_right_entries(isa, byte_planes):
    """One nonzero column per group of 4, at position ``q mod 4`` in group q, with h = g = 1 and the same integer
    value ``a`` in every group of a word (int8 tables have one scale per word): each table is ``+-a``, the word's
    largest entry, which int8 stores exactly (``+-127``, scale ``a/127``), and with ``a`` in 1..7 every word scale
    is a whole number of steps (``a * 4681`` of ``7 * 4681 = 32767``, the step limit of 8 words).
    The result is then the reference up to fp32 rounding of the scales (rtol 1e-6), while one misread nibble moves
    a sum by ``2a >= 2``; every bit position of the nibble is exercised."""
    in_features, sizes = 250, [40, 9]
    generator = torch.Generator().manual_seed(5)
    packed_signs, _, _, _ = random_siblings(2, sizes, in_features, False, torch.float32, generator)
    row_scale, col_scale = torch.ones(2, sum(sizes)), torch.ones(len(sizes), 2, in_features)
    columns = torch.arange(in_features)
    x = torch.where(columns % 4 == (columns // 4) % 4, 1.0 + (columns // 32) % 7, 0.0).repeat(2, 1)
    out = run_kernel(x, packed_signs, row_scale, col_scale, None, in_features, sizes, "int8", isa,
                     byte_planes=byte_planes)
    expected, _ = expected_siblings(x, packed_signs, row_scale, col_scale, None, in_features, sizes)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-4)


@pytest.mark.skipif(len(ISAS) < 2, reason="one ISA path on this CPU")
@given(
    paths=st.integers(1, 3), in_features=st.integers(1, 700), sizes=st.lists(st.integers(1, 50), min_size=1,
                                                                               max_size=3),
    rows=st.integers(1, 3), bias=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**31),
)
def test_int8_tables_give_the_same_bits_on_every_isa(paths, in_features, sizes, rows, bias, threads, seed):
    """With int8 tables a path's lookups are an exact int32 sum (``sum_w q_w * T8``), converted once, so every ISA
    path (and either sign order) gives the same bits: one lane or row out of place anywhere differs."""
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, bias_values = random_siblings(paths, sizes, in_features, bias,
                                                                      torch.float32, generator)
    x = torch.randn(rows, in_features, generator=generator)
    outputs = [run_kernel(x, packed_signs, row_scale, col_scale, bias_values, in_features, sizes, "int8", isa,
                          threads, byte_planes) for isa in ISAS for byte_planes in (False, True)]
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])


@given(
    paths=st.integers(2, 4), words=st.integers(97, 130), short_last_word=st.booleans(),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=3), rows=st.integers(1, 3), bias=st.booleans(),
    threads=st.sampled_from([1, 2]), byte_planes=st.booleans(), seed=st.integers(0, 2**31),
)
def test_long_rows_in_units_of_tiles(paths, words, short_last_word, sizes, rows, bias, threads, byte_planes, seed):
    """Long rows (k x W x 128 bytes of int8 tables > 24 KB: AVX-512 and AVX2 look tiles up in units of 8 and 4
    sharing each table load; full and partial units, several siblings): the same bits as the portable path (one
    tile at a time), and within the table-rounding bound of the float64 reference."""
    in_features = 32 * words - (5 if short_last_word else 0)
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, bias_values = random_siblings(paths, sizes, in_features, bias,
                                                                      torch.float32, generator)
    x = torch.randn(rows, in_features, generator=generator)
    outputs = [run_kernel(x, packed_signs, row_scale, col_scale, bias_values, in_features, sizes, "int8", isa,
                          threads, byte_planes) for isa in ISAS]
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])
    expected, scale = expected_siblings(x, packed_signs, row_scale, col_scale, bias_values, in_features, sizes)
    assert_within_int8_bound(outputs[-1], expected, scale, x, row_scale, col_scale, in_features, sizes)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize("in_features", [1000, 7990])
def test_two_threads_give_the_bits_of_one(isa, precision, in_features):
    """At 2 threads the units of tiles are shared out by stealing at the tail (``UnitQueue``), so which thread
    computes a tile changes from call to call with the threads' timing; the result must not: 25 calls on a layer
    large enough for both threads (short rows, one tile per unit, and long rows in units) equal one thread's bits."""
    generator = torch.Generator().manual_seed(in_features)
    sizes = [700, 130]
    packed_signs, row_scale, col_scale, bias = random_siblings(2, sizes, in_features, True, torch.float32,
                                                               generator)
    x = torch.randn(2, in_features, generator=generator)
    one_thread = run_kernel(x, packed_signs, row_scale, col_scale, bias, in_features, sizes, precision, isa)
    assert one_thread.isfinite().all()
    for _ in range(25):
        two_threads = run_kernel(x, packed_signs, row_scale, col_scale, bias, in_features, sizes, precision, isa,
                                 threads=2)
        assert torch.equal(two_threads, one_thread)


def test_results_the_caller_holds_are_never_overwritten():
    """The functional op hands out an earlier output again only once nothing else holds it or a view of it: results
    (and views) kept across later calls of the same shape keep their values."""
    generator = torch.Generator().manual_seed(3)
    sizes, in_features = [40, 24], 96
    packed_signs, row_scale, col_scale, bias = random_siblings(2, sizes, in_features, True, torch.float32, generator)
    layout = cpu_lut.tiled_layout(packed_signs, row_scale, col_scale, bias, sizes)
    xs = [torch.randn(1, in_features, generator=generator) for _ in range(4)]
    expected = [cpu_lut.lut_gemv(x, layout, sizes, in_features).clone() for x in xs]
    held = cpu_lut.lut_gemv(xs[0], layout, sizes, in_features)
    with torch.inference_mode():  # a view that does not reference its base tensor, only the storage
        view = cpu_lut.lut_gemv(xs[1], layout, sizes, in_features)[:, 5:]
    for _ in range(3):
        for x, want in zip(xs[2:], expected[2:], strict=True):
            assert torch.equal(cpu_lut.lut_gemv(x, layout, sizes, in_features), want)
    assert torch.equal(held, expected[0]) and torch.equal(view, expected[1][:, 5:])


def test_tiled_layout_places_each_word():
    """``tiled_signs[i, t, w, r]`` is word w of sibling row ``16 t' + r`` (t' counted within the sibling), zero in
    the rows that pad each sibling to a multiple of 16; row scales and bias follow the same tiles."""
    generator = torch.Generator().manual_seed(2)
    sizes = [20, 3]
    packed_signs, row_scale, col_scale, bias = random_siblings(2, sizes, 70, True, torch.float16, generator)
    layout = cpu_lut.tiled_layout(packed_signs, row_scale, col_scale, bias, sizes, byte_planes=False)
    assert layout.signs.shape == (2, 3, 3, 16) and layout.row_scale.shape == (2, 3, 16)
    assert torch.equal(layout.signs[:, 1, :, 3], packed_signs[:, 19])
    assert torch.equal(layout.signs[:, 2, :, 2], packed_signs[:, 22])
    assert not layout.signs[:, 1, :, 4:].any() and not layout.signs[:, 2, :, 3:].any()
    assert torch.equal(layout.row_scale[:, 2, :3], row_scale[:, 20:].float())
    assert torch.equal(layout.bias[1, :4], bias[16:20]) and not layout.bias[1, 4:].any()
    assert layout.col_scale.dtype == torch.float32 and torch.equal(layout.col_scale, col_scale.float())
    unpacked = unpack_signs(layout.signs.transpose(-1, -2), 70)
    assert unpacked.shape == (2, 3, 16, 70)


def test_byte_planes_hold_each_byte_position():
    """Byte planes: ``signs[i, t, w, 16 plane + r]`` is byte ``(0, 2, 1, 3)[plane]`` of the row word
    ``[i, t, w, r]``; byte planes are the order of AVX2 with int8 tables only."""
    generator = torch.Generator().manual_seed(4)
    sizes = [20, 3]
    packed_signs, row_scale, col_scale, bias = random_siblings(3, sizes, 70, True, torch.float32, generator)
    words = cpu_lut.tiled_layout(packed_signs, row_scale, col_scale, bias, sizes, byte_planes=False).signs
    planes = cpu_lut.tiled_layout(packed_signs, row_scale, col_scale, bias, sizes, byte_planes=True).signs
    assert planes.dtype == torch.uint8 and planes.shape == (3, 3, 3, 64)
    for plane, position in enumerate((0, 2, 1, 3)):
        assert torch.equal(planes[..., 16 * plane:16 * (plane + 1)].long(), (words.long() >> (8 * position)) & 255)
    assert [cpu_lut.byte_planes_for(precision, isa) for precision in cpu_lut.TABLE_PRECISIONS
            for isa in cpu_lut.ISA_PATHS] == [False, False, False, False, True, False]


def test_opcheck():
    """Schema, fake implementation and dispatch agree (``torch.library.opcheck``)."""
    generator = torch.Generator().manual_seed(3)
    sizes = [20, 13]
    packed_signs, row_scale, col_scale, bias = random_siblings(2, sizes, 45, True, torch.float16, generator)
    layout = cpu_lut.tiled_layout(packed_signs, row_scale, col_scale, bias, sizes)
    for precision in (False, True):
        torch.library.opcheck(torch.ops.rabit.lut_gemv.default,
                              (torch.randn(2, 45, generator=generator), layout.signs, layout.row_scale,
                               layout.col_scale, layout.bias, sizes, 45, precision))


def test_bad_inputs_raise_clear_errors():
    generator = torch.Generator().manual_seed(0)
    packed_signs, row_scale, col_scale, _ = random_siblings(2, [8], 40, False, torch.float32, generator)
    layout = cpu_lut.tiled_layout(packed_signs, row_scale, col_scale, None, [8])
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_lut.lut_gemv(torch.randn(1, 40, dtype=torch.float64), layout, [8], 40)
    with pytest.raises(RuntimeError, match="tiled_signs must be"):
        cpu_lut.lut_gemv(torch.randn(1, 40), cpu_lut.TiledLayout(packed_signs, layout.row_scale, layout.col_scale,
                                                                 None), [8], 40)
    with pytest.raises(RuntimeError, match="col_scale must be"):
        half_scales = cpu_lut.TiledLayout(layout.signs, layout.row_scale, col_scale.half(), None)
        cpu_lut.lut_gemv(torch.randn(1, 40), half_scales, [8], 40)
    with pytest.raises(RuntimeError, match="out must be"):
        cpu_lut.lut_gemv(torch.randn(2, 40), layout, [8], 40, out=torch.empty(1, 8))
    with pytest.raises(ValueError, match="table_precision"):
        cpu_lut.lut_gemv(torch.randn(1, 40), layout, [8], 40, "int4")
    with pytest.raises(ValueError, match="not available"):
        with cpu_lut.use_isa("neon"):
            pass


def test_op_uses_the_kernel_for_few_rows(monkeypatch):
    """The op's CPU kernel calls the LUT kernel (fp32 tables) up to KERNEL_MAX_ROWS rows of fp32/fp16/bf16, else the
    reference; the layout it derives is kept per packed tensor and derived again when the tensor changes."""
    calls = []
    kernel = ops.lut_linear_siblings
    monkeypatch.setattr(ops, "lut_linear_siblings", lambda *args: calls.append(args) or kernel(*args))
    generator = torch.Generator().manual_seed(0)
    packed_signs, row_scale, col_scale, _ = random_siblings(2, [40], 50, False, torch.float16, generator)
    for rows, dtype, uses in ((1, torch.float32, True), (KERNEL_MAX_ROWS, torch.bfloat16, True),
                              (KERNEL_MAX_ROWS + 1, torch.float32, False), (1, torch.float64, False)):
        calls.clear()
        x = torch.randn(rows, 50, generator=generator).to(dtype)
        out = torch.ops.rabit.residual_binary_linear(x, packed_signs, row_scale, col_scale[0], None, 50)
        assert bool(calls) == uses == uses_kernel(x, row_scale, col_scale)
        expected, scale = expected_siblings(x, packed_signs, row_scale, col_scale, None, 50, [40])
        assert_close_scaled(out, expected, scale, dtype)
    x = torch.randn(1, 50, generator=generator)
    layout = cpu_lut.cached_layout(packed_signs, row_scale, col_scale, None, [40])
    assert cpu_lut.cached_layout(packed_signs, row_scale, col_scale, None, [40]) is layout
    packed_signs.bitwise_not_()
    out = torch.ops.rabit.residual_binary_linear(x, packed_signs, row_scale, col_scale[0], None, 50)
    expected, scale = expected_siblings(x, packed_signs, row_scale, col_scale, None, 50, [40])
    assert_close_scaled(out, expected, scale, torch.float32)


class Block(torch.nn.Module):
    """Three projections of one input (fused by the backend) and one of their sum (not fused)."""

    def __init__(self, width: int):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(width, n) for n in (width, 24, 24))
        self.o = torch.nn.Linear(width + 48, width, bias=False)

    def forward(self, x):
        return self.o(torch.cat([self.q(x), self.k(x), self.v(x)], -1))


@pytest.mark.parametrize(("tables", "cpp_wrapper"), [("fp32", False), ("int8", True)])
def test_backend_kernel_calls_follow_in_place_buffer_updates(tables, cpp_wrapper):
    """``backend="rabit"`` on a ``quantize_``-packed model lowers its calls (3 rows: the kernel form) to
    ``rabit::lut_gemv`` on layouts derived at compile time; an in-place change of a module's packed tensors (a fused
    one and an unfused one) is derived again before the next call, never served stale. With Inductor's C++ wrapper
    the graph calls the operator from C++."""
    torch.manual_seed(0)
    model = Block(80).eval()
    quantize_(model, RaBiTConfig(skip=()), example_input=torch.randn(1, 80), progress=False)
    x = torch.randn(3, 80)
    compiled = torch.compile(model, backend="rabit", options={"cpu_tables": tables, "cpp_wrapper": cpp_wrapper})
    tolerance = {"fp32": 1e-5, "int8": 2e-2}[tables]
    torch.testing.assert_close(compiled(x), model(x), rtol=tolerance, atol=tolerance)
    with torch.no_grad():
        model.k.packed_signs.bitwise_not_()
        model.o.row_scale.mul_(-2)
        model.q.bias.add_(1)
    torch.testing.assert_close(compiled(x), model(x), rtol=tolerance, atol=tolerance)


def test_a_failed_build_raises_a_clear_error(monkeypatch, tmp_path):
    """A compiler failure is an error naming the kernel and the cause, never a silent fallback."""
    import torch._inductor.cpp_builder as cpp_builder
    import torch._inductor.runtime.cache_dir_utils as cache_dir_utils

    def fail(self):
        raise OSError("g++: not found")

    monkeypatch.setattr(cache_dir_utils, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(cpp_builder.CppBuilder, "build", fail)
    with pytest.raises(RuntimeError, match="building the CPU LUT kernel.*g\\+\\+: not found"):
        cpu_lut.cpp_build.build_library(cpu_lut._SOURCE, "CPU LUT kernel")
