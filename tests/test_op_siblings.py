"""``rabit::residual_binary_linear_siblings`` (CPU reference) and the ``triton_op`` wiring of both ops.

The sibling op is S linears sharing x with rows concatenated; each segment must equal the float64 result of its
own linear (its rows of the packed tensors, its own column scales). The triton_op checks: on CPU the op stays one
opaque call through AOTAutograd (its CPU kernel is the reference), and the CUDA body traces, with symbolic batch
sizes, into Triton kernel launches (``triton_kernel_wrapper_mutation``) -- checked here on fake CPU tensors,
since this machine has no GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import pack_paths, unpack_signs
from rabit_compiler.kernels.ops import residual_binary_linear, residual_binary_linear_siblings

from .reference import assert_close_scaled, packed_linear_float64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_siblings(paths, out_features, k, bias, dtype, generator):
    """(packed_signs [k, N_total, W], row_scale [k, N_total], col_scale [S, k, K], bias [N_total] | None)."""
    total = sum(out_features)
    signs = torch.where(torch.rand(paths, total, k, generator=generator) < 0.5, -1.0, 1.0)
    row = torch.rand(paths, total, generator=generator) + 0.1
    col = torch.rand(len(out_features), paths, k, generator=generator) + 0.1
    b = torch.randn(total, generator=generator).to(dtype) if bias else None
    packed = pack_paths(signs, row, col[0], b, scale_dtype=torch.float16)
    return packed.packed_signs, packed.row_scale, col.to(torch.float16), b


def _segments(out_features):
    start = 0
    for size in out_features:
        yield slice(start, start + size)
        start += size


@given(
    paths=st.integers(1, 4), out_features=st.lists(st.integers(0, 40), min_size=1, max_size=3).filter(sum),
    k=st.integers(1, 100), batch=st.sampled_from([(1,), (3,), (2, 5)]), dtype=st.sampled_from(DTYPES),
    bias=st.booleans(), seed=st.integers(0, 2**31),
)
def test_siblings_op_matches_each_linear_in_float64(paths, out_features, k, batch, dtype, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, b = random_siblings(paths, out_features, k, bias, dtype, generator)
    x = torch.randn(*batch, k, generator=generator).to(dtype)
    out = torch.ops.rabit.residual_binary_linear_siblings(x, packed_signs, row_scale, col_scale, b, k, out_features)
    assert out.dtype == dtype and out.shape == (*batch, sum(out_features))
    for segment, rows in enumerate(_segments(out_features)):
        seg_bias = None if b is None else b[rows]
        args = (packed_signs[:, rows], row_scale[:, rows], col_scale[segment], seg_bias, k)
        expected = packed_linear_float64(x, *args)
        scale = packed_linear_float64(x.abs(), torch.zeros_like(args[0]), args[1], args[2], None, k)
        if seg_bias is not None:
            scale = scale + seg_bias.double().abs()
        assert_close_scaled(out[..., rows], expected, scale, dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_siblings_opcheck(bias):
    generator = torch.Generator().manual_seed(0)
    packed_signs, row_scale, col_scale, b = random_siblings(2, [9, 4, 20], 70, bias, torch.float32, generator)
    x = torch.randn(3, 70, generator=generator, requires_grad=True)
    torch.library.opcheck(residual_binary_linear_siblings,
                          (x, packed_signs, row_scale.float(), col_scale.float(), b, 70, [9, 4, 20]))


def test_siblings_gradients_match_dense():
    generator = torch.Generator().manual_seed(1)
    out_features = [7, 12]
    packed_signs, row_scale, col_scale, b = random_siblings(2, out_features, 45, True, torch.float64, generator)
    x = torch.randn(4, 45, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = b.clone().requires_grad_(True)
    out = residual_binary_linear_siblings(x, packed_signs, row_scale, col_scale, bias, 45, out_features)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    weights = []
    for segment, rows in enumerate(_segments(out_features)):
        unpacked = unpack_signs(packed_signs[:, rows], 45, torch.float64)
        weights.append((row_scale[:, rows].double()[:, :, None] * unpacked
                        * col_scale[segment].double()[:, None, :]).sum(0))
    weight = torch.cat(weights)
    torch.testing.assert_close(out, x @ weight.T + b.double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, grad_out @ weight)
    torch.testing.assert_close(bias.grad, grad_out.sum(0))


def test_ops_stay_opaque_under_aot_autograd_on_cpu():
    """triton_op would let AOTAutograd trace into the body; on CPU the op must stay one call (the reference)."""
    from torch._dynamo.backends.common import aot_autograd

    generator = torch.Generator().manual_seed(2)
    packed_signs, row_scale, col_scale, b = random_siblings(2, [8, 8], 64, True, torch.float32, generator)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def f(x):
        fused = residual_binary_linear_siblings(x, packed_signs, row_scale, col_scale, b, 64, [8, 8])
        single = residual_binary_linear(x, packed_signs, row_scale, col_scale[0], b, 64)
        return fused + single

    x = torch.randn(3, 64, generator=generator)
    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=capture), fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert torch.ops.rabit.residual_binary_linear_siblings.default in targets
    assert torch.ops.rabit.residual_binary_linear.default in targets
    assert not any("triton" in str(t) for t in targets)


def test_cuda_body_traces_into_triton_launches(monkeypatch):
    """The launcher the ops' CUDA branch calls, traced with wrap_triton on fake tensors and a symbolic batch:
    one kernel launch per group of at most MAX_SEGMENTS siblings, with the segment bounds as arguments."""
    from rabit_compiler.kernels import triton_gemv
    from rabit_compiler.kernels.triton_gemv import MAX_SEGMENTS, residual_binary_linear_siblings_triton
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.library import wrap_triton
    from triton.runtime.jit import JITFunction

    # compiled kernels and helpers, even if another test module imported them under TRITON_INTERPRET=1
    for name in ("_rbl_gemv_kernel", "_rbl_gemm_kernel", "_segment_block", "_advance_segment", "_SUM"):
        kernel = getattr(triton_gemv, name)
        if not isinstance(kernel, JITFunction):
            monkeypatch.setattr(triton_gemv, name, JITFunction(kernel.fn))

    out_features = [5, 12, 3, 7, 1, 2]
    generator = torch.Generator().manual_seed(3)
    packed_signs, row_scale, col_scale, b = random_siblings(2, out_features, 70, True, torch.float16, generator)

    def body(x, packed_signs, row_scale, col_scale, bias):
        return residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, bias, 70, out_features,
                                                      wrap=wrap_triton)

    x = torch.randn(5, 70, generator=generator).to(torch.float16)
    gm = make_fx(body, tracing_mode="symbolic")(x, packed_signs, row_scale, col_scale, b)
    launches = [node for node in gm.graph.nodes if node.op == "call_function"
                and node.target is torch.ops.higher_order.triton_kernel_wrapper_mutation]
    assert len(launches) == -(-len(out_features) // MAX_SEGMENTS)
    first, second = (node.kwargs["kwargs"] for node in launches)
    assert [first[f"bound{i}"] for i in range(5)] == [0, 5, 17, 20, 27]
    assert [second[f"bound{i}"] for i in range(5)] == [27, 28, 30, 30, 30]
    assert (first["NUM_SEGMENTS"], second["NUM_SEGMENTS"], second["segment_base"]) == (4, 2, 4)
    assert isinstance(first["M"], torch.fx.Node), "the batch size must stay symbolic"


def test_bad_sibling_inputs_raise_clear_errors():
    packed_signs, row_scale, col_scale, _ = random_siblings(2, [5, 3], 40, False, torch.float32,
                                                            torch.Generator().manual_seed(0))
    x = torch.randn(2, 40)
    with pytest.raises(RuntimeError, match="sum to N_total=8"):
        residual_binary_linear_siblings(x, packed_signs, row_scale, col_scale, None, 40, [5, 4])
    with pytest.raises(RuntimeError, match=r"col_scale must be \[S=3"):
        residual_binary_linear_siblings(x, packed_signs, row_scale, col_scale, None, 40, [5, 2, 1])
    with pytest.raises(RuntimeError, match="40"):
        residual_binary_linear_siblings(torch.randn(2, 39), packed_signs, row_scale, col_scale, None, 40, [5, 3])
