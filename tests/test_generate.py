"""Generation on quantized models: static-cache decode compiled once with ``backend="rabit"`` (no recompiles
over 20 steps), compiled greedy output equal to eager, timings, and ``rabit generate`` end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import rabit_compiler as rabit
from rabit_compiler.cli import main
from rabit_compiler.generation import decode_compile_config, timed_generate

VOCAB = 101
NEW_TOKENS = 20


def quantized_llama(seed: int, head: str = "auto") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    rabit.quantize_(model, rabit.RaBiTConfig(rounds=1, layer_paths={"*.down_proj": 3}, head=head), progress=False)
    return model


def greedy(model, prompt, **kwargs) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=1, **kwargs)


def counting_rabit(graphs: list):
    """``backend="rabit"`` (packed graph run without Inductor) that appends each graph it is handed to
    ``graphs`` (a function: ``CompileConfig`` deep-copies its backend, and functions survive that)."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return rabit.rabit_backend(gm, example_inputs, options={"inductor": False})

    return backend


def test_static_cache_decode_compiles_once_over_20_steps():
    model = quantized_llama(0)
    graphs = []
    config = decode_compile_config("cpu", counting_rabit(graphs))
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for _ in range(2):  # a new prompt of the same length: same cache shape, the graph is reused
            greedy(model, torch.randint(2, VOCAB, (1, 5)), cache_implementation="static", compile_config=config)
    assert len(graphs) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_static_cache_compiled_greedy_equals_eager():
    model = quantized_llama(1)
    prompt = torch.randint(2, VOCAB, (1, 6))
    with torch.no_grad():
        expected = greedy(model, prompt)
        eager_static = greedy(model, prompt, cache_implementation="static", disable_compile=True)
        compiled = greedy(model, prompt, cache_implementation="static",
                          compile_config=decode_compile_config("cpu", "rabit", options={"inductor": False}))
    assert torch.equal(eager_static, expected)
    assert torch.equal(compiled, expected)


def test_compiled_loaded_model_generates_like_the_eager_original(tmp_path):
    model = quantized_llama(2)
    prompt = torch.randint(2, VOCAB, (1, 5))
    with torch.no_grad():
        expected = greedy(model, prompt)
    rabit.save(model, tmp_path)
    loaded = rabit.load(tmp_path)
    loaded.compile(backend="rabit", options={"inductor": False})
    with torch.no_grad():
        assert torch.equal(greedy(loaded, prompt), expected)


def test_timed_generate_counts_every_token_and_checks_input():
    model = quantized_llama(3)
    prompt = torch.randint(2, VOCAB, (1, 4))
    output, timing = timed_generate(model, prompt, 6, compile_config=None)
    assert output.shape == (1, 10) and timing.new_tokens == 6
    assert 0 < timing.time_to_first_token_s <= timing.total_s
    assert timing.decode_tokens_per_s > 0 and timing.first_decode_step_s > 0
    with pytest.raises(ValueError, match="batch 1"):
        timed_generate(model, prompt.repeat(2, 1), 6, compile_config=None)
    with pytest.raises(ValueError, match=">= 3"):
        timed_generate(model, prompt, 2, compile_config=None)
    with pytest.raises(ValueError, match="either mode or options"):
        decode_compile_config("cpu", "rabit", mode="reduce-overhead", options={"inductor": False})


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``<s> </s> w2 .. w100`` (built offline)."""
    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="</s>")


def saved_model_continuation(directory: Path, seed: int, prompt: str, new_tokens: int, head: str = "auto") -> str:
    """Saves a quantized tiny Llama (``head``: RaBiTConfig's) with the word tokenizer to ``directory``; its eager
    greedy continuation of ``prompt`` (``prompt`` is 4 words)."""
    model = quantized_llama(seed, head)
    tokenizer = word_tokenizer()
    rabit.save(model, directory, tokenizer=tokenizer)
    with torch.no_grad():
        expected = model.generate(tokenizer(prompt, return_tensors="pt")["input_ids"], max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)
    return tokenizer.decode(expected[0, 4:], skip_special_tokens=True)


def test_cli_generate_streams_from_a_saved_model(tmp_path, capsys):
    prompt = "w5 w17 w33 w2"
    expected = saved_model_continuation(tmp_path, 4, prompt, 5)
    main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "5", "--device", "cpu",
          "--no-inductor"])
    out = capsys.readouterr().out
    assert "5 tokens" in out and "tokens/s" in out and "time to first token" in out
    assert expected in out


def test_decode_benchmark_runs_on_cpu_with_the_tiny_model(capsys, monkeypatch):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_benchmark", script)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    benchmark.main(["--tiny", "--device", "cpu", "--new-tokens", "4", "--variants", "fp-eager", "torchao-int4",
                    "rabit-eager"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert [row.split("|")[2].strip() for row in rows] == ["fp-eager", "torchao-int4", "rabit-eager"]
    assert "RANDOM weights" in out and "FAILED" not in out
    with pytest.raises(SystemExit):
        benchmark.main(["--model", "llama2-7b", "--device", "cpu"])
    assert "only on CUDA" in capsys.readouterr().err


def test_cli_generate_aot_streams_the_same_greedy_text(tmp_path, capsys):
    """A Llama at batch 1 with the head in full precision (test_aot_decode.py's decoder has the int8 head)."""
    prompt = "w7 w11 w40 w3"
    expected = saved_model_continuation(tmp_path, 5, prompt, 6, head="fp")
    main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6", "--device", "cpu",
          "--aot", "--cpu-tables", "fp32"])
    out = capsys.readouterr().out
    assert "6 tokens" in out and "built ahead of time" in out and "tokens/s" in out
    assert expected in out
    with pytest.raises(SystemExit, match="--aot"):
        main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--device", "cpu", "--aot", "--no-inductor"])
    with pytest.raises(SystemExit, match="--aot"):
        main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--device", "cpu", "--cpu-tables", "fp32"])
