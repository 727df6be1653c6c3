"""The FX passes: find every linear form; rewrite and freeze preserve the function (float64 reference)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.passes import find_linears, freeze_and_pack, rewrite_linears
from transformers.pytorch_utils import Conv1D

from rabit_compiler.algebra import inference_identity_holds, inference_identity_residual
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.math import coupled_residual_weight, greedy_residual_svid
from rabit_compiler.quantizer import fit_weight, pack_fit


class AllForms(torch.nn.Module):
    """One linear in every form the find pass must recognise (sizes not multiples of 32)."""

    def __init__(self, k: int = 37, n: int = 45, bias: bool = True):
        super().__init__()
        self.module_linear = torch.nn.Linear(k, n, bias=bias)
        self.conv1d = Conv1D(n, n)  # weight stored [K, N]
        self.w_mm = torch.nn.Parameter(torch.randn(n, n) / n**0.5)
        self.w_addmm = torch.nn.Parameter(torch.randn(n, n) / n**0.5)
        self.b_addmm = torch.nn.Parameter(torch.randn(n))
        self.w_matmul = torch.nn.Parameter(torch.randn(n, n) / n**0.5)
        self.w_permute = torch.nn.Parameter(torch.randn(n, n) / n**0.5)
        self.w_functional = torch.nn.Parameter(torch.randn(n, n) / n**0.5)

    def forward(self, x):
        h = self.module_linear(x)
        h = self.conv1d(h)
        rows = h.reshape(-1, h.shape[-1])
        rows = torch.mm(rows, self.w_mm.t())
        rows = torch.addmm(self.b_addmm, rows, self.w_addmm.transpose(0, 1))
        h = rows.reshape(h.shape)
        h = h @ self.w_matmul.T
        h = torch.matmul(h, self.w_permute.permute(1, 0))
        return F.linear(h, self.w_functional)


EXPECTED = {"module_linear", "conv1d", "w_mm", "w_addmm", "w_matmul", "w_permute", "w_functional"}


def dynamo_graph(model, *inputs):
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, example_inputs
        return gm

    torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return captured["gm"], captured["inputs"]


def test_find_recognises_every_form_under_dynamo():
    model = AllForms()
    gm, inputs = dynamo_graph(model, torch.randn(2, 3, 37))
    sites, skipped = find_linears(gm, inputs)
    assert {s.name.split(".")[0] for s in sites} == EXPECTED, [s.name for s in sites]
    layouts = {s.name.split(".")[0]: s.layout for s in sites}
    assert layouts["conv1d"] == "in_out" and layouts["w_mm"] == "out_in"
    assert not skipped


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return True


def test_find_recognises_call_module_and_functional_in_a_symbolic_trace():
    model = AllForms()
    gm = fx.symbolic_trace(model)  # Conv1D is not a torch.nn leaf: traced through to addmm(b, x, W)
    sites, _ = find_linears(gm)
    forms = {s.name: (s.form, s.layout) for s in sites}
    assert forms["module_linear"] == ("call_module", "out_in") and forms["conv1d"] == ("addmm", "in_out")
    assert forms["w_functional"] == ("linear", "out_in") and forms["w_addmm"] == ("addmm", "out_in")
    assert len(sites) == len(EXPECTED)
    leaf_gm = fx.GraphModule(model, LeafTracer().trace(model))
    leaf_forms = {s.name: (s.form, s.layout) for s in find_linears(leaf_gm)[0]}
    assert leaf_forms["conv1d"] == ("call_module", "in_out")


def test_find_ignores_activation_matmuls():
    def attention(q, k):
        return torch.softmax(q @ k.transpose(-1, -2), -1)

    gm = fx.symbolic_trace(attention)
    assert find_linears(gm) == ([], [])


def replace_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``model`` with each named weight (stored layout) replaced in place."""
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)
    return model


def stored_weight_name(layer: str) -> str:
    return f"{layer}.weight" if layer in ("module_linear", "conv1d") else layer


@given(seed=st.integers(0, 2**31), bias=st.booleans(), batch=st.sampled_from([(1,), (4,), (2, 3)]),
       paths=st.integers(1, 3))
def test_rewrite_preserves_the_function(seed, bias, batch, paths):
    """Rewritten graph == original graph with every W replaced by the coupled W_hat (float64)."""
    torch.manual_seed(seed)
    model = AllForms(bias=bias).double()
    x = torch.randn(*batch, 37, dtype=torch.float64)
    gm = fx.symbolic_trace(model)
    scales = {}

    def init(name, weight):
        fit = greedy_residual_svid(weight, paths)
        scales[name] = fit
        return fit, None

    rewritten = rewrite_linears(gm, init)
    assert len(rewritten) == len(EXPECTED)
    out = gm(x)
    reference = AllForms(bias=bias).double()
    reference.load_state_dict(model.state_dict())
    replacements = {}
    for name, fit in scales.items():
        stored = model.get_parameter(stored_weight_name(name))
        oriented = stored.T if name == "conv1d" else stored
        w_hat = coupled_residual_weight(oriented.detach(), fit.row_scales.double(), fit.col_scales.double())
        replacements[stored_weight_name(name)] = w_hat.T if name == "conv1d" else w_hat
    expected = replace_weights(reference, replacements)(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_rewritten_code_shows_the_residual_hierarchy():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(40, 33)))
    rewrite_linears(gm, lambda name, w: (greedy_residual_svid(w, 3), None))
    code = gm.code
    assert code.count("torch.where") == 3, code  # one sign per path
    assert code.count("= self.rabit_0.row_scale_") == 3 and code.count("= self.rabit_0.col_scale_") == 3
    assert code.count(" - ") >= 3  # R_1 = R_0 - W_1, R_2 = R_1 - W_2, and the STE term W_FP - W_FP.detach()
    assert "torch._C._nn.linear" in code


def test_rewrite_with_reanchored_latent_trains_the_latent():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(20, 10)))
    fit = greedy_residual_svid(gm.get_submodule("0").weight.detach(), 2)
    rewrite_linears(gm, lambda name, w: (fit, w.clone() * 2))
    gm(torch.randn(3, 20)).sum().backward()
    latent = [p for n, p in gm.named_parameters() if n.endswith("latent")]
    assert len(latent) == 1 and latent[0].grad is not None and latent[0].grad.abs().sum() > 0


@given(seed=st.integers(0, 2**31), bias=st.booleans(), batch=st.sampled_from([(1,), (4,), (2, 3)]),
       paths=st.integers(1, 3))
def test_freeze_preserves_the_function(seed, bias, batch, paths):
    """Frozen graph == original with every W replaced by the dequantized packed W_hat (float64 reference)."""
    torch.manual_seed(seed)
    model = AllForms(bias=bias)
    x = torch.randn(*batch, 37)
    config = RaBiTConfig(paths=paths, rounds=1, scale_dtype=torch.float32)
    gm = fx.symbolic_trace(model)
    packed = {}

    def quantize(name, weight, oriented):
        packed[name] = pack_fit(fit_weight(oriented, config), config)
        return packed[name]

    sites, skipped = freeze_and_pack(gm, quantize)
    assert len(sites) == len(EXPECTED) and not skipped
    assert "torch._C._nn.linear(" not in gm.code and "torch.addmm(" not in gm.code and "torch.mm(" not in gm.code
    out = gm(x)
    reference = AllForms(bias=bias).double()
    reference.load_state_dict(model.state_dict())
    replacements = {}
    for name, p in packed.items():
        w_hat = p.dequantize(torch.float64)
        replacements[stored_weight_name(name)] = w_hat.T if name == "conv1d" else w_hat
    expected = replace_weights(reference, replacements)(x.double())
    # fp32 accumulation over K <= 45 terms per layer, 7 chained layers: ~1e-5 relative
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_freeze_skips_tied_and_non_finite_weights_with_reasons():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 40)
            self.bad = torch.nn.Linear(40, 40)
            with torch.no_grad():
                self.bad.weight[0, 0] = float("nan")

        def forward(self, ids):
            h = self.bad(self.embed(ids))
            return F.linear(h, self.embed.weight)

    gm = fx.symbolic_trace(Tied())
    config = RaBiTConfig()
    sites, skipped = freeze_and_pack(gm, lambda n, w, o: pack_fit(fit_weight(o, config), config))
    reasons = " | ".join(s.reason for s in skipped)
    assert not sites
    assert "NaN/Inf" in reasons and "outside this linear" in reasons


def test_sympy_proves_the_inference_identity():
    for rows, n, k, paths in [(1, 2, 3, 1), (2, 3, 2, 2), (2, 2, 3, 3)]:
        assert inference_identity_holds(rows, n, k, paths)
    assert inference_identity_residual(1, 2, 2, 2).shape == (1, 2)
