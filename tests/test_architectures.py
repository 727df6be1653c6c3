"""``torch.compile(model, backend="rabit")`` on arbitrary architectures (DESIGN.md §5, "Arbitrary architectures").

For each of HF Llama, GPT-2 (``Conv1D``), Qwen2, Qwen3, Gemma3 (text), Mistral, Qwen3-MoE, OLMoE, BERT and a
hand-written ``F.linear`` module -- tiny, random weights, fp32, eval mode -- the test:

- compiles with the rabit backend (eager hand-off; Llama also through Inductor);
- checks that every linear except the skipped LM head was packed: the count in the backend's log line equals
  the number of ``nn.Linear``/``Conv1D`` modules minus the skipped ones, computed from the model, and the packed
  layer names are exactly those modules;
- compares the compiled fp32 output, batch 1 and batch > 1 (with padding masks where the model takes them),
  against a float64 eager run of a deep copy whose quantized weights are replaced by the dequantized packed
  weights of the same data-free fit (``fit_weight`` + ``pack_fit``).

Hidden sizes are chosen so that several K/N are not multiples of 32 (intermediate 88, GPT-2 c_attn N = 3*72).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from rabit_compiler.passes.graph_edit import op_name

import rabit_compiler.backend as rabit_backend_module
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.experts import find_experts
from rabit_compiler.quantizer import fit_weight, pack_fit

transformers = pytest.importorskip("transformers")

VOCAB = 96
SEQ = 7
BATCHES = (1, 3)
CONFIG = RaBiTConfig()  # the backend's defaults: 2 paths, 5 rounds, fp16 scales, skip lm_head + embeddings

# Tolerance of the compiled fp32 output against the float64 reference, relative to max |reference|.
# The only difference between the two is the arithmetic precision: the same packed weights, the same graph of
# ops. Each fp32 op rounds with relative error <= 2^-24 ~ 6e-8; a dot product over K <= 216 terms accumulates
# up to ~sqrt(K) * 2^-24 ~ 1e-6 of the sum of |terms| (random-walk rounding), and a 2-layer transformer chains
# ~20 such ops (linears, RMSNorm/LayerNorm, softmax, rotary, residual adds) whose errors add up and can be
# amplified by the conditioning of norms and softmax. That gives a few 1e-7 to a few 1e-6 of the output scale
# (measured: 1.4e-7 .. 5.4e-7 over all architectures and batches); we allow 1e-5. A layer left unquantized or
# quantized with a different fit would be off by >= 1e-2 (see the check that the fp model is far from it).
RELATIVE_TOLERANCE = 1e-5
# The 2-bit model must differ from the fp one by far more than the tolerance, or the comparison proves nothing.
MIN_QUANTIZATION_EFFECT = 1e-3  # measured >= 1.1e-2 (BERT's final LayerNorm output)


def _hf(config_class: str, model_class: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        config = getattr(transformers, config_class)(**kwargs)
        return getattr(transformers, model_class)(config)

    return build


DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


class HandWritten(torch.nn.Module):
    """Raw ``nn.Parameter`` weights used through ``F.linear`` (no nn.Linear at all), with biases; K, N not
    multiples of 32; the last projection is called ``lm_head`` and must be skipped by the default patterns."""

    # (weight, bias): the F.linear layers, as the backend names them (the weight's dotted name)
    LINEARS = (("w_in", "b_in"), ("w_mid", None), ("w_out", "b_out"), ("lm_head", None))

    def __init__(self, k: int = 40, hidden: int = 88, n: int = 45, vocab: int = 50):
        super().__init__()
        shapes = {"w_in": (hidden, k), "w_mid": (hidden, hidden), "w_out": (n, hidden), "lm_head": (vocab, n)}
        for name, shape in shapes.items():
            setattr(self, name, torch.nn.Parameter(torch.randn(shape) / shape[1] ** 0.5))
        self.b_in = torch.nn.Parameter(torch.randn(hidden) * 0.1)
        self.b_out = torch.nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        h = F.silu(F.linear(x, self.w_in, self.b_in))
        h = h + F.linear(h, self.w_mid)
        return F.linear(F.linear(h, self.w_out, self.b_out), self.lm_head)


@dataclass
class Arch:
    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "causal_lm" | "encoder" | "plain"


ARCHS = [
    Arch("llama", _hf("LlamaConfig", "LlamaForCausalLM", **DECODER), "causal_lm"),
    Arch("gpt2", _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=72, n_inner=88, n_layer=2, n_head=4,
                     n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0), "causal_lm"),
    Arch("qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", **DECODER), "causal_lm"),
    Arch("qwen3", _hf("Qwen3Config", "Qwen3ForCausalLM", head_dim=16, **DECODER), "causal_lm"),
    Arch("gemma3", _hf("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, sliding_window=4,
                       layer_types=["sliding_attention", "full_attention"], **DECODER), "causal_lm"),
    Arch("mistral", _hf("MistralConfig", "MistralForCausalLM", **DECODER), "causal_lm"),
    # MoE: the attention linears are packed; the routers and the 3-D experts stay fp with logged reasons (the
    # experts are packed by quantize_, tests/test_moe.py)
    Arch("qwen3_moe", _hf("Qwen3MoeConfig", "Qwen3MoeForCausalLM", head_dim=16, moe_intermediate_size=40,
                          num_experts=4, num_experts_per_tok=2, **DECODER), "causal_lm"),
    Arch("olmoe", _hf("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                      **{**DECODER, "intermediate_size": 40}), "causal_lm"),
    Arch("bert", _hf("BertConfig", "BertModel", vocab_size=VOCAB, hidden_size=64, intermediate_size=88,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=0),
         "encoder"),
    Arch("handwritten", HandWritten, "plain"),
]


# ---------------------------------------------------------------------------------------------- helpers


def build(arch: Arch) -> torch.nn.Module:
    torch.manual_seed(0)
    return arch.build().float().eval()


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, str]]:
    """Every linear layer of ``model``: dotted name -> (stored weight, layout), ``"out_in"`` for a weight
    stored ``[N, K]`` (nn.Linear, F.linear), ``"in_out"`` for ``[K, N]`` (transformers' Conv1D)."""
    if isinstance(model, HandWritten):
        return {weight: (getattr(model, weight), "out_in") for weight, _ in HandWritten.LINEARS}
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[name] = (module.weight, "out_in")
        elif type(module).__name__ == "Conv1D":
            layers[name] = (module.weight, "in_out")
    return layers


def expected_packed(model: torch.nn.Module) -> set[str]:
    """The layers the backend must pack: all linears but those matching the skip patterns (the LM head)."""
    layers = linear_layers(model)
    kept = {name for name in layers if not CONFIG.skips(name)}
    skipped = set(layers) - kept
    assert skipped <= {"lm_head"}, f"only the LM head should match the default skip patterns, got {skipped}"
    return kept


def oriented(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The ``[N, K]`` view the backend fits (``W.T`` for a ``[K, N]`` Conv1D weight, as it does)."""
    return weight.detach().T if layout == "in_out" else weight.detach()


def dequantized_float64_copy(model: torch.nn.Module, names: set[str]) -> torch.nn.Module:
    """A float64 deep copy of ``model`` whose layers ``names`` hold W_hat = sum_i g_i B_i h_i of the packed fit
    (fp16-stored scales, as the compiled model uses), evaluated exactly in float64."""
    layers = linear_layers(model)
    w_hat = {}
    for name in names:
        weight, layout = layers[name]
        packed = pack_fit(fit_weight(oriented(weight, layout), CONFIG), CONFIG)
        w = (packed.row_scale.double()[:, :, None] * packed.signs(torch.float64)
             * packed.col_scale.double()[:, None, :]).sum(0)
        torch.testing.assert_close(w.float(), packed.dequantize(), rtol=1e-6, atol=1e-7)
        w_hat[name] = w.T if layout == "in_out" else w
    reference = copy.deepcopy(model).double()
    if find_experts(reference)[0]:  # transformers' default grouped_mm has no float64 kernel; its eager loop has
        reference.set_experts_implementation("eager")
    copied = linear_layers(reference)
    with torch.no_grad():
        for name, w in w_hat.items():
            copied[name][0].copy_(w)
    return reference


def make_inputs(arch: Arch, batch: int) -> dict[str, torch.Tensor | bool]:
    generator = torch.Generator().manual_seed(100 + batch)
    if arch.kind == "plain":
        return {"x": torch.randn(batch, SEQ, 40, generator=generator)}
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=generator)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    if batch > 1:  # right padding of different lengths: every query still sees a real token (no empty rows)
        for row in range(1, batch):
            mask[row, SEQ - 2 * row:] = 0
        ids = ids.masked_fill(mask == 0, 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch.kind == "encoder":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    else:
        inputs["use_cache"] = False
    return inputs


def outputs(arch: Arch, result) -> dict[str, torch.Tensor]:
    if arch.kind == "plain":
        return {"out": result}
    if arch.kind == "encoder":  # the pooler is a linear too: compare its output
        return {"last_hidden_state": result.last_hidden_state, "pooler_output": result.pooler_output}
    return {"logits": result.logits}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


class BackendSpy:
    """Records, for every graph the rabit backend compiles, the packed graph module, the packed and skipped
    sites (by wrapping the freeze pass the backend calls) and whether Inductor compiled it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.graphs: list[tuple[torch.fx.GraphModule, list, list]] = []
        self.inductor_calls = 0
        freeze, inductor = rabit_backend_module.freeze_and_pack, rabit_backend_module._inductor

        def spy_freeze(gm, *args, **kwargs):
            packed, skipped = freeze(gm, *args, **kwargs)
            self.graphs.append((gm, packed, skipped))
            return packed, skipped

        def spy_inductor(*args, **kwargs):
            compiled = inductor(*args, **kwargs)
            self.inductor_calls += 1
            return compiled

        monkeypatch.setattr(rabit_backend_module, "freeze_and_pack", spy_freeze)
        monkeypatch.setattr(rabit_backend_module, "_inductor", spy_inductor)

    def packed_names(self) -> list[str]:
        return [site.name for _, packed, _ in self.graphs for site in packed]


def logged_packed_count(records: list[logging.LogRecord]) -> int:
    """Sum of ``rabit: packed %d linear layers`` over the graphs compiled (graph breaks give several)."""
    counts = [re.match(r"rabit: packed (\d+) linear layers", r.getMessage()) for r in records
              if r.name == "rabit_compiler"]
    return sum(int(m.group(1)) for m in counts if m)


# ------------------------------------------------------------------------------------------------ tests


def check_architecture(arch: Arch, caplog, monkeypatch, inductor: bool) -> None:
    model = build(arch)
    expected = expected_packed(model)
    layers = linear_layers(model)
    assert len(expected) == len(layers) - sum(name == "lm_head" for name in layers)  # BERT has no LM head
    reference = dequantized_float64_copy(model, expected)
    spy = BackendSpy(monkeypatch)
    compiled = torch.compile(model, backend="rabit", options={} if inductor else {"inductor": False})

    for call, batch in enumerate(BATCHES):
        inputs = make_inputs(arch, batch)
        caplog.clear()
        spy.graphs.clear()
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="rabit_compiler"):
            got = outputs(arch, compiled(**inputs))
        if call == 0:  # the first call compiles every graph of the forward
            assert logged_packed_count(caplog.records) == len(expected), caplog.text
        if call == 0 or spy.graphs:  # a recompile for the new batch size packs the same layers again
            assert sorted(spy.packed_names()) == sorted(expected)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        with torch.no_grad():
            ref64 = outputs(arch, reference(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                               for k, v in inputs.items()}))
            fp = outputs(arch, model(**inputs))
        for key, value in got.items():
            assert value.dtype == torch.float32 and torch.isfinite(value).all()
            error = relative_error(value, ref64[key])
            assert error < RELATIVE_TOLERANCE, f"{arch.name} batch {batch} {key}: relative error {error:.3g}"
            assert relative_error(fp[key], ref64[key]) > MIN_QUANTIZATION_EFFECT, "compiled model is not quantized"
    if inductor:
        assert spy.inductor_calls >= 1


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_architecture_compiles_packs_every_linear_and_matches_float64_reference(arch, caplog, monkeypatch):
    check_architecture(arch, caplog, monkeypatch, inductor=False)


def test_llama_through_inductor(caplog, monkeypatch):
    """The one architecture handed to Inductor (slow to compile on CPU): the packed op must survive it."""
    check_architecture(ARCHS[0], caplog, monkeypatch, inductor=True)


def test_llama_fullgraph_has_every_decoder_linear_packed(monkeypatch):
    arch = ARCHS[0]
    model = build(arch)
    expected = expected_packed(model)
    spy = BackendSpy(monkeypatch)
    compiled = torch.compile(model, backend="rabit", fullgraph=True, options={"inductor": False})
    with torch.no_grad():
        compiled(**make_inputs(arch, 2))
    assert len(spy.graphs) == 1, "fullgraph=True must give one graph"
    gm, packed, skipped = spy.graphs[0]
    assert sorted(site.name for site in packed) == sorted(expected)
    nodes = list(gm.graph.nodes)
    single = [n for n in nodes if op_name(n.target) == "rabit::residual_binary_linear"]
    siblings = [n for n in nodes if op_name(n.target) == "rabit::residual_binary_linear_siblings"]
    # q/k/v and gate/up of every decoder layer are fused; o_proj and down_proj stay single calls
    assert sorted(len(n.args[6]) for n in siblings) == sorted([2, 3] * model.config.num_hidden_layers)
    assert len(single) + sum(len(n.args[6]) for n in siblings) == len(expected) == len(linear_layers(model)) - 1
    fp_linears = [n for n in nodes if n.target in (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)]
    assert len(fp_linears) == 1, gm.code
    weight = fp_linears[0].args[1] if len(fp_linears[0].args) > 1 else fp_linears[0].kwargs["weight"]
    assert "lm_head" in weight.name, weight.name
    assert [s.reason for s in skipped] == ["lm_head: matches a skip pattern"]
    # no matmul reads a graph input (parameters are inputs under Dynamo), and the packed layers' fp weights no
    # longer feed the graph at all
    matmuls = {torch.mm, torch.matmul, torch.addmm, torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    weight_mms = [n for n in nodes if n.target in matmuls and any(a in placeholders for a in n.args)]
    assert not weight_mms, gm.code
    for site in packed:
        assert not placeholders[site.weight_input_index].users, site.name



def test_a_module_called_self_keeps_its_name(monkeypatch):
    arch = next(a for a in ARCHS if a.name == "bert")
    model = build(arch)
    spy = BackendSpy(monkeypatch)
    compiled = torch.compile(model, backend="rabit", options={"inductor": False})
    with torch.no_grad():
        compiled(**make_inputs(arch, 1))
    assert sorted(spy.packed_names()) == sorted(expected_packed(model))
