"""CPU lowering of the packed linear (kernels/cpu_lowering.py, passes/lower.py) against a float64 reference."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from rabit_compiler.kernels.cpu_lowering import (
    cpu_form,
    residual_binary_linear_cpu,
    residual_binary_linear_siblings_cpu,
)
from rabit_compiler.kernels.cpu_lut import KERNEL_MAX_ROWS
from rabit_compiler.kernels.packing import segment_starts
from rabit_compiler.passes.lower import lower_for_cpu
from torch._inductor.compile_fx import compile_fx
from torch._inductor.utils import run_and_get_code

from .reference import assert_close_scaled, packed_linear_float64
from .test_op import DTYPES, random_packed

OPS = (torch.ops.rabit.residual_binary_linear, torch.ops.rabit.residual_binary_linear_siblings)


def expected_and_scale(x, packed_signs, row_scale, col_scale, bias, in_features):
    """The float64 result and the magnitude of the terms it sums (for :func:`assert_close_scaled`)."""
    expected = packed_linear_float64(x, packed_signs, row_scale, col_scale, bias, in_features)
    scale = packed_linear_float64(x.abs(), torch.zeros_like(packed_signs), row_scale, col_scale, None, in_features)
    return expected, scale if bias is None else scale + bias.double().abs()


class PackedLinears(torch.nn.Module):
    """Two packed linears (one with bias) and three siblings sharing their input, as the backend emits them."""

    def __init__(self, paths: int, in_features: int, out_features: list[int], dtype: torch.dtype, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.in_features = in_features
        self.out_features = out_features
        self.first = random_packed(paths, out_features[0], in_features, True, dtype, generator)
        self.second = random_packed(paths, out_features[1], in_features, False, dtype, generator)
        siblings = [random_packed(paths, n, in_features, True, dtype, generator) for n in out_features]
        self.register_buffer("sibling_signs", torch.cat([s.packed_signs for s in siblings], dim=1))
        self.register_buffer("sibling_rows", torch.cat([s.row_scale for s in siblings], dim=1))
        self.register_buffer("sibling_cols", torch.stack([s.col_scale for s in siblings]))
        self.register_buffer("sibling_bias", torch.cat([s.bias for s in siblings]))
        for name in ("first", "second"):
            packed = getattr(self, name)
            for tensor in ("packed_signs", "row_scale", "col_scale", "bias"):
                self.register_buffer(f"{name}_{tensor}", getattr(packed, tensor))

    def layer(self, name: str) -> tuple:
        return tuple(getattr(self, f"{name}_{t}") for t in ("packed_signs", "row_scale", "col_scale", "bias"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        first = torch.ops.rabit.residual_binary_linear(x, *self.layer("first"), self.in_features)
        second = torch.ops.rabit.residual_binary_linear(x, *self.layer("second"), self.in_features)
        siblings = torch.ops.rabit.residual_binary_linear_siblings(
            x, self.sibling_signs, self.sibling_rows, self.sibling_cols, self.sibling_bias, self.in_features,
            self.out_features)
        return first.relu(), second, siblings

    def expected(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(float64 result, scale) of each output."""
        first, scale = expected_and_scale(x, *self.layer("first"), self.in_features)
        parts = [
            expected_and_scale(x, self.sibling_signs[:, start:end], self.sibling_rows[:, start:end],
                               self.sibling_cols[s], self.sibling_bias[start:end], self.in_features)
            for s, (start, end) in enumerate(itertools.pairwise(segment_starts(self.out_features)))
        ]
        siblings = tuple(torch.cat(part, dim=-1) for part in zip(*parts, strict=True))
        return [(first.relu(), scale), expected_and_scale(x, *self.layer("second"), self.in_features), siblings]


def assert_outputs_close(outputs, module: PackedLinears, x: torch.Tensor, dtype: torch.dtype) -> None:
    for out, (expected, scale) in zip(outputs, module.expected(x), strict=True):
        assert out.dtype == dtype and out.shape == expected.shape
        assert_close_scaled(out, expected, scale, dtype)


@given(
    paths=st.integers(1, 4), n=st.integers(1, 70), k=st.integers(1, 100),
    batch=st.sampled_from([(1,), (3,), (16,), (2, 5)]), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
    form=st.sampled_from(["bitwise", "dense"]), seed=st.integers(0, 2**31),
)
def test_decomposition_matches_float64(paths, n, k, batch, dtype, bias, form, seed):
    generator = torch.Generator().manual_seed(seed)
    packed = random_packed(paths, n, k, bias, dtype, generator)
    x = torch.randn(*batch, k, generator=generator).to(dtype)
    args = (packed.packed_signs, packed.row_scale, packed.col_scale, packed.bias, k)
    out = residual_binary_linear_cpu(x, *args, form=form)
    expected, scale = expected_and_scale(x, *args)
    assert out.dtype == dtype and out.shape == (*batch, n)
    assert_close_scaled(out, expected, scale, dtype)


@given(
    paths=st.integers(1, 3), k=st.integers(1, 90), sizes=st.lists(st.integers(1, 40), min_size=2, max_size=3),
    rows=st.integers(1, 16), dtype=st.sampled_from(DTYPES), form=st.sampled_from(["bitwise", "dense"]),
    seed=st.integers(0, 2**31),
)
def test_sibling_decomposition_matches_float64(paths, k, sizes, rows, dtype, form, seed):
    module = PackedLinears(paths, k, sizes, dtype, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = residual_binary_linear_siblings_cpu(x, module.sibling_signs, module.sibling_rows, module.sibling_cols,
                                              module.sibling_bias, k, sizes, form=form)
    expected, scale = module.expected(x)[2]
    assert out.dtype == dtype and out.shape == (rows, sum(sizes))
    assert_close_scaled(out, expected, scale, dtype)


@settings(max_examples=4)  # each example is an Inductor compile (C++ kernels): seconds on 2 cores
@given(
    paths=st.integers(1, 4), k=st.integers(1, 100), sizes=st.lists(st.integers(1, 40), min_size=2, max_size=3),
    rows=st.sampled_from([1, 2, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 16]), dtype=st.sampled_from(DTYPES),
    form=st.sampled_from([None, "kernel", "bitwise", "dense"]), seed=st.integers(0, 2**31),
)
def test_lowered_graph_compiled_by_inductor_matches_float64(paths, k, sizes, rows, dtype, form, seed):
    """Every op call becomes its form (forced, or :func:`cpu_form` of its rows and size): the C++ kernel's op or
    a decomposition; the graph, eager and through Inductor, equals the reference."""
    module = PackedLinears(paths, k, sizes, dtype, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    gm = fx.symbolic_trace(module)
    calls = lower_for_cpu(gm, [x], form=form)
    assert [call.reason for call in calls] == [None] * 3
    assert [call.form for call in calls] == [form or cpu_form(rows)] * 3  # first, second, the siblings call
    targets = [getattr(node.target, "overloadpacket", node.target) for node in gm.graph.nodes]
    assert not [target for target in targets if target in OPS]
    kernel_calls = [call for call in calls if call.form == "kernel"]
    assert targets.count(torch.ops.rabit.lut_gemv) == len(kernel_calls)
    assert_outputs_close(gm(x), module, x, dtype)
    assert_outputs_close(compile_fx(gm, [x])(x), module, x, dtype)


def test_cpu_form_by_rows():
    """Up to KERNEL_MAX_ROWS rows take the C++ LUT kernel; more rows the dense form."""
    assert cpu_form(1) == cpu_form(KERNEL_MAX_ROWS) == "kernel"
    assert cpu_form(KERNEL_MAX_ROWS + 1) == cpu_form(128) == "dense"


def test_dynamo_backend_with_symbolic_rows():
    """Through ``torch.compile`` with a dynamic row count: the choice made for the hint stays correct."""
    module = PackedLinears(2, 75, [33, 8], torch.float32, seed=3)
    lowered = []

    def backend(gm, example_inputs):
        lowered.append(lower_for_cpu(gm, example_inputs))
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(module, backend=backend, dynamic=True)
    for rows in (1, 7, 2):
        x = torch.randn(rows, 75)
        assert_outputs_close(compiled(x), module, x, torch.float32)
    assert lowered and all(call.form is not None for calls in lowered for call in calls)


def _allocated_numels(code: str) -> list[int]:
    """Element counts of every buffer the Inductor wrapper allocates (``empty_strided_cpu((a, b, ..), ...)``)."""
    shapes = re.findall(r"empty_strided(?:_cpu)?\(\(([^)]*)\)", code)
    return [math.prod(int(d) for d in shape.replace(" ", "").split(",") if d) for shape in shapes]


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="no SIMD: nothing to vectorize")
def test_bitwise_form_is_one_vectorized_kernel_without_weight_sized_buffers():
    """Inductor's code for the bitwise form: vectorized C++, no matmul call, no buffer of N*K elements."""
    out_features, in_features = 96, 200
    module = PackedLinears(2, in_features, [out_features, out_features], torch.float32, seed=5)
    x = torch.randn(1, in_features)
    gm = fx.symbolic_trace(module)
    assert {call.form for call in lower_for_cpu(gm, [x], form="bitwise")} == {"bitwise"}
    outputs, codes = run_and_get_code(lambda: compile_fx(gm, [x])(x))
    assert_outputs_close(outputs, module, x, torch.float32)
    code = "\n".join(codes)
    assert "at::vec::Vectorized" in code
    assert not re.search(r"extern_kernels\.(mm|addmm|bmm)|aten\.mm|mkl", code)
    numels = _allocated_numels(code)
    assert numels, "no buffer allocation found: the pattern no longer matches Inductor's wrapper"
    assert max(numels) < out_features * in_features
