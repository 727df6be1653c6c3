"""The Triton kernels (``kernels/triton_gemv.py``) run by Triton's interpreter on CPU, against a float64 reference.

TRITON_INTERPRET=1 is set before anything below imports triton; Triton reads it when ``@triton.jit`` decorates a
function (``triton.knobs.runtime.interpret``), and its own library functions are decorated when ``triton`` is
first imported. The launcher does not depend on it: for CPU tensors it wraps the kernels in the interpreter
itself, and the kernels call only Triton builtins, so these tests hold whichever module imported triton first.

Tolerance (``_assert_within_bound``), per output element, from a forward error bound of the computation:

    |y - y64| <= u_out * |y64| + (u_tile + (K + 8) * 2^-24) * S + tiny(dtype)

* ``y64``: the float64 result from the unpacked signs; ``S = sum_i |g_i| * (|h_i| . |x|) + |b|``, the sum of the
  magnitudes of all terms (so cancellation can neither make the bound vacuous nor impossible);
* ``u_out``: unit roundoff of the output dtype (one rounding of the fp32 result: 2^-24 fp32, 2^-11 fp16,
  2^-8 bf16);
* ``(K + 8) * 2^-24``: fp32 products and the fp32 sum of K terms, then the per-path scales and the bias
  (the worst case of recursive summation, gamma_n ~ n * 2^-24);
* ``u_tile``: the GEMM kernel rounds the dequantized weight ``sum_i g_i * (+-h_i)`` to x's dtype before the
  tensor-core product (0 for the GEMV kernel, which never rounds below fp32);
* ``tiny``: half the smallest subnormal of the output dtype (results that underflow).

Every output is filled with NaN before the launch, so an element a kernel never writes fails.

``RABIT_TEST_DEVICE=cuda`` runs the launches of the equivalence tests on the GPU, compiled (the GPU check,
``benchmarks/gpu_check.sh``): inputs are copied there, outputs back; the bounds are the same.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("RABIT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rabit_compiler.kernels.packing import pack_signs, unpack_signs, words_per_row  # noqa: E402

triton = pytest.importorskip("triton")
from rabit_compiler.kernels import triton_gemv  # noqa: E402
from rabit_compiler.kernels.interpret import interpreted  # noqa: E402
from rabit_compiler.kernels.triton_gemv import (  # noqa: E402
    GEMV_LUT_BITS,
    MAX_SEGMENTS,
    KernelConfig,
    choose_config,
    residual_binary_linear_siblings_triton,
    residual_binary_linear_triton,
    word_align,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF_SMALLEST_SUBNORMAL = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}


def _packed(paths, n, k, bias, dtype, scale_dtype, generator):
    signs = torch.where(torch.rand(paths, n, k, generator=generator) < 0.5, -1.0, 1.0)
    row = (torch.rand(paths, n, generator=generator) + 0.1).to(scale_dtype)
    col = (torch.rand(paths, k, generator=generator) + 0.1).to(scale_dtype)
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    return pack_signs(signs), row, col, b


def _packed_siblings(paths, out_features, k, bias, dtype, scale_dtype, generator):
    """S siblings: the packed rows and row scales concatenated, col_scale ``[S, k, K]``."""
    packed_signs, row_scale, _, b = _packed(paths, sum(out_features), k, bias, dtype, scale_dtype, generator)
    col = (torch.rand(len(out_features), paths, k, generator=generator) + 0.1).to(scale_dtype)
    return packed_signs, row_scale, col, b


def _segments(out_features):
    start = 0
    for size in out_features:
        yield slice(start, start + size)
        start += size


def _reference64(x, packed_signs, row_scale, col_scale, bias, k, out_features=None):
    """(y64, S): the float64 result from the unpacked signs and the magnitude of its terms. ``col_scale`` is
    ``[k, K]``, or ``[S, k, K]`` for siblings of ``out_features`` rows each."""
    if out_features is None:
        col_scale, out_features = col_scale[None], [packed_signs.shape[1]]
    signs = unpack_signs(packed_signs, k, torch.float64)
    g, xs = row_scale.double(), x.double().reshape(-1, k)
    y = torch.zeros(xs.shape[0], packed_signs.shape[1], dtype=torch.float64)
    scale = torch.zeros_like(y)
    for segment, rows in enumerate(_segments(out_features)):
        h = col_scale[segment].double()
        for i in range(packed_signs.shape[0]):
            y[:, rows] += ((xs * h[i]) @ signs[i, rows].T) * g[i, rows]
            scale[:, rows] += ((xs.abs() * h[i].abs()).sum(-1, keepdim=True)) * g[i, rows].abs()
    if bias is not None:
        y += bias.double()
        scale += bias.double().abs()
    shape = (*x.shape[:-1], packed_signs.shape[1])
    return y.reshape(shape), scale.reshape(shape)


def _assert_within_bound(out, x, packed_signs, row_scale, col_scale, bias, k, used_gemm, out_features=None):
    dtype = x.dtype
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], packed_signs.shape[1])
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    y64, scale = _reference64(x, packed_signs, row_scale, col_scale, bias, k, out_features)
    u_tile = UNIT_ROUNDOFF[dtype] if used_gemm else 0.0
    bound = (UNIT_ROUNDOFF[dtype] * y64.abs() + (u_tile + (k + 8) * 2.0**-24) * scale) * (1 + UNIT_ROUNDOFF[dtype])
    bound = bound + HALF_SMALLEST_SUBNORMAL[dtype]
    error = (out.double() - y64).abs()
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"error {error.max().item():.3g} exceeds the bound (worst ratio {worst:.3g})"


def _on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _run(x, packed_signs, row_scale, col_scale, bias, k, kernel=None, config=None, lut_bits=None):
    x, packed_signs, row_scale, col_scale, bias = _on_device(x, packed_signs, row_scale, col_scale, bias)
    out = torch.full((*x.shape[:-1], packed_signs.shape[1]), float("nan"), dtype=x.dtype, device=DEVICE)
    result = residual_binary_linear_triton(x, packed_signs, row_scale, col_scale, bias, k, out=out, kernel=kernel,
                                           config=config, lut_bits=lut_bits)
    assert result is out
    return out.cpu()


def _run_siblings(x, packed_signs, row_scale, col_scale, bias, k, out_features, kernel=None, lut_bits=None):
    x, packed_signs, row_scale, col_scale, bias = _on_device(x, packed_signs, row_scale, col_scale, bias)
    out = torch.full((*x.shape[:-1], packed_signs.shape[1]), float("nan"), dtype=x.dtype, device=DEVICE)
    result = residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, bias, k, out_features,
                                                    out=out, kernel=kernel, lut_bits=lut_bits)
    assert result is out
    return out.cpu()


@settings(deadline=None)
@given(
    paths=st.integers(1, 4), n=st.integers(1, 70), k=st.integers(1, 300), rows=st.integers(1, 16),
    dtype=st.sampled_from(DTYPES), scale_dtype=st.sampled_from(DTYPES), bias=st.booleans(),
    kernel=st.sampled_from([None, "gemv", "gemm"]), seed=st.integers(0, 2**31),
)
def test_kernels_match_float64_reference(paths, n, k, rows, dtype, scale_dtype, bias, kernel, seed):
    if kernel == "gemm" and dtype == torch.float32:
        kernel = "gemv"  # the GEMM kernel is fp16 / bf16 only (asserted in test_fp32_has_no_gemm_path)
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, b = _packed(paths, n, k, bias, dtype, scale_dtype, generator)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    out = _run(x, packed_signs, row_scale, col_scale, b, k, kernel=kernel)
    used = choose_config(rows, paths, dtype, kernel).kernel
    _assert_within_bound(out, x, packed_signs, row_scale, col_scale, b, k, used == "gemm")


@settings(deadline=None)
@given(
    paths=st.integers(1, 4), out_features=st.lists(st.integers(1, 50), min_size=1, max_size=3),
    k=st.integers(1, 300), rows=st.integers(1, 16), dtype=st.sampled_from(DTYPES),
    scale_dtype=st.sampled_from(DTYPES), bias=st.booleans(), kernel=st.sampled_from([None, "gemv", "gemm"]),
    seed=st.integers(0, 2**31),
)
def test_sibling_kernels_match_float64_reference(paths, out_features, k, rows, dtype, scale_dtype, bias, kernel,
                                                 seed):
    """S = 1..3 siblings of different N, each with its own column scales, in one launch."""
    if kernel == "gemm" and dtype == torch.float32:
        kernel = "gemv"
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, b = _packed_siblings(paths, out_features, k, bias, dtype, scale_dtype,
                                                             generator)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    out = _run_siblings(x, packed_signs, row_scale, col_scale, b, k, out_features, kernel=kernel)
    used = choose_config(rows, paths, dtype, kernel).kernel
    _assert_within_bound(out, x, packed_signs, row_scale, col_scale, b, k, used == "gemm", out_features)


@settings(deadline=None)
@given(
    paths=st.integers(1, 4), out_features=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    k=st.integers(1, 300), rows=st.integers(1, 5), dtype=st.sampled_from(DTYPES), scale_dtype=st.sampled_from(DTYPES),
    bias=st.booleans(), seed=st.integers(0, 2**31),
)
def test_lut_gemv_matches_float64_reference(paths, out_features, k, rows, dtype, scale_dtype, bias, seed):
    """The GEMV's lookup-table inner loop (lut_bits=4: a table kernel, then one lookup per nibble of sign bits):
    1..3 siblings, 1..5 rows (BLOCK_M 1 and 2, several programs along M), K and N not multiples of 32 or of the
    tiles. Same bound as the select loop: the tables are fp32 sums of 4 fp32 products."""
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, b = _packed_siblings(paths, out_features, k, bias, dtype, scale_dtype,
                                                             generator)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    assert choose_config(rows, paths, dtype, "gemv", lut_bits=4).lut_bits == 4
    out = _run_siblings(x, packed_signs, row_scale, col_scale, b, k, out_features, kernel="gemv", lut_bits=4)
    _assert_within_bound(out, x, packed_signs, row_scale, col_scale, b, k, False, out_features)


def test_lut_tables_hold_the_signed_partial_sums():
    """The table kernel alone: entry q of group g of path i is sum_j (bit j of q ? -1 : 1) h_i[4g+j] x[4g+j]
    (fp32 sums of fp32 products, so within a few ulps of float64); columns >= K, groups past the row's words and
    the padded path plane (k = 3 -> 4 planes) hold 0."""
    generator = torch.Generator().manual_seed(7)
    k, paths, rows, groups = 70, 3, 2, 32  # 3 words -> 24 groups, padded to one K block of 4 words
    x = torch.randn(rows, k, generator=generator).to(torch.float16)
    col_scale = (torch.rand(1, paths, k, generator=generator) + 0.1).to(torch.float16)
    tables = torch.full((rows * 4 * groups * 16,), float("nan"))
    interpreted(triton_gemv._rbl_lut_kernel)[(triton.cdiv(groups, triton_gemv.LUT_BLOCK_G), rows, 1)](
        x, col_scale, tables, rows, k, groups, x.stride(0), 0, NUM_PATHS=paths, PATHS_P2=4,
        BLOCK_G=triton_gemv.LUT_BLOCK_G)
    tables = tables.view(rows, 4, groups, 16).double()
    xh = torch.zeros(rows, 4, groups * 4, dtype=torch.float64)
    xh[:, :paths, :k] = x.double()[:, None, :] * col_scale[0].double()[None]
    signs = 1.0 - 2.0 * ((torch.arange(16)[:, None] >> torch.arange(4)[None, :]) & 1).double()  # [16, 4]
    expected = torch.einsum("mpgj,qj->mpgq", xh.view(rows, 4, groups, 4), signs)
    magnitude = torch.einsum("mpgj,qj->mpgq", xh.abs().view(rows, 4, groups, 4), signs.abs())
    assert torch.all((tables - expected).abs() <= 4 * 2.0**-24 * magnitude)
    assert torch.all(tables[:, paths:] == 0) and torch.all(tables[:, :, -(-k // 4):] == 0)


def test_lut_launches_trace_with_wrap_triton(monkeypatch):
    """The CUDA op path (kernels/ops.py passes ``wrap=torch.library.wrap_triton``) with tables, traced on fake
    tensors: per group of at most MAX_SEGMENTS siblings a table-kernel launch writes a ``torch.empty`` scratch
    that the GEMV launch after it reads; nothing else (no copy, no host synchronisation)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.library import wrap_triton
    from triton.runtime.jit import JITFunction

    for name, value in vars(triton_gemv).items():  # compiled kernels, though this module interprets them
        if hasattr(value, "fn") and not isinstance(value, JITFunction) and callable(value.fn):
            monkeypatch.setattr(triton_gemv, name, JITFunction(value.fn))
    out_features = [5, 12, 3, 7, 1, 2]
    packed_signs, row_scale, col_scale, b = _packed_siblings(2, out_features, 70, True, torch.float16,
                                                             torch.float16, torch.Generator().manual_seed(4))

    def body(x, packed_signs, row_scale, col_scale, bias):
        return residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, bias, 70, out_features,
                                                      lut_bits=4, wrap=wrap_triton)

    gm = make_fx(body, tracing_mode="fake")(torch.randn(1, 70).half(), packed_signs, row_scale, col_scale, b)
    launches = [node.kwargs["kwargs"] for node in gm.graph.nodes if node.op == "call_function"
                and node.target is torch.ops.higher_order.triton_kernel_wrapper_mutation]
    assert len(launches) == 2 * -(-len(out_features) // MAX_SEGMENTS)
    for table_launch, gemv_launch in zip(launches[::2], launches[1::2], strict=True):
        assert "num_groups" in table_launch and "LUT_BITS" in gemv_launch and gemv_launch["LUT_BITS"] == 4
        assert table_launch["lut_ptr"] is gemv_launch["lut_ptr"]
        assert table_launch["lut_ptr"].target is torch.ops.aten.empty.memory_format
    assert not any("copy" in str(node.target) or "item" in str(node.target) for node in gm.graph.nodes)


@pytest.mark.parametrize(("kernel", "dtype", "lut_bits"),
                         [("gemv", torch.float32, 0), ("gemv", torch.float16, 4), ("gemm", torch.bfloat16, 0)])
def test_more_siblings_than_one_launch_takes(kernel, dtype, lut_bits):
    """6 siblings (two launches of at most MAX_SEGMENTS), one of them empty, blocks of a segment spanning
    several programs; the sibling scales differ, so a block reading another segment's h (or, for the LUT GEMV,
    another segment's tables) would fail."""
    out_features = [70, 3, 0, 33, 129, 1]
    assert len(out_features) > MAX_SEGMENTS
    generator = torch.Generator().manual_seed(11)
    packed_signs, row_scale, col_scale, b = _packed_siblings(2, out_features, 100, True, dtype, torch.float16,
                                                             generator)
    col_scale *= torch.arange(1, len(out_features) + 1, dtype=col_scale.dtype)[:, None, None]
    x = torch.randn(3, 100, generator=generator).to(dtype)
    out = _run_siblings(x, packed_signs, row_scale, col_scale, b, 100, out_features, kernel=kernel, lut_bits=lut_bits)
    _assert_within_bound(out, x, packed_signs, row_scale, col_scale, b, 100, kernel == "gemm", out_features)


def test_siblings_equal_separate_launches():
    """One fused launch gives, bit for bit, what separate single launches give for each sibling (same tiles)."""
    out_features = [40, 17, 9]
    generator = torch.Generator().manual_seed(12)
    packed_signs, row_scale, col_scale, b = _packed_siblings(3, out_features, 90, True, torch.float16,
                                                             torch.float16, generator)
    x = torch.randn(1, 90, generator=generator).to(torch.float16)
    fused = _run_siblings(x, packed_signs, row_scale, col_scale, b, 90, out_features)
    for segment, rows in enumerate(_segments(out_features)):
        single = _run(x, packed_signs[:, rows].contiguous(), row_scale[:, rows], col_scale[segment], b[rows], 90)
        assert torch.equal(fused[:, rows], single)


def test_bad_sibling_inputs_raise_clear_errors():
    packed_signs, row_scale, col_scale, _ = _packed_siblings(2, [5, 3], 40, False, torch.float32, torch.float16,
                                                             torch.Generator().manual_seed(0))
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="sum to N_total=8"):
        residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, None, 40, [5, 4])
    with pytest.raises(ValueError, match=r"col_scale must be \[S=3"):
        residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, None, 40, [5, 2, 1])
    with pytest.raises(ValueError, match="at least one sibling"):
        residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, None, 40, [])


@pytest.mark.parametrize(
    ("kernel", "dtype", "paths", "rows", "n", "k"),
    [
        ("gemv", torch.float32, 1, 1, 300, 260),  # 3 blocks of 128 outputs, 3 K blocks (W = 9, WORD_ALIGN 1)
        ("gemv", torch.float16, 3, 5, 40, 200),  # 3 row blocks of 2, padded path (3 -> 4), W = 7
        ("gemm", torch.float16, 2, 20, 130, 384),  # the 64-row prefill tile, 2 N blocks, W = 12 (aligned)
        ("gemm", torch.bfloat16, 4, 70, 65, 100),  # 2 M blocks of 64, 2 N blocks of 64, W = 4
    ],
)
def test_multi_block_shapes(kernel, dtype, paths, rows, n, k):
    generator = torch.Generator().manual_seed(rows * n + k)
    packed_signs, row_scale, col_scale, b = _packed(paths, n, k, True, dtype, torch.float16, generator)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    out = _run(x, packed_signs, row_scale, col_scale, b, k, kernel=kernel)
    _assert_within_bound(out, x, packed_signs, row_scale, col_scale, b, k, kernel == "gemm")


@pytest.mark.parametrize(("kernel", "lut_bits"), [("gemv", 0), ("gemv", 4), ("gemm", 0)])
def test_padding_bits_never_change_the_result(kernel, lut_bits):
    """Set every bit past K in the last word of each row (the format stores 0 there): same output."""
    k = 70  # 3 words, 26 padding bits
    generator = torch.Generator().manual_seed(3)
    packed_signs, row_scale, col_scale, b = _packed(2, 33, k, True, torch.float16, torch.float16, generator)
    x = torch.randn(3, k, generator=generator).to(torch.float16)
    dirty = packed_signs.clone()
    dirty[..., -1] |= torch.tensor(-(1 << (k % 32)), dtype=torch.int32)  # bits k % 32 .. 31 of the last word
    assert not torch.equal(dirty, packed_signs)
    assert torch.equal(unpack_signs(dirty, k), unpack_signs(packed_signs, k))
    clean_out = _run(x, packed_signs, row_scale, col_scale, b, k, kernel=kernel, lut_bits=lut_bits)
    dirty_out = _run(x, dirty, row_scale, col_scale, b, k, kernel=kernel, lut_bits=lut_bits)
    assert torch.equal(clean_out, dirty_out)


def test_batch_shapes_and_non_contiguous_input():
    generator = torch.Generator().manual_seed(5)
    k, n = 96, 24
    packed_signs, row_scale, col_scale, b = _packed(2, n, k, False, torch.float32, torch.float16, generator)
    x = torch.randn(k, 3, 2, generator=generator).permute(1, 2, 0)  # [3, 2, K], last dim strided
    assert not x.is_contiguous()
    out = _run(x, packed_signs, row_scale, col_scale, None, k)
    assert out.shape == (3, 2, n)
    _assert_within_bound(out, x, packed_signs, row_scale, col_scale, None, k, False)


def test_empty_inputs():
    packed_signs, row_scale, col_scale, b = _packed(1, 8, 40, True, torch.float32, torch.float16,
                                                    torch.Generator().manual_seed(0))
    out = residual_binary_linear_triton(torch.randn(0, 40), packed_signs, row_scale, col_scale, b, 40)
    assert out.shape == (0, 8)
    empty = torch.zeros(1, 0, 0, dtype=torch.int32)
    out = residual_binary_linear_triton(torch.randn(2, 0), empty, torch.ones(1, 0), torch.ones(1, 0), None, 0)
    assert out.shape == (2, 0)
    none = torch.zeros(1, 3, 0, dtype=torch.int32)
    bias = torch.randn(3)
    out = residual_binary_linear_triton(torch.randn(2, 0), none, torch.ones(1, 3), torch.ones(1, 0), bias, 0)
    assert torch.equal(out, bias.expand(2, 3))


def test_bad_inputs_raise_clear_errors():
    packed_signs, row_scale, col_scale, _ = _packed(2, 8, 40, False, torch.float32, torch.float16,
                                                    torch.Generator().manual_seed(0))
    args = (packed_signs, row_scale, col_scale, None, 40)
    with pytest.raises(ValueError, match="40"):
        residual_binary_linear_triton(torch.randn(2, 39), *args)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        residual_binary_linear_triton(torch.randn(2, 40, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match="int32"):
        residual_binary_linear_triton(torch.randn(2, 40), packed_signs.float(), *args[1:])
    with pytest.raises(ValueError, match="col_scale"):
        residual_binary_linear_triton(torch.randn(2, 40), packed_signs, row_scale, col_scale[:, :39], None, 40)
    with pytest.raises(ValueError, match="1..4 paths"):
        residual_binary_linear_triton(torch.randn(2, 40), packed_signs.repeat(3, 1, 1), row_scale.repeat(3, 1),
                                      col_scale.repeat(3, 1), None, 40)
    with pytest.raises(ValueError, match="out must be"):
        residual_binary_linear_triton(torch.randn(2, 40), *args, out=torch.empty(2, 9))
    with pytest.raises(ValueError, match="kernel must be"):
        residual_binary_linear_triton(torch.randn(2, 40), *args, kernel="conv")
    with pytest.raises(ValueError, match="lut_bits must be one of"):
        residual_binary_linear_triton(torch.randn(2, 40), *args, lut_bits=8)
    with pytest.raises(ValueError, match="option of the GEMV"):
        residual_binary_linear_triton(torch.randn(2, 40).half(), *args, kernel="gemm", lut_bits=4)


def test_fp32_has_no_gemm_path():
    packed_signs, row_scale, col_scale, _ = _packed(2, 8, 40, False, torch.float32, torch.float16,
                                                    torch.Generator().manual_seed(0))
    assert choose_config(64, 2, torch.float32).kernel == "gemv"
    with pytest.raises(ValueError, match="fp16 / bf16"):
        residual_binary_linear_triton(torch.randn(2, 40), packed_signs, row_scale, col_scale, None, 40,
                                      kernel="gemm")


def test_config_choice():
    assert choose_config(1, 2, torch.float16).kernel == "gemv"
    assert choose_config(2, 2, torch.float16) == KernelConfig("gemv", 2, 32, 4, 2, lut_bits=GEMV_LUT_BITS)
    assert choose_config(2, 2, torch.float16, lut_bits=0).lut_bits == 0
    assert choose_config(64, 2, torch.float32).lut_bits == 0  # the tables grow with the rows of x
    assert choose_config(3, 2, torch.float16).kernel == "gemm"
    assert choose_config(16, 2, torch.float16, arch=89).num_stages == 1
    assert choose_config(17, 2, torch.bfloat16).block_m == 64
    assert [word_align(w) for w in (1, 2, 3, 4, 6, 8, 344)] == [1, 2, 1, 4, 2, 4, 4]
    assert words_per_row(11008) == 344  # an LLM K whose W is not a multiple of 16, but of 4


def test_every_launch_config_runs():
    """Each tile configuration listed for the AOT checks, launched once on tiny shapes (the interpreter ignores
    num_stages, so sm_89 and sm_90 variants that differ only there run once), with 1..MAX_SEGMENTS siblings in
    turn."""
    seen = set()
    for arch in (89, 90):
        for variant in triton_gemv.launch_configs(arch):
            cfg, dtype, constexprs = variant["config"], variant["dtype"], variant["constexprs"]
            key = (cfg.kernel, cfg.block_m, cfg.block_n, cfg.block_kw, cfg.num_warps, cfg.lut_bits, dtype,
                   constexprs["NUM_PATHS"])
            if key in seen:
                continue
            seen.add(key)
            num_segments = len(seen) % MAX_SEGMENTS + 1
            out_features = [5 + segment for segment in range(num_segments)]
            generator = torch.Generator().manual_seed(len(seen))
            packed_signs, row_scale, col_scale, b = _packed_siblings(constexprs["NUM_PATHS"], out_features, 130,
                                                                     True, dtype, torch.float16, generator)
            x = torch.randn(3, 130, generator=generator).to(dtype)
            out = torch.full((3, sum(out_features)), float("nan"), dtype=dtype)
            residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, b, 130, out_features,
                                                   out=out, config=cfg)
            _assert_within_bound(out, x, packed_signs, row_scale, col_scale, b, 130, cfg.kernel == "gemm",
                                 out_features)
    assert {n % MAX_SEGMENTS + 1 for n in range(1, len(seen) + 1)} == set(range(1, MAX_SEGMENTS + 1))
