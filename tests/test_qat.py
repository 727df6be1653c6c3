"""QAT form, trainer, baselines and diagnostics on a tiny random Llama (2 layers, hidden 64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.data import token_windows
from rabit_compiler.math import ResidualBinaryPaths, binary_path, hard_sign, rtn_dequantized
from rabit_compiler.qat import (
    ResidualBinaryTrainLinear,
    convert,
    fit_linears,
    load_fits,
    prepare_qat,
    qat_layers,
    rtn_,
    save_fits,
)
from rabit_compiler.qat.diagnostics import path_diagnostics, sign_changes
from rabit_compiler.qat.train import QATConfig, QATTrainer
from rabit_compiler.quantize import RaBiTLinear

VOCAB, SEQ = 96, 16


@pytest.fixture(scope="module")
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fits(teacher, windows):
    return fit_linears(teacher, RaBiTConfig(), windows[:4], progress=False)


def student(teacher, fits, method: str) -> LlamaForCausalLM:
    model = copy.deepcopy(teacher)
    prepare_qat(model, RaBiTConfig(), method, fits=fits)
    return model


def trainer(model, teacher, windows, **overrides) -> QATTrainer:
    options = dict(steps=6, seq_len=SEQ, batch_size=4, warmup_steps=1, lr_latent=5e-4, lr_scale=2e-3,
                   optimizer="adamw", gamma=0.5)
    return QATTrainer(model, teacher, QATConfig(**(options | overrides)), windows, progress=False)


@pytest.mark.parametrize("method", ["rabit", "standard", "frozen"])
def test_init_reproduced_exactly_at_step_0(teacher, fits, method):
    model = student(teacher, fits, method)
    layers = qat_layers(model)
    assert set(layers) == set(fits.fits) and len(layers) == 14
    assert "lm_head" in fits.skipped
    for name, layer in layers.items():
        assert torch.equal(layer.current_paths().signs, fits.fits[name].signs)
        assert torch.equal(layer.quantized_weight(), fits.fits[name].dequantize())
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= {"latent", "row_scale", "col_scale", "bias", "0", "1"}


def test_coupled_paths_rederived_after_optimizer_step(teacher, fits, windows):
    model = student(teacher, fits, "rabit")
    trainer(model, teacher, windows, optimizer="muon", lr_latent=5e-2).train_step()
    flipped = 0
    for name, layer in qat_layers(model).items():
        latent, g, h = layer.latent.detach(), layer.row_scale.detach(), layer.col_scale.detach()
        first_signs = hard_sign(latent)
        first = binary_path(first_signs, g[0], h[0])
        second_signs = hard_sign(latent - first)
        assert torch.equal(layer.current_paths().signs, torch.stack([first_signs, second_signs]))
        assert torch.equal(layer.quantized_weight().detach(), first + binary_path(second_signs, g[1], h[1]))
        flipped += int((second_signs != fits.fits[name].signs[1]).sum())
    assert flipped > 0  # the step moved the latent across sign boundaries: the check above is not vacuous


def test_frozen_paths_stay_bit_identical(teacher, fits, windows):
    model = student(teacher, fits, "frozen")
    trainer(model, teacher, windows, steps=3).train()
    changed = 0
    for name, layer in qat_layers(model).items():
        paths, fit = layer.current_paths(), fits.fits[name]
        assert torch.equal(paths.signs[0], fit.signs[0])
        assert torch.equal(paths.row_scales[0], fit.row_scales[0].float())
        assert torch.equal(paths.col_scales[0], fit.col_scales[0].float())
        changed += int(not torch.equal(paths.row_scales[1], fit.row_scales[1].float()))
    assert changed > 0


@pytest.mark.parametrize("method", ["rabit", "standard"])
def test_training_reduces_the_loss(teacher, fits, windows, method):
    model = student(teacher, fits, method)
    run = trainer(model, teacher, windows[:4], steps=6)
    losses = [run.train_step() for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(teacher, fits, windows):
    plain, checkpointed = (trainer(student(teacher, fits, "rabit"), teacher, windows, gradient_checkpointing=flag)
                           for flag in (False, True))
    for run in (plain, checkpointed):
        run.student.train(run.config.gradient_checkpointing)
        run.loss(run.batch(0)).backward()
    torch.testing.assert_close(checkpointed.loss(checkpointed.batch(0)), plain.loss(plain.batch(0)))
    pairs = zip(plain.student.named_parameters(), checkpointed.student.parameters(), strict=True)
    trained = [(name, p, q) for (name, p), q in pairs if p.requires_grad]
    assert trained
    for name, p, q in trained:
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("optimizer", ["muon", "muon-fp32"])
def test_checkpoint_resume_gives_the_same_next_loss(teacher, fits, windows, tmp_path, optimizer):
    first = trainer(student(teacher, fits, "rabit"), teacher, windows, optimizer=optimizer, eval_every=1)
    first.eval_windows = windows[:2]
    first.train_step()
    first.train_step()
    first.save_checkpoint(tmp_path / "ckpt")
    expected = first.train_step()
    second = trainer(student(teacher, fits, "rabit"), teacher, windows, optimizer=optimizer)
    second.load_checkpoint(tmp_path / "ckpt")
    assert second.step == 2
    assert second.train_step() == expected


def test_convert_packs_the_trained_paths(teacher, fits, windows):
    model = student(teacher, fits, "standard")
    trainer(model, teacher, windows, steps=2).train()
    expected = {}
    for name, layer in qat_layers(model).items():
        paths = layer.current_paths()  # packed with fp16 scales: the reference rounds them the same way
        expected[name] = ResidualBinaryPaths(paths.signs, paths.row_scales.half().float(),
                                             paths.col_scales.half().float()).dequantize()
    with torch.no_grad():
        before = model(windows).logits
    assert sorted(convert(model)) == sorted(expected)
    for name, weight in expected.items():
        packed = model.get_submodule(name)
        assert isinstance(packed, RaBiTLinear)
        torch.testing.assert_close(packed.dequantize(), weight, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, before, rtol=0.05, atol=0.05)


def test_fits_round_trip(fits, tmp_path):
    save_fits(fits, tmp_path / "fits.safetensors")
    loaded = load_fits(tmp_path / "fits.safetensors")
    assert loaded.skipped == fits.skipped and set(loaded.fits) == set(fits.fits)
    for name, fit in fits.fits.items():
        assert torch.equal(loaded.fits[name].dequantize(), fit.dequantize())


def test_rtn_has_four_levels_per_row_including_min_and_max(teacher):
    weight = teacher.model.layers[0].mlp.up_proj.weight
    quantized = rtn_dequantized(weight)
    for row, original in zip(quantized, weight, strict=True):
        levels = row.unique()
        assert len(levels) <= 4
        torch.testing.assert_close(levels.min(), original.min())
        torch.testing.assert_close(levels.max(), original.max())
    model = copy.deepcopy(teacher)
    rtn_(model)
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight,
                       rtn_dequantized(teacher.model.layers[1].self_attn.q_proj.weight))
    assert torch.equal(model.lm_head.weight, teacher.lm_head.weight)


def test_diagnostics_are_correlations(teacher, fits, windows):
    model = student(teacher, fits, "rabit")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    result = path_diagnostics(model, teacher, windows[:2], layers=names)
    assert [d.layer for d in result] == names
    for d in result:
        assert -1 <= d.path_correlation <= 1 and -1 <= d.residual_alignment <= 1
        assert d.residual_alignment > 0.1  # the second path fits the first one's error
    with pytest.raises(ValueError, match="not QAT layers"):
        path_diagnostics(model, teacher, windows[:2], layers=["lm_head"])


@pytest.mark.parametrize("method", ["standard", "frozen"])
def test_sign_changes_count_flips_from_the_init(teacher, fits, method):
    """Zero right after prepare_qat (these methods take the init's signs as they are); flipping one row of path 1
    (its latent for standard, the frozen signs for frozen) changes exactly that row's signs of path 1."""
    model = student(teacher, fits, method)
    assert sign_changes(model, fits) == [0.0, 0.0]
    layer = model.model.layers[0].mlp.up_proj
    total = sum(fit.signs[0].numel() for fit in fits.fits.values())
    with torch.no_grad():
        if method == "standard":
            layer.latents[0][0].neg_()
            assert sign_changes(model, fits)[0] == layer.in_features / total
        else:
            layer.frozen_signs[0][0].neg_()  # a frozen buffer: the forward's path 1 follows it
            assert sign_changes(model, fits)[0] == layer.in_features / total


def test_bad_inputs_raise_clear_errors(teacher, fits, windows, tmp_path):
    for bad in ({"steps": 0}, {"steps": -3}, {"seq_len": 0}, {"optimizer": "sgd"}, {"checkpoint_every": 5}):
        with pytest.raises(ValueError, match="QATConfig"):
            QATConfig(**bad)
    model = student(teacher, fits, "rabit")
    with pytest.raises(ValueError, match="exceeds the model context of 32"):
        QATTrainer(model, teacher, QATConfig(seq_len=64), torch.zeros(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        QATTrainer(model, teacher, QATConfig(seq_len=SEQ), torch.zeros(0, SEQ, dtype=torch.long))
    with pytest.raises(ValueError, match="prepare_qat"):
        QATTrainer(copy.deepcopy(teacher), teacher, QATConfig(seq_len=SEQ), windows)
    with pytest.raises(ValueError, match="method"):
        ResidualBinaryTrainLinear(next(iter(fits.fits.values())), None, method="ternary")
    core = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<unk>")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        token_windows(tokenizer, tmp_path / "empty.txt", SEQ)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        token_windows(tokenizer, tmp_path / "missing.txt", SEQ)


def test_cli_quantize_then_eval(teacher, tmp_path, capsys, monkeypatch):
    from rabit_compiler.cli import main

    words = [f"w{i}" for i in range(VOCAB - 2)]
    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1} | {w: i + 2 for i, w in enumerate(words)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path / "fp")
    teacher.save_pretrained(tmp_path / "fp")
    generator = torch.Generator().manual_seed(2)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (40 * SEQ,), generator=generator).tolist())
    (tmp_path / "train.txt").write_text(text)
    common = ["--model", str(tmp_path / "fp"), "--text", str(tmp_path / "train.txt"), "--seq-len", str(SEQ)]
    main(["quantize", *common, "--method", "rabit", "--steps", "2", "--optimizer", "adamw", "--batch-size", "2",
          "--diagnostics", "2", "--out", str(tmp_path / "rabit")])
    main(["quantize", *common, "--method", "rtn", "--out", str(tmp_path / "rtn")])
    main(["quantize", *common, "--method", "ptq", "--dtype", "bf16", "--calibration-windows", "4",
          "--out", str(tmp_path / "ptq")])
    printed = capsys.readouterr().out
    assert "rabit: 2 steps, 64 tokens" in printed and "Corr(R1 x, y2)" in printed and "rtn: 0 steps" in printed
    assert "ptq: 0 steps" in printed and "quantize_" in printed and "peak RSS" in printed
    from rabit_compiler.serialization import load

    packed = load(tmp_path / "ptq")  # quantize_'s packed layers, the rest in the dtype it was loaded in
    assert {type(m).__name__ for m in packed.modules()} >= {"RaBiTLinear", "WeightOnlyLinear"}
    assert packed.model.embed_tokens.weight.dtype == torch.bfloat16
    main(["eval", "--model", str(tmp_path / "fp"), "--quantized", str(tmp_path / "rabit"), str(tmp_path / "rtn"),
          str(tmp_path / "ptq"), "--text", str(tmp_path / "train.txt"), "--seq-len", str(SEQ)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | method") and len(table) == 6
    assert "| rabit | 2 | 64 |" in table[3] and "| rtn | 0 | 0 |" in table[4] and "| ptq | 0 | 0 |" in table[5]
    assert math.isfinite(float(table[5].split("|")[-2]))
    with pytest.raises(ValueError, match="QAT keeps fp32 latent weights"):
        main(["quantize", *common, "--method", "rabit", "--dtype", "bf16", "--out", str(tmp_path / "bad")])
    main(["quantize", *common, "--method", "ptq", "--init", str(tmp_path / "ptq"), "--tune-steps", "2",
          "--batch-size", "2", "--out", str(tmp_path / "tuned")])
    assert "ptq: 2 steps, 64 tokens" in capsys.readouterr().out
    tuned = {n: m for n, m in load(tmp_path / "tuned").named_modules() if type(m).__name__ == "RaBiTLinear"}
    fitted = {n: m for n, m in packed.named_modules() if type(m).__name__ == "RaBiTLinear"}
    assert tuned.keys() == fitted.keys() and len(tuned) == 7 * teacher.config.num_hidden_layers
    assert all(torch.equal(tuned[n].packed_signs, fitted[n].packed_signs) for n in tuned)  # signs kept
    assert any(not torch.equal(tuned[n].row_scale, fitted[n].row_scale) for n in tuned)  # scales trained
    with pytest.raises(ValueError, match="belong to --method ptq"):
        main(["quantize", *common, "--method", "rtn", "--tune-steps", "2", "--out", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="not a model saved by rabit quantize"):
        main(["quantize", *common, "--method", "ptq", "--init", str(tmp_path / "fp"), "--out", str(tmp_path / "bad")])

    def no_refit(*args, **kwargs):
        raise AssertionError("--resume fitted the model again instead of reading OUT/fits.safetensors")

    from rabit_compiler import workflows

    monkeypatch.setattr(workflows, "fit_linears", no_refit)
    main(["quantize", *common, "--method", "rabit", "--steps", "3", "--optimizer", "adamw", "--batch-size", "2",
          "--diagnostics", "0", "--resume", "--out", str(tmp_path / "rabit")])
    assert "rabit: 3 steps, 96 tokens" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="fitted the model again"):  # other settings: the file is not reused
        main(["quantize", *common, "--method", "rabit", "--steps", "3", "--paths", "1", "--resume",
              "--out", str(tmp_path / "rabit")])
