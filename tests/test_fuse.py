"""The *fuse siblings* pass: packed linears sharing an input become one siblings op, with the same function."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.passes import freeze_and_pack
from rabit_compiler.passes.fuse import fuse_siblings
from rabit_compiler.passes.graph_edit import op_name

from rabit_compiler import RaBiTConfig, quantize_
from rabit_compiler.backend import rabit_backend
from rabit_compiler.quantizer import fit_weight, pack_fit

SINGLE_OP = "rabit::residual_binary_linear"
SIBLINGS_OP = "rabit::residual_binary_linear_siblings"


class Siblings(torch.nn.Module):
    """S projections of one input (like q/k/v), concatenated, then one more linear of another input."""

    def __init__(self, in_features: int, out_features: list[int], biases: list[bool]):
        super().__init__()
        self.projections = torch.nn.ModuleList(
            torch.nn.Linear(in_features, n, bias=b) for n, b in zip(out_features, biases, strict=True))
        self.out = torch.nn.Linear(sum(out_features), 7)

    def forward(self, x):
        return self.out(torch.cat([torch.tanh(p(x)) for p in self.projections], dim=-1))


def capture(model: torch.nn.Module, x: torch.Tensor, fuse: bool):
    """Run the backend's passes (freeze, then optionally fuse) eagerly; return output and the graph."""
    graphs = []

    def backend(gm, example_inputs):
        config = RaBiTConfig()
        freeze_and_pack(gm, lambda name, w, oriented: pack_fit(fit_weight(oriented.float(), config), config),
                        example_inputs)
        groups = fuse_siblings(gm, example_inputs) if fuse else []
        graphs.append((gm, groups))
        return gm

    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return out, *graphs[0]


def count(gm, name: str) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and op_name(node.target) == name)


@given(seed=st.integers(0, 2**31), in_features=st.integers(1, 80),
       out_features=st.lists(st.integers(1, 70), min_size=2, max_size=4),
       biases=st.lists(st.booleans(), min_size=4, max_size=4), rows=st.sampled_from([(1,), (3,), (2, 5)]))
def test_fusing_siblings_keeps_the_function(seed, in_features, out_features, biases, rows):
    torch.manual_seed(seed)
    model = Siblings(in_features, out_features, biases[: len(out_features)]).eval()
    x = torch.randn(*rows, in_features)
    torch.compiler.reset()
    unfused, unfused_gm, _ = capture(model, x, fuse=False)
    torch.compiler.reset()
    fused, gm, groups = capture(model, x, fuse=True)
    assert count(unfused_gm, SINGLE_OP) == len(out_features) + 1
    assert count(gm, SIBLINGS_OP) == 1 and count(gm, SINGLE_OP) == 1
    assert [m.segment for m in groups[0]] == list(range(len(out_features)))
    # the siblings op adds the same fp32 terms in the same order as separate calls
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)


def test_different_inputs_or_path_counts_are_not_fused():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(40, 24) for _ in range(3))

        def forward(self, x, y):
            return self.a(x) + self.b(y) + self.c(x * 2)

    torch.manual_seed(0)
    graphs = []

    def backend(gm, example_inputs):
        freeze_and_pack(gm, lambda n, w, o: pack_fit(fit_weight(o.float(), RaBiTConfig()), RaBiTConfig()),
                        example_inputs)
        graphs.append(fuse_siblings(gm, example_inputs))
        return gm

    torch.compile(TwoInputs(), backend=backend)(torch.randn(2, 40), torch.randn(2, 40))
    assert graphs == [[]]


def test_quantized_model_fuses_and_follows_in_place_buffer_updates():
    """A ``quantize_``-packed model owns its buffers (graph inputs): the fused copy must follow changes."""
    torch.manual_seed(0)
    model = Siblings(48, [32, 16, 16], [True, False, True]).eval()
    quantize_(model, RaBiTConfig(skip=()), example_input=torch.randn(1, 48), progress=False)
    x = torch.randn(2, 48)
    compiled = torch.compile(model, backend="rabit", options={"inductor": False})
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model.projections[1].row_scale.mul_(-3)
        model.projections[2].bias.add_(1)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_data_free_repack_lands_in_the_fused_segment():
    torch.manual_seed(0)
    model = Siblings(48, [32, 16], [True, True]).eval()
    x = torch.randn(2, 48)
    compiled = torch.compile(model, backend="rabit", options={"inductor": False})
    compiled(x)
    with torch.no_grad():
        model.projections[1].weight.mul_(-1)
    after_update = compiled(x)
    torch.compiler.reset()
    fresh = torch.compile(model, backend="rabit", options={"inductor": False})(x)
    torch.testing.assert_close(after_update, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("fuse", [True, False])
def test_backend_option_turns_fusion_off(fuse):
    torch.manual_seed(0)
    model = Siblings(40, [24, 8], [False, False]).eval()
    x = torch.randn(1, 40)
    gms = []

    def spy(gm, example_inputs):
        compiled = rabit_backend(gm, example_inputs, options={"inductor": False, "fuse_siblings": fuse})
        gms.append(gm)
        return compiled

    torch.compile(model, backend=spy)(x)
    assert count(gms[0], SIBLINGS_OP) == int(fuse)
