"""``quantize_``: finds linears through the Dynamo graph, packs them, drops fp weights, keeps the function."""

from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import rabit_compiler as rabit
from rabit_compiler.calibration import capture_linears
from rabit_compiler.quantize import RaBiTLinear, model_bytes, module_linears, unowned_matrices


def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def dequantized_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.dequantize() for name, m in model.named_modules() if isinstance(m, RaBiTLinear)}


def test_quantize_llama_replaces_every_decoder_linear_and_drops_memory():
    model = tiny_llama()
    report = rabit.quantize_(model, progress=False)
    assert len(report.quantized) == 2 * 7
    assert not report.skipped and report.head == "lm_head"  # the head: weight-only int8 (tests/test_head.py)
    packed = [m for m in model.modules() if isinstance(m, RaBiTLinear)]
    assert len(packed) == 14
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    linear_fp_bytes = sum(4 * m.in_features * m.out_features for m in [*packed, model.lm_head])
    linear_packed_bytes = sum(b.numel() * b.element_size() for m in [*packed, model.lm_head] for b in m.buffers())
    assert report.bytes_before - report.bytes_after == linear_fp_bytes - linear_packed_bytes
    assert report.bytes_after == model_bytes(model)


def test_quantized_model_equals_model_with_dequantized_weights():
    model = tiny_llama(1)
    reference = tiny_llama(1)
    ids = torch.randint(0, 101, (2, 9))
    rabit.quantize_(model, progress=False)
    with torch.no_grad():
        for name, w_hat in dequantized_copy(model).items():
            reference.get_submodule(name).weight.copy_(w_hat)
        reference.lm_head.weight.copy_(model.lm_head.dequantize())
        out, expected = model(ids).logits, reference(ids).logits
    # same weights, the packed op computes per path in fp32: differences are fp32 rounding over K <= 88
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_compiling_a_quantized_model_matches_eager():
    model = tiny_llama(2)
    rabit.quantize_(model, progress=False)
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
        out = torch.compile(model, backend="rabit", options={"inductor": False})(ids).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_calibration_statistics_change_the_fit():
    ids = torch.randint(0, 101, (4, 16))
    plain, calibrated = tiny_llama(3), tiny_llama(3)
    rabit.quantize_(plain, progress=False)
    rabit.quantize_(calibrated, calibration=ids, progress=False)
    a = plain.model.layers[0].mlp.up_proj.col_scale
    b = calibrated.model.layers[0].mlp.up_proj.col_scale
    assert not torch.equal(a, b)


def test_capture_collects_input_and_gradient_statistics():
    model = tiny_llama(4)
    ids = torch.randint(0, 101, (3, 10))
    capture = capture_linears(model, ids[:1], calibration=ids, batch_size=2, progress=False)
    up = next(c for c in capture.linears.values() if c.name == "model.layers.0.mlp.up_proj")
    assert up.input_stat.rows == 30 and up.output_stat.rows == 30
    x_rms = up.input_stat.summary("rms")
    assert x_rms.shape == (64,) and (x_rms > 0).all()
    assert up.output_stat.summary("mean_abs").shape == (88,)
    assert all(p.requires_grad for p in model.parameters()), "requires_grad must be restored"
    assert all(p.grad is None for p in model.parameters()), "calibration must not accumulate weight gradients"


def test_gpt2_conv1d_and_tied_lm_head():
    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 97, (2, 8))
    report = rabit.quantize_(model, progress=False)
    assert len(report.quantized) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert report.head == "lm_head" and not model.config.tie_word_embeddings  # untied, weight-only int8
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_hand_written_module_with_raw_parameters(caplog):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = torch.nn.Parameter(torch.randn(50, 33) / 6)
            self.b_in = torch.nn.Parameter(torch.randn(50))
            self.w_out = torch.nn.Parameter(torch.randn(17, 50) / 7)

        def forward(self, x):
            return F.linear(torch.relu(F.linear(x, self.w_in, self.b_in)), self.w_out)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    net = Net()
    x = torch.randn(3, 33)
    reference = Net()
    reference.load_state_dict(net.state_dict())
    with caplog.at_level(logging.INFO, logger="rabit_compiler"):
        report = rabit.quantize_(net, example_input=x, progress=False)
    assert sorted(report.quantized) == ["block.w_in", "block.w_out"]
    assert not any(name.endswith(("w_in", "w_out")) for name, _ in net.named_parameters())
    packed = dict(net.block.named_modules())
    with torch.no_grad():
        reference.block.w_in.copy_(_dequantize(packed, "w_in"))
        reference.block.w_out.copy_(_dequantize(packed, "w_out"))
    torch.testing.assert_close(net(x), reference(x), rtol=1e-4, atol=1e-5)


def _dequantize(modules, attr):
    holder = modules[f"rabit_packed_{attr}"]
    from rabit_compiler.kernels import PackedResidualBinary

    return PackedResidualBinary(holder.packed_signs, holder.row_scale, holder.col_scale, None,
                                holder.in_features).dequantize()


def test_bad_calibration_input_is_refused():
    with pytest.raises(ValueError, match="integer tensor"):
        rabit.quantize_(tiny_llama(), calibration=torch.randn(2, 8), progress=False)
    with pytest.raises(ValueError, match="no windows"):
        rabit.quantize_(tiny_llama(), calibration=torch.zeros(0, 8, dtype=torch.long),
                        example_input=torch.zeros(1, 4, dtype=torch.long), progress=False)


def test_generate_on_the_compiled_quantized_model_matches_eager_and_does_not_recompile_per_token():
    from rabit_compiler.backend import rabit_backend

    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return rabit_backend(gm, example_inputs, options={"inductor": False})

    model = tiny_llama(6)
    rabit.quantize_(model, progress=False)
    prompt = torch.randint(0, 101, (1, 5))
    expected = model.generate(prompt, max_new_tokens=10, do_sample=False)
    model.compile(backend=counting)
    out = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, expected)
    # prefill, the first decode step, then one dynamic-length graph for every later step
    assert len(compiles) <= 3, f"{len(compiles)} compiles for 10 tokens"


# --- data-free quantize_ on any module: no tracing, no example input ------------------------------------------


class Stack(torch.nn.Module):
    def __init__(self, sizes: list[int], bias: bool):
        super().__init__()
        pairs = zip(sizes, sizes[1:], strict=False)
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(a, b, bias=bias) for a, b in pairs))

    def forward(self, x):
        return self.layers(x)


def no_tracing():
    return mock.patch("rabit_compiler.quantize.capture_with_experts",
                      side_effect=AssertionError("quantize_ traced a model whose linears are all nn.Linear / Conv1D"))


@given(sizes=st.lists(st.integers(1, 70), min_size=2, max_size=4), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_any_module_of_linears_is_quantized_data_free_without_tracing(sizes, bias, dtype, batch, seed):
    torch.manual_seed(seed)
    model = Stack(sizes, bias).to(dtype)
    with no_tracing():
        report = rabit.quantize_(model, rabit.RaBiTConfig(rounds=2), progress=False)
    assert report.quantized == [f"layers.{i}" for i in range(len(sizes) - 1)] and not report.skipped
    x = torch.randn(batch, sizes[0]).to(dtype)
    reference = x.double()
    for layer in model.layers:
        assert isinstance(layer, RaBiTLinear)
        reference = F.linear(reference, layer.dequantize(torch.float64),
                             None if layer.bias is None else layer.bias.double())
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype
    # each layer rounds its output once to the activation dtype (K <= 70); the float64 reference of the same
    # packed weights agrees to that rounding, carried through at most three layers
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_the_module_scan_finds_what_the_trace_finds(architecture):
    if architecture == "llama":
        model = tiny_llama(7, tie=True)
    else:
        torch.manual_seed(7)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)).eval()

    def found(linears):
        return {(c.name, id(c.weight), c.layout, c.other_uses) for c in linears}

    traced = capture_linears(model, torch.arange(8)[None], progress=False).linears.values()
    assert unowned_matrices(model) == []
    assert found(module_linears(model)) == found(traced)
    assert ("lm_head", id(model.lm_head.weight), "out_in", True) in found(traced)


def test_data_free_gpt2_conv1d_equals_the_model_with_dequantized_weights():
    torch.manual_seed(8)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    model, reference = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    reference.load_state_dict(model.state_dict())
    with no_tracing():
        report = rabit.quantize_(model, rabit.RaBiTConfig(rounds=2, head="fp"), progress=False)
    assert len(report.quantized) == 8
    with torch.no_grad():
        for name, w_hat in dequantized_copy(model).items():
            reference.get_submodule(name).weight.copy_(w_hat.T)  # Conv1D holds W [K, N]
        ids = torch.randint(0, 97, (2, 8))
        # same weights; the packed op sums its paths in fp32: differences are fp32 rounding over K <= 192
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_linear_tied_to_an_embedding_is_found_by_identity_and_left_fp():

    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(40, 24)
            self.mix = torch.nn.Linear(24, 24)
            self.head = torch.nn.Linear(24, 40, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.mix(self.embed(ids)))

    model = TiedLM()
    with no_tracing():
        report = rabit.quantize_(model, rabit.RaBiTConfig(rounds=1, skip=()), progress=False)
    assert report.quantized == ["mix"]
    assert report.skipped == {"head": "weight is also used outside linear layers (e.g. tied to an embedding)"}
    assert model.head.weight is model.embed.weight


def test_raw_parameters_need_an_example_input_and_the_error_names_them():
    class Raw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.w_out = torch.nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return F.linear(self.proj(x), self.w_out)

    with pytest.raises(ValueError, match=r"pass example_input .*\['0.w_out'\] are parameters outside nn.Linear"):
        rabit.quantize_(torch.nn.Sequential(Raw()), progress=False)
