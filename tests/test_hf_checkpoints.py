"""RaBiT checkpoints through transformers' own calls: ``quantize_`` -> ``save_pretrained`` -> ``from_pretrained``
gives bit-identical logits (Llama, Qwen2, GPT-2 Conv1D, Gemma3; mixed k; fp16 and bf16 scales), twice;
``pipeline("text-generation")`` runs from the directory; damage is named; without ``import rabit_compiler`` a
plain load fails instead of returning random layers; an unquantized model saves as it always did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    pipeline,
)

import rabit_compiler as rabit
from rabit_compiler.serialization import DIGESTS_KEY, WEIGHTS_FILE, RaBiTFormatError, digest_metadata

VOCAB = 101
SIZES = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 88, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
MIXED_PATHS = {"*.down_proj": 3, "*.c_fc": 3, "*.q_proj": 1, "*.c_attn": 1}


def tiny(architecture: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=True)).eval()
    if architecture == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()
    if architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=48, n_layer=2, n_head=4)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**SIZES, head_dim=16, sliding_window=8)).eval()


def quantized(architecture: str, scale_dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    model = tiny(architecture)
    rabit.quantize_(model, rabit.RaBiTConfig(rounds=1, scale_dtype=scale_dtype, layer_paths=MIXED_PATHS),
                    progress=False)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def packed_paths(model: torch.nn.Module) -> dict[str, int]:
    return {name: m.num_paths for name, m in model.named_modules() if isinstance(m, rabit.RaBiTLinear)}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = quantized("llama")
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    return directory, model


@pytest.mark.parametrize(("architecture", "scale_dtype", "layers"), [
    ("llama", torch.float16, 14), ("qwen2", torch.bfloat16, 14), ("gpt2", torch.float16, 8),
    ("gemma3", torch.bfloat16, 14),
])
def test_save_pretrained_from_pretrained_is_bit_identical_twice(tmp_path, architecture, scale_dtype, layers):
    model = quantized(architecture, scale_dtype)
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "first")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first")
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(logits(loaded, ids), expected)
    paths = packed_paths(loaded)
    assert paths == packed_paths(model) and len(paths) == layers and sorted(set(paths.values())) == [1, 2, 3]
    assert all(m.row_scale.dtype == scale_dtype and m.weight.dtype == torch.int32
               for m in loaded.modules() if isinstance(m, rabit.RaBiTLinear))
    assert loaded.rabit_config == model.rabit_config
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))

    loaded.save_pretrained(tmp_path / "second")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "second")
    assert torch.equal(logits(again, ids), expected)
    first, second = load_file(tmp_path / "first" / WEIGHTS_FILE), load_file(tmp_path / "second" / WEIGHTS_FILE)
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    config = json.loads((tmp_path / "second" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((tmp_path / "first" / "config.json").read_text())["quantization_config"]


def test_rabit_load_reads_what_save_pretrained_wrote(saved_llama):
    directory, model = saved_llama
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(logits(rabit.load(directory), ids), logits(model, ids))


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["the", "cat", "sat", "on", "mat", "a", "dog"]
    core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1} | {w: i + 2 for i, w in enumerate(words)},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def test_text_generation_pipeline_runs_from_the_directory(saved_llama, tmp_path):
    _, model = saved_llama
    tokenizer = word_tokenizer()
    rabit.save(model, tmp_path, tokenizer=tokenizer)
    generator = pipeline("text-generation", model=str(tmp_path))
    assert isinstance(generator.model.model.layers[0].mlp.up_proj, rabit.RaBiTLinear)
    tokens = generator("the cat sat", max_new_tokens=6, do_sample=False, return_tensors=True)[0]
    prompt = tokenizer("the cat sat", return_tensors="pt")["input_ids"]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert list(tokens["generated_token_ids"]) == expected[0].tolist()
    assert generator("the cat sat", max_new_tokens=6, do_sample=False)[0]["generated_text"].startswith("the cat sat")


def copy_checkpoint(source: Path, target: Path) -> Path:
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_corrupted_quantization_config_is_named(saved_llama, tmp_path):
    directory = copy_checkpoint(saved_llama[0], tmp_path)
    document = json.loads((directory / "config.json").read_text())
    del document["quantization_config"]["layers"]["model.layers.1.self_attn.o_proj"]["in_features"]
    (directory / "config.json").write_text(json.dumps(document))
    with pytest.raises(RaBiTFormatError, match=r"layer model.layers.1.self_attn.o_proj .* not a valid rabit_linear "
                                               r"\(KeyError: 'in_features'\)"):
        AutoModelForCausalLM.from_pretrained(directory)
    document["quantization_config"]["packed_format_version"] = 7
    (directory / "config.json").write_text(json.dumps(document))
    with pytest.raises(RaBiTFormatError, match="packed_format_version is 7"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_missing_packed_tensor_is_named(saved_llama, tmp_path):
    directory = copy_checkpoint(saved_llama[0], tmp_path)
    tensors = load_file(directory / WEIGHTS_FILE)
    del tensors["model.layers.0.self_attn.k_proj.row_scale"]
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt", **digest_metadata(tensors)})
    with pytest.raises(RaBiTFormatError, match=r"lacks the packed tensors .*self_attn.k_proj.row_scale"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_plain_transformers_refuses_the_checkpoint_instead_of_random_layers(saved_llama, tmp_path):
    """Without ``import rabit_compiler`` transformers skips the unknown quant_method and loads the fp model: the
    packed ``weight`` tensors' shapes make that load fail."""
    directory, _ = saved_llama
    script = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
              f"try:\n    AutoModelForCausalLM.from_pretrained({str(directory)!r})\n"
              "finally:\n    print('rabit_compiler imported:', 'rabit_compiler' in sys.modules)\n")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert "rabit_compiler imported: False" in result.stdout
    assert result.returncode != 0
    assert "Unknown quantization type, got rabit" in result.stderr
    assert "model.layers.{0, 1}.mlp.down_proj.weight" in result.stderr and "MISMATCH" in result.stderr
    assert "RuntimeError: You set `ignore_mismatched_sizes` to `False`" in result.stderr


def test_unquantized_model_keeps_its_usual_save_path(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    with safe_open(tmp_path / WEIGHTS_FILE, "pt") as handle:
        assert DIGESTS_KEY not in (handle.metadata() or {})
        assert set(handle.keys()) == set(model.state_dict()) - {"lm_head.weight"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(loaded, "rabit_config") and not packed_paths(loaded)
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_sharded_checkpoint_round_trips(saved_llama, tmp_path):
    _, model = saved_llama
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*"))) > 2
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), logits(model, ids))
    assert torch.equal(logits(rabit.load(tmp_path), ids), logits(model, ids))


class RawMLP(torch.nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(inner, hidden) / 8)
        self.w_out = torch.nn.Parameter(torch.randn(hidden, inner) / 9)

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, self.w_in)), self.w_out)


def test_packed_weights_of_traced_owners_are_refused_by_save_not_lost(tmp_path, caplog):
    model = tiny("llama")
    model.model.layers[0].mlp = RawMLP(64, 88)
    with caplog.at_level("WARNING", logger="rabit_compiler"):
        report = rabit.quantize_(model, rabit.RaBiTConfig(rounds=1), progress=False)
    assert "model.layers.0.mlp.w_in" in report.quantized
    assert "rabit.save refuses this model" in caplog.text and getattr(model, "hf_quantizer", None) is None
    with pytest.raises(ValueError, match=r"symbolically traced modules \['model.layers.0.mlp'\]"):
        rabit.save(model, tmp_path)


def test_a_model_packed_by_qat_convert_round_trips(tmp_path):
    model = tiny("qwen2")
    config = rabit.RaBiTConfig(rounds=1)
    rabit.prepare_qat(model, config, method="rabit")
    rabit.convert(model, config)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(packed_paths(loaded)) == 14
    assert torch.equal(logits(loaded, ids), logits(model, ids))
