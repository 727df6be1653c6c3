"""MoE experts held as 3-D parameters (transformers 5), packed per expert.

On tiny Qwen3-MoE, OLMoE and Mixtral (2 layers, 4 experts, top-2; K = 72 and 40, not multiples of 32) and two
hand-written experts modules (transposed weights with biases; no gate), after ``quantize_``:

- every expert projection is packed (``layers x experts x 2`` names in the report), the routers stay fp with the
  logged reason, no stack of fp expert weights is left;
- the quantized fp32 model matches a float64 eager run of the fp architecture whose weights are the dequantized packed
  weights (transformers' own experts loop as the reference), and ``backend="rabit"`` (``fullgraph=True``: no graph
  break) matches the eager quantized model;
- ``rabit.save`` / ``load`` and ``save_pretrained`` / ``from_pretrained`` give bit-identical logits; without the
  quantizer the fp architecture refuses the checkpoint;
- experts the packed module cannot express (GPT-OSS's clamped gate) stay fp with a logged reason;
- QAT: ``prepare_qat`` trains every routed expert (one training layer per expert and projection), ``convert`` packs
  them back into the same module type.

The op ``rabit::residual_binary_experts`` is checked against float64 on random shapes (hypothesis).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import pack_paths
from rabit_compiler.passes import ROUTER_REASON
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

import rabit_compiler as rabit
from rabit_compiler.experts import RaBiTExperts, find_experts
from rabit_compiler.head import WeightOnlyLinear
from rabit_compiler.qat import ResidualBinaryTrainExperts, packed_fits, prepare_qat, qat_layers
from rabit_compiler.quantizer import fit_weight, pack_fit

from .reference import assert_close_scaled, packed_linear_float64

VOCAB = 96
NUM_EXPERTS, TOP_K, LAYERS = 4, 2, 2
# The quantized fp32 model against its float64 reference: the same packed weights and the same ops, so only the
# arithmetic precision differs (see tests/test_architectures.py: measured 1e-7 .. 6e-7 of the output scale there);
# routing is a discontinuous function of the router logits, which agree to ~1e-7 here, far from any tie.
RELATIVE_TOLERANCE = 1e-5
MIN_QUANTIZATION_EFFECT = 1e-2  # the 2-bit model must differ from the fp one by far more than the tolerance

SIZES = dict(vocab_size=VOCAB, hidden_size=72, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=TOP_K, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHITECTURES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, intermediate_size=88, moe_intermediate_size=40, num_experts=NUM_EXPERTS)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=40, num_experts=NUM_EXPERTS)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=40, num_local_experts=NUM_EXPERTS)),
}


def tiny(architecture: str) -> torch.nn.Module:
    config_class, model_class, extra = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**SIZES, **extra)
    return getattr(transformers, model_class)(config).float().eval()


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def quantized(request):
    """(architecture, fp model, quantized model, report, log records of quantize_)."""
    fp = tiny(request.param)
    model = copy.deepcopy(fp)
    handler = _Records()
    logging.getLogger("rabit_compiler").addHandler(handler)
    previous = logging.getLogger("rabit_compiler").level
    logging.getLogger("rabit_compiler").setLevel(logging.INFO)
    try:
        report = rabit.quantize_(model, rabit.RaBiTConfig(rounds=2), progress=False)
    finally:
        logging.getLogger("rabit_compiler").removeHandler(handler)
        logging.getLogger("rabit_compiler").setLevel(previous)
    return request.param, fp, model, report, handler.messages


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def token_batch(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def dequantized_float64(fp: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of the fp architecture whose packed layers hold the quantized model's dequantized weights,
    running transformers' own experts loop (``experts_implementation="eager"``)."""
    reference = copy.deepcopy(fp).double()
    for name, module in model.named_modules():
        if isinstance(module, (rabit.RaBiTLinear, WeightOnlyLinear)):
            reference.get_submodule(name).weight = torch.nn.Parameter(module.dequantize(torch.float64))
        elif isinstance(module, RaBiTExperts):
            experts = reference.get_submodule(name)
            for projection in module.projections:
                weight = module.dequantize(projection, torch.float64)
                weight = weight.transpose(1, 2) if experts.is_transposed else weight
                setattr(experts, projection, torch.nn.Parameter(weight.contiguous()))
    reference.set_experts_implementation("eager")
    return reference


# ---------------------------------------------------------------------------------------------------- quantize_


def test_every_expert_is_packed_and_named(quantized):
    _, fp, model, report, messages = quantized
    layouts, left = find_experts(fp)
    assert len(layouts) == LAYERS and not left
    expected = {f"{name}.{expert}.{projection}" for name in layouts for expert in range(NUM_EXPERTS)
                for projection in ("gate_up_proj", "down_proj")}
    assert len(expected) == LAYERS * NUM_EXPERTS * 2
    assert expected <= set(report.quantized)
    attention = {name for name, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    assert set(report.quantized) == expected | attention
    packed = {name: m for name, m in model.named_modules() if isinstance(m, RaBiTExperts)}
    assert sorted(packed) == sorted(layouts)
    assert sum(m.num_experts * len(m.projections) for m in packed.values()) == len(expected)
    assert find_experts(model) == ({}, {}), "a stack of fp expert weights is left"
    routers = {name for name, reason in report.skipped.items() if reason == ROUTER_REASON}
    assert routers == {name.removesuffix(".experts").rpartition(".")[0] + ".mlp.gate" for name in layouts}
    assert set(report.skipped) == routers
    for router in routers:
        assert f"rabit: left in full precision: {router} ({ROUTER_REASON})" in messages


def test_quantized_matches_dequantized_float64_reference(quantized):
    _, fp, model, _, _ = quantized
    reference = dequantized_float64(fp, model)
    for ids in (token_batch(2, 7), token_batch(1, 1, seed=1)):  # prefill (reference matmuls), decode (LUT kernel)
        with torch.no_grad():
            got, expected, full = model(ids).logits, reference(ids).logits, fp(ids).logits
        assert got.dtype == torch.float32
        assert relative_error(got, expected) < RELATIVE_TOLERANCE
        assert relative_error(full, expected) > MIN_QUANTIZATION_EFFECT


def test_compiled_fullgraph_matches_eager(quantized):
    _, _, model, _, _ = quantized
    compiled = torch.compile(model, backend="rabit", fullgraph=True, options={"inductor": False})
    for ids in (token_batch(2, 7), token_batch(1, 1, seed=1)):
        with torch.no_grad():
            assert relative_error(compiled(ids).logits, model(ids).logits) < RELATIVE_TOLERANCE


def test_save_load_round_trips_are_bit_identical(quantized, tmp_path):
    _, _, model, _, _ = quantized
    ids = token_batch(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    rabit.save(loaded, tmp_path / "rabit")
    again = rabit.load(tmp_path / "rabit")
    for restored in (loaded, again):
        assert sum(isinstance(m, RaBiTExperts) for m in restored.modules()) == LAYERS
        with torch.no_grad():
            assert torch.equal(restored(ids).logits, expected)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_plain_transformers_refuses_packed_experts(quantized, tmp_path):
    """Without the quantizer the fp architecture loads: the packed experts' sign words make it fail on the shape."""
    architecture, _, model, _, _ = quantized
    if architecture != "qwen3_moe":
        pytest.skip("one architecture is enough (a subprocess importing transformers takes seconds)")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "model.layers.0.mlp.experts" in config["quantization_config"]["layers"]
    script = ("from transformers import AutoModelForCausalLM\n"
              f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "mlp.experts.gate_up_proj" in result.stderr and "MISMATCH" in result.stderr


def test_calibrated_experts_use_their_own_rows():
    """With calibration, an expert that routes tokens is fitted with its statistics (a different fit from the data-free
    one); an expert no calibration token reaches keeps the data-free fit."""
    fp = tiny("qwen3_moe")
    windows = token_batch(1, 3, seed=0)
    with torch.no_grad():
        routed = _routed_experts(fp, windows)
    config = rabit.RaBiTConfig(rounds=2)
    model = copy.deepcopy(fp)
    rabit.quantize_(model, config, calibration=windows, progress=False)
    calibrated_experts = 0
    for name, layout in find_experts(fp)[0].items():
        packed = model.get_submodule(name)
        weights = layout.oriented(fp.get_submodule(name), "gate_up_proj").detach()
        for expert in range(NUM_EXPERTS):
            data_free = pack_fit(fit_weight(weights[expert], config), config)
            same = torch.equal(packed.gate_up_proj_col_scale[expert], data_free.col_scale)
            assert same == (expert not in routed[name]), (name, expert, routed[name])
            calibrated_experts += not same
    assert 0 < calibrated_experts < LAYERS * NUM_EXPERTS, "these windows must leave some expert unrouted"


def _routed_experts(model: torch.nn.Module, ids: torch.Tensor, names: set[str] | None = None) -> dict[str, set[int]]:
    """Per experts module (``names``, by default the fp ones), the experts its router picks for ``ids``."""
    names = set(find_experts(model)[0]) if names is None else names
    routed: dict[str, set[int]] = {name: set() for name in names}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: routed[name].update(args[1].flatten().tolist())) for name in names]
    try:
        model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return routed


def test_unsupported_experts_stay_fp_with_a_logged_reason(caplog):
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=40, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with caplog.at_level(logging.INFO, logger="rabit_compiler"):
        report = rabit.quantize_(model, progress=False)
    for projection in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{projection}"
        assert "_apply_gate" in report.skipped[name]
        assert f"rabit: left in full precision: {name} (GptOssExperts gates with its own _apply_gate" in caplog.text
    assert report.skipped["model.layers.0.mlp.router"] == ROUTER_REASON


def test_backend_names_the_fp_experts_it_leaves(caplog):
    model = tiny("olmoe")
    compiled = torch.compile(model, backend="rabit", options={"inductor": False})
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="rabit_compiler"):
        compiled(token_batch(1, 4))
    for layer in range(LAYERS):
        for projection in ("gate_up_proj", "down_proj"):
            assert f"left in full precision: model.layers.{layer}.mlp.experts.{projection} (stacked MoE" in caplog.text
        assert f"model.layers.{layer}.mlp.gate: {ROUTER_REASON}" in caplog.text


# ---------------------------------------------------------------------------------------------------------- QAT


def test_qat_trains_every_routed_expert_and_converts_to_packed_experts(tmp_path):
    fp = tiny("qwen3_moe")
    config = rabit.RaBiTConfig(rounds=2)
    student, reference = copy.deepcopy(fp), copy.deepcopy(fp)
    rabit.quantize_(reference, config, progress=False)
    rabit.prepare_qat(student, config, progress=False)
    trained = {name: m for name, m in student.named_modules() if isinstance(m, ResidualBinaryTrainExperts)}
    assert sorted(trained) == sorted(find_experts(fp)[0])
    expert_layers = {name for name in qat_layers(student) if ".experts." in name}
    assert len(expert_layers) == LAYERS * NUM_EXPERTS * 2

    ids = token_batch(1, 2, seed=0)  # 2 tokens x top-2: 3 of the 4 experts in each layer
    routed = _routed_experts(student, ids, set(trained))
    student(ids).logits.square().mean().backward()
    for name, module in trained.items():
        assert routed[name] and len(routed[name]) < NUM_EXPERTS, "the batch must route some experts, not all"
        for expert in range(NUM_EXPERTS):
            for projection in module.projections:
                grad = module.layer(expert, projection).latent.grad
                assert (grad is not None and grad.abs().sum() > 0) == (expert in routed[name]), (name, expert)

    converted = rabit.convert(student, config)
    assert expert_layers <= set(converted)
    packed = {name: m for name, m in student.named_modules() if isinstance(m, RaBiTExperts)}
    assert sorted(packed) == sorted(trained)
    for name, module in packed.items():  # no optimizer step was taken: convert gives quantize_'s experts, bit for bit
        for key, value in module.state_dict().items():
            assert torch.equal(value, reference.get_submodule(name).state_dict()[key]), (name, key)


def test_scale_tuning_of_packed_experts_round_trips(quantized):
    """``prepare_qat(method="scales", fits=packed_fits(model))`` on a model packed by quantize_ puts the packed
    experts in training form (signs fixed); converting back without a step gives the same tensors."""
    architecture, _, model, _, _ = quantized
    if architecture != "olmoe":
        pytest.skip("one architecture is enough")
    student = copy.deepcopy(model)
    fits = packed_fits(student)
    assert sum(".experts." in name for name in fits.fits) == LAYERS * NUM_EXPERTS * 2
    prepare_qat(student, rabit.RaBiTConfig(), "scales", fits=fits, progress=False)
    assert sum(isinstance(m, ResidualBinaryTrainExperts) for m in student.modules()) == LAYERS
    trainable = {name for name, p in student.named_parameters() if p.requires_grad and ".experts." in name}
    assert trainable and all(name.endswith(("row_scale", "col_scale")) for name in trainable)
    rabit.convert(student, rabit.RaBiTConfig())
    expected = model.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, expected[key]), key


# ---------------------------------------------------------------- experts layouts beyond Qwen3-MoE / OLMoE / Mixtral


def _hand_written_experts(gated: bool, transposed: bool, bias: bool) -> type[torch.nn.Module]:
    @use_experts_implementation(has_gate=gated, is_transposed=transposed, has_bias=bias)
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            first = "gate_up_proj" if gated else "up_proj"
            out = config.intermediate_size * (2 if gated else 1)
            shapes = {first: (out, config.hidden_size), "down_proj": (config.hidden_size, config.intermediate_size)}
            self.num_experts = config.num_experts
            for name, (n, k) in shapes.items():
                weight = torch.randn(self.num_experts, n, k) / k ** 0.5
                setattr(self, name, torch.nn.Parameter(weight.transpose(1, 2).contiguous() if transposed else weight))
                if bias:
                    setattr(self, f"{name}_bias", torch.nn.Parameter(torch.randn(self.num_experts, n) * 0.1))
            self.act_fn = ACT2FN[config.hidden_act]

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise NotImplementedError("transformers' batched_mm implementation is the reference")

    return Experts


class HandWrittenMoE(torch.nn.Module):
    """A raw-parameter router (softmax, top-2) and an experts module of the given layout; K = 45, N = 2 x 37."""

    def __init__(self, gated: bool, transposed: bool, bias: bool):
        super().__init__()
        config = transformers.PretrainedConfig(hidden_act="gelu", experts_implementation="batched_mm")
        config.hidden_size, config.intermediate_size, config.num_experts = 45, 37, 5
        self.router = torch.nn.Parameter(torch.randn(5, 45))
        self.experts = _hand_written_experts(gated, transposed, bias)(config)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        weights, index = F.linear(rows, self.router).softmax(-1).topk(TOP_K)
        return self.experts(rows, index, weights).view_as(x)


@pytest.mark.parametrize("gated, transposed, bias", [(True, True, True), (False, False, False)],
                         ids=["gated-transposed-bias", "ungated"])
def test_hand_written_experts_layouts(gated, transposed, bias):
    torch.manual_seed(0)
    fp = HandWrittenMoE(gated, transposed, bias)
    model = copy.deepcopy(fp)
    x = torch.randn(3, 4, 45, generator=torch.Generator().manual_seed(1))
    report = rabit.quantize_(model, example_input=x, progress=False)
    assert len([name for name in report.quantized if name.startswith("experts.")]) == 5 * 2
    assert report.skipped == {"router": ROUTER_REASON}
    packed = model.experts
    assert isinstance(packed, RaBiTExperts) and (packed.down_proj_bias is not None) == bias
    reference = copy.deepcopy(fp).double()
    for projection in packed.projections:
        weight = packed.dequantize(projection, torch.float64)
        setattr(reference.experts, projection,
                torch.nn.Parameter(weight.transpose(1, 2).contiguous() if transposed else weight))
    with torch.no_grad():
        got, expected = model(x), reference(x.double())
        compiled = torch.compile(model, backend="rabit", fullgraph=True, options={"inductor": False})(x)
    assert relative_error(got, expected) < RELATIVE_TOLERANCE
    assert relative_error(compiled, got) < RELATIVE_TOLERANCE
    assert relative_error(fp(x), expected) > MIN_QUANTIZATION_EFFECT


# ------------------------------------------------------------------------------------------------------------ the op


def random_experts(num_experts, paths, n, k, bias, dtype, generator):
    def one_expert():
        signs = torch.where(torch.rand(paths, n, k, generator=generator) < 0.5, -1.0, 1.0)
        return pack_paths(signs, torch.rand(paths, n, generator=generator) + 0.1,
                          torch.rand(paths, k, generator=generator) + 0.1)

    packed = [one_expert() for _ in range(num_experts)]
    stacked = [torch.stack([getattr(p, field) for p in packed]) for field in ("packed_signs", "row_scale", "col_scale")]
    return (*stacked, torch.randn(num_experts, n, generator=generator).to(dtype) if bias else None)


@given(num_experts=st.integers(1, 5), paths=st.integers(1, 3), n=st.integers(1, 70), k=st.integers(1, 100),
       rows=st.integers(0, 12), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       bias=st.booleans(), seed=st.integers(0, 2**31))
def test_op_matches_float64_per_row_reference(num_experts, paths, n, k, rows, dtype, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    packed_signs, row_scale, col_scale, b = random_experts(num_experts, paths, n, k, bias, dtype, generator)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    ids = torch.randint(0, num_experts, (rows,), generator=generator)
    out = torch.ops.rabit.residual_binary_experts(x, ids, packed_signs, row_scale, col_scale, b, k)
    assert out.dtype == dtype and out.shape == (rows, n)
    for row, expert in enumerate(ids.tolist()):
        args = (packed_signs[expert], row_scale[expert], col_scale[expert], None if b is None else b[expert], k)
        expected = packed_linear_float64(x[row:row + 1], *args)
        scale = packed_linear_float64(x[row:row + 1].abs(), torch.zeros_like(args[0]), *args[1:3], None, k)
        if b is not None:
            scale = scale + b[expert].double().abs()
        assert_close_scaled(out[row:row + 1], expected, scale, dtype)


def test_op_gradients_match_dense_float64():
    generator = torch.Generator().manual_seed(0)
    packed_signs, row_scale, col_scale, b = random_experts(3, 2, 17, 45, True, torch.float64, generator)
    x = torch.randn(7, 45, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = b.clone().requires_grad_(True)
    ids = torch.tensor([2, 0, 2, 1, 2, 0, 2])
    out = torch.ops.rabit.residual_binary_experts(x, ids, packed_signs, row_scale, col_scale, bias, 45)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    weights = torch.stack([packed_linear_float64(torch.eye(45, dtype=torch.float64), packed_signs[e], row_scale[e],
                                                 col_scale[e], None, 45).T for e in range(3)])
    torch.testing.assert_close(x.grad, torch.einsum("sn,snk->sk", grad_out, weights[ids]))
    torch.testing.assert_close(bias.grad, torch.zeros(3, 17, dtype=torch.float64).index_add_(0, ids, grad_out))
    torch.library.opcheck(torch.ops.rabit.residual_binary_experts.default,
                          (x.detach().float().requires_grad_(True), ids, packed_signs, row_scale.float(),
                           col_scale.float(), bias.detach().float(), 45))


def test_op_refuses_expert_ids_out_of_range():
    packed_signs, row_scale, col_scale, _ = random_experts(2, 1, 8, 40, False, torch.float32,
                                                           torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 2\), got ids from 0 to 2"):
        torch.ops.rabit.residual_binary_experts(torch.randn(2, 40), torch.tensor([0, 2]), packed_signs, row_scale,
                                                col_scale, None, 40)
