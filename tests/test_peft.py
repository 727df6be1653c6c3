"""LoRA adapters (PEFT) on packed RaBiTLinear layers, on a tiny random Llama whose sizes are not multiples of 32."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import rabit_compiler as rabit
from rabit_compiler.integrations.peft import RaBiTLoraLinear
from rabit_compiler.quantize import RaBiTLinear, set_submodule

VOCAB, SEQ = 96, 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def packed() -> LlamaForCausalLM:
    """Attention projections with a bias, MLP without: both kinds of packed layer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         attention_bias=True)
    model = LlamaForCausalLM(config).eval()
    report = rabit.quantize_(model, progress=False)
    assert len(report.quantized) == 14
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def lora(model: torch.nn.Module, **options) -> PeftModel:
    return get_peft_model(copy.deepcopy(model), LoraConfig(**({"r": 4, "target_modules": TARGETS} | options)))


def packed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every packed buffer and every base-layer bias, cloned."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if "lora_" not in name}


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss


def dense_twin(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every RaBiTLinear replaced by an ``nn.Linear`` holding its dequantized weight (fp64)."""
    twin = copy.deepcopy(model).double()
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, RaBiTLinear):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                     dtype=torch.float64)
            with torch.no_grad():
                linear.weight.copy_(layer.dequantize(torch.float64))
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            set_submodule(twin, name, linear)
    return twin


def test_every_packed_linear_gets_an_adapter_that_starts_at_the_packed_output(packed, ids):
    model = lora(packed)
    wrapped = [m for m in model.modules() if isinstance(m, RaBiTLoraLinear)]
    assert len(wrapped) == 14 and all(isinstance(m.base_layer, RaBiTLinear) for m in wrapped)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, packed(ids).logits)  # lora_B = 0 at init


@given(rank=st.integers(1, 9), alpha=st.sampled_from([1, 8, 16]), batch=st.integers(1, 3),
       seq=st.integers(1, SEQ), lora_bias=st.booleans(), rslora=st.booleans())
def test_loss_and_adapter_gradients_equal_a_dense_twin_in_fp64(packed, rank, alpha, batch, seq, lora_bias, rslora):
    """Adapters on the packed layers vs the same adapters on nn.Linear(W_hat): the packed op's forward and its
    input gradient (through every later layer) carry the adapters' loss and gradients exactly, up to fp64
    summation order."""
    options = {"r": rank, "lora_alpha": alpha, "lora_bias": lora_bias, "use_rslora": rslora}
    model = lora(packed, **options).double()
    twin = get_peft_model(dense_twin(packed), LoraConfig(target_modules=TARGETS, **options))
    generator = torch.Generator().manual_seed(rank * 7 + seq)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # nonzero B (and bias), so the adapters change the function
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model))
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=generator)
    losses = [next_token_loss(m, tokens) for m in (model, twin)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=0)
    twin_grads = {name: p.grad for name, p in twin.named_parameters() if p.requires_grad}
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(twin_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, twin_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_training_lowers_the_loss_and_leaves_the_packed_layers_bit_identical(packed, ids):
    model = lora(packed, r=8, lora_alpha=16)
    before = packed_state(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = next_token_loss(model, ids)
        loss.backward()
        assert {name for name, p in model.named_parameters() if p.grad is not None} == trainable
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses  # from ln(96) = 4.56: the random tiny model predicts ~uniformly
    after = packed_state(model)
    assert before.keys() == after.keys() and any(t.dtype == torch.int32 for t in after.values())
    assert all(torch.equal(before[name], after[name]) for name in before)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(ids).logits, packed(ids).logits)


def test_merging_into_packed_weights_is_refused(packed):
    model = lora(packed)
    with pytest.raises(ValueError, match="cannot be merged into a packed RaBiTLinear"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged into a packed RaBiTLinear"):
        model.merge_adapter()


@pytest.mark.parametrize(("options", "message"), [
    ({"use_dora": True}, "DoraLinearVariant needs the full-precision weight"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' initialises from the full-precision weight"),
])
def test_weight_derived_lora_variants_are_refused(packed, options, message):
    with pytest.raises(ValueError, match=message):
        lora(packed, **options)


@pytest.mark.parametrize("load_base", [rabit.load, AutoModelForCausalLM.from_pretrained])
def test_adapter_saved_by_peft_loads_onto_a_loaded_packed_base(packed, ids, tmp_path, load_base):
    rabit.save(packed, tmp_path / "base")
    model = lora(packed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        next_token_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as handle:
        stored = set(handle.keys())  # noqa: SIM118 -- not a dict
    assert len(stored) == 28 and all("lora_A" in name or "lora_B" in name for name in stored)
    loaded = PeftModel.from_pretrained(load_base(tmp_path / "base"), tmp_path / "adapter").eval()
    assert sum(isinstance(m, RaBiTLoraLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        expected = model.eval()(ids).logits
        assert not torch.equal(expected, packed(ids).logits)  # the adapters moved the function
        assert torch.equal(loaded(ids).logits, expected)


def test_import_rabit_compiler_registers_lora_when_peft_is_imported_later():
    """``import rabit_compiler`` does not import peft, a probe for it integrates nothing, and ``import peft``
    afterwards makes every LoraConfig map RaBiTLinear to RaBiTLoraLinear."""
    code = (
        "import importlib.util, sys\n"
        "import rabit_compiler\n"
        "assert 'peft' not in sys.modules\n"
        "assert importlib.util.find_spec('peft') is not None\n"
        "assert 'rabit_compiler.integrations.peft' not in sys.modules\n"
        "import peft\n"
        "from rabit_compiler.integrations.peft import RaBiTLoraLinear\n"
        "assert peft.LoraConfig()._custom_modules == {rabit_compiler.RaBiTLinear: RaBiTLoraLinear}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
