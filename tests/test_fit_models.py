"""The fits on a tiny Llama: quantize_ with every fit and sequential calibration, coupled QAT from the true
weight (latent_init="weight"), and end-to-end scale tuning (method "scales")."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rabit_compiler as rabit
from rabit_compiler import calibration
from rabit_compiler.calibration import capture_linears
from rabit_compiler.math import coupled_residual_paths
from rabit_compiler.qat import fit_linears, packed_fits, prepare_qat, qat_layers
from rabit_compiler.qat.train import QATConfig, QATTrainer
from rabit_compiler.quantize import RaBiTLinear, set_submodule
from rabit_compiler.quantizer import fit_linear, pack_fit
from rabit_compiler.sequential import decoder_blocks, fit_in_block_order

VOCAB, SEQ = 96, 16


@pytest.fixture(scope="module")
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(1))


def packed_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.dequantize() for name, m in model.named_modules() if isinstance(m, RaBiTLinear)}


def test_every_fit_of_every_captured_linear_is_finite_and_packs(teacher, windows):
    capture = capture_linears(teacher, windows[:1], windows[:4], progress=False, input_grams=True)
    linears = [linear for linear in capture.linears.values() if linear.name != "lm_head"]
    assert len(linears) == 21 and all(linear.input_gram.rows == 4 * SEQ for linear in linears)
    for fit in ("svid", "als", "coupled", "gptq"):
        config = rabit.RaBiTConfig(fit=fit, objective="hessian", fit_rounds=2)
        for linear in linears:
            packed = pack_fit(fit_linear(linear, config), config)
            assert torch.isfinite(packed.dequantize()).all()


def test_a_large_vocabulary_calibrates_in_smaller_batches_with_the_same_statistics(teacher, windows, monkeypatch):
    """calibration.LOGITS_BUDGET_BYTES caps the batch (one window here): the input statistics and X^T X are the same
    sums; the output gradients are those of a per-batch mean loss, so they scale by the batch ratio, uniformly."""
    whole = capture_linears(teacher, windows[:1], windows[:4], progress=False, input_grams=True).linears
    monkeypatch.setattr(calibration, "LOGITS_BUDGET_BYTES", 4 * VOCAB * SEQ)
    single = capture_linears(teacher, windows[:1], windows[:4], progress=False, input_grams=True).linears
    assert whole.keys() == single.keys()
    for key, linear in whole.items():
        other = single[key]
        torch.testing.assert_close(other.input_stat.abs_sum, linear.input_stat.abs_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.input_gram.matrix, linear.input_gram.matrix, rtol=1e-5, atol=1e-5)
        # one window per batch instead of four: each window's loss gradient is 4x larger
        torch.testing.assert_close(other.output_stat.abs_sum, 4 * linear.output_stat.abs_sum, rtol=1e-4, atol=1e-9)


def test_sequential_statistics_are_taken_after_the_earlier_blocks_are_quantized(teacher, windows):
    """Block 0 sees the full-precision inputs (the same X^T X as one capture of the fp model); block 2 sees
    the outputs of quantized blocks 0-1."""
    fp_grams = {linear.name: linear.input_gram.mean() for linear in
                capture_linears(teacher, windows[:1], windows[:4], progress=False, input_grams=True).linears.values()}
    model = copy.deepcopy(teacher)
    owners = {linear.name: linear for linear in capture_linears(model, windows[:1], progress=False).linears.values()
              if linear.name != "lm_head"}
    config = rabit.RaBiTConfig(fit="gptq", objective="hessian", fit_rounds=1)
    sequential_grams = {}

    def apply(name, linear):
        sequential_grams[name] = linear.input_gram.mean()
        set_submodule(model, name, RaBiTLinear(pack_fit(fit_linear(linear, config), config)))

    handled = fit_in_block_order(model, owners, windows[:4], True, apply, progress=False)
    assert sorted(handled) == sorted(owners) and len(handled) == 21
    assert all(linear.input_gram is None for linear in owners.values())  # one block's X^T X alive at a time
    for name, gram in sequential_grams.items():
        same = torch.allclose(gram, fp_grams[name], rtol=1e-4, atol=1e-6)
        assert same == name.startswith("model.layers.0."), name
    # with nothing quantized, the pass sees exactly what one capture of the model sees, layer by layer
    model = copy.deepcopy(teacher)
    owners = {linear.name: linear for linear in capture_linears(model, windows[:1], progress=False).linears.values()
              if linear.name != "lm_head"}
    sequential_grams.clear()
    fit_in_block_order(model, owners, windows[:4], True, lambda name, linear: sequential_grams.update(
        {name: linear.input_gram.mean()}), progress=False)
    for name, gram in sequential_grams.items():
        torch.testing.assert_close(gram, fp_grams[name], rtol=1e-4, atol=1e-6)


def test_sequential_quantize_and_fit_linears_pack_everything_and_restore_the_weights(teacher, windows):
    config = rabit.RaBiTConfig(fit="gptq", objective="hessian", fit_rounds=1, sequential=True)
    model = copy.deepcopy(teacher)
    report = rabit.quantize_(model, config, calibration=windows[:4], progress=False)
    assert len(report.quantized) == 21 and not report.skipped and report.head == "lm_head"
    with torch.no_grad():
        assert torch.isfinite(model(windows[:2]).logits).all()
    model = copy.deepcopy(teacher)
    fits = fit_linears(model, config, windows[:4], progress=False)
    assert len(fits.fits) == 21 and all(torch.isfinite(fit.dequantize()).all() for fit in fits.fits.values())
    for name, parameter in teacher.named_parameters():
        assert torch.equal(model.get_parameter(name), parameter)


def test_sequential_calibration_without_decoder_blocks_logs_and_fits_from_one_capture(windows, caplog):
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, 48), torch.nn.Linear(48, 32))
    assert decoder_blocks(model) is None
    with caplog.at_level(logging.WARNING, logger="rabit_compiler"):
        report = rabit.quantize_(model, rabit.RaBiTConfig(fit="gptq", objective="hessian", sequential=True,
                                                          skip=()), calibration=windows[:2], progress=False)
    assert "no list of decoder blocks" in caplog.text
    assert sorted(report.quantized) == ["1", "2"]


def test_coupled_qat_from_the_weight_reproduces_the_coupled_fit_exactly(teacher, windows):
    """latent_init="weight": the latent is the original weight and step 0 is the coupled fit, bit for bit."""
    model = copy.deepcopy(teacher)
    fits = prepare_qat(model, rabit.RaBiTConfig(objective="hessian", fit_rounds=2), "rabit",
                       calibration=windows[:4], latent_init="weight", progress=False)
    originals = dict(teacher.named_modules())
    for name, layer in qat_layers(model).items():
        weight = originals[name].weight
        assert torch.equal(layer.latent.detach(), weight)
        fit = fits.fits[name]
        assert torch.equal(layer.current_paths().signs, fit.signs)
        assert torch.equal(layer.quantized_weight().detach(), fit.dequantize())
        for i, path in enumerate(coupled_residual_paths(weight, fit.row_scales, fit.col_scales)):
            assert torch.equal(path, fit.path(i))


def test_latent_init_weight_refuses_fits_that_break_the_coupled_rule(teacher, windows):
    fits = fit_linears(teacher, rabit.RaBiTConfig(fit="als", fit_rounds=2), windows[:4], progress=False)
    with pytest.raises(ValueError, match="coupled"):
        prepare_qat(copy.deepcopy(teacher), rabit.RaBiTConfig(), "rabit", fits=fits, latent_init="weight")
    with pytest.raises(ValueError, match="latent_init"):
        prepare_qat(copy.deepcopy(teacher), rabit.RaBiTConfig(), "rabit", fits=fits, latent_init="zeros")
    with pytest.raises(ValueError, match="'rabit' / 'frozen'"):
        prepare_qat(copy.deepcopy(teacher), rabit.RaBiTConfig(), "standard", fits=fits, latent_init="weight")


def test_scale_tuning_of_a_quantized_model_keeps_its_signs_and_lowers_the_loss(teacher, windows):
    model = copy.deepcopy(teacher)
    rabit.quantize_(model, rabit.RaBiTConfig(fit="als"), calibration=windows[:4], progress=False)
    with torch.no_grad():
        packed_logits = model(windows[:2]).logits
    fits = packed_fits(model)
    assert len(fits.fits) == 21
    prepare_qat(model, rabit.RaBiTConfig(), "scales", fits=fits)
    with torch.no_grad():
        torch.testing.assert_close(model(windows[:2]).logits, packed_logits, rtol=1e-4, atol=1e-4)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"row_scale", "col_scale"}
    trainer = QATTrainer(model, teacher, QATConfig(steps=8, seq_len=SEQ, batch_size=4, warmup_steps=0,
                                                   lr_scale=1e-2, optimizer="adamw"), windows, progress=False)
    losses = [trainer.train_step() for _ in range(8)]
    assert losses[-1] < losses[0]
    for name, layer in qat_layers(model).items():
        assert torch.equal(layer.current_paths().signs, fits.fits[name].signs)
