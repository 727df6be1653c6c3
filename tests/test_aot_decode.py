"""The AOTInductor decode step (:class:`rabit_compiler.AOTDecoder`): its logits equal the eager packed
model's step by step on the same static cache (GQA, q/k/v bias, batch 1 and 2, an int8 head), greedy text equal
to ``generate``, and clear errors for a full cache, bad tokens and unsupported caches."""

from __future__ import annotations

import pytest
import torch
from rabit_compiler.kernels import weight_only
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StaticCache,
)

import rabit_compiler as rabit
from rabit_compiler.aot_decode import cache_keyword

VOCAB = 97
CACHE = 24
SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=0, eos_token_id=None)  # generate never stops early


def packed(model_class, config, head: str = "fp") -> torch.nn.Module:
    torch.manual_seed(0)
    model = model_class(config).eval()
    rabit.quantize_(model, rabit.RaBiTConfig(rounds=1, layer_paths={"*.down_proj": 3}, head=head), progress=False)
    return model


@pytest.fixture(scope="module")
def llama_decoder() -> rabit.AOTDecoder:
    return rabit.AOTDecoder(packed(LlamaForCausalLM, LlamaConfig(**SHAPES)), max_cache_len=CACHE,
                      options={"cpu_tables": "fp32"})


def eager_steps(model, prompt: torch.Tensor, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """The eager packed model's logits for each of ``tokens`` after ``prompt``, on a static cache like the
    decoder's."""
    cache = StaticCache(config=model.config, max_cache_len=CACHE)
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{cache_keyword(model): cache})
        return [model(input_ids=t, use_cache=True, **{cache_keyword(model): cache}).logits for t in tokens]


def check_steps_match_eager(decoder: rabit.AOTDecoder, batch: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, VOCAB, (batch, 5), generator=generator)
    tokens = [torch.randint(2, VOCAB, (batch, 1), generator=generator) for _ in range(CACHE - 5)]
    expected = eager_steps(decoder.model, prompt, tokens)
    decoder.prefill(prompt)
    for token, reference in zip(tokens, expected, strict=True):
        logits = decoder.step(token)
        assert logits.shape == reference.shape
        # fp32 tables: fp32 sums in another order than the eager kernel's; logits are O(1)
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert decoder.position == CACHE


def test_llama_steps_equal_the_eager_model_over_the_whole_cache(llama_decoder):
    check_steps_match_eager(llama_decoder, batch=1, seed=0)
    check_steps_match_eager(llama_decoder, batch=1, seed=1)  # prefill resets the cache


def test_greedy_generation_equals_transformers_generate(llama_decoder):
    prompt = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = llama_decoder.model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(llama_decoder.generate(prompt, 12), expected)


def test_qwen2_with_qkv_bias_and_an_int8_head_at_batch_2_runs_no_python_kernel(monkeypatch):
    """q/k/v bias, batch 2 and an int8 head: the head in the step is the C++ operator ``rabit::weight_only_gemv``
    called through its C shim, so the steps match the eager model (which runs the same kernel from Python) while
    the Python kernel entry raises."""
    decoder = rabit.AOTDecoder(packed(Qwen2ForCausalLM, Qwen2Config(**SHAPES), head="int8"), max_cache_len=CACHE,
                               batch_size=2, options={"cpu_tables": "fp32"})
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(2, VOCAB, (2, 5), generator=generator)
    tokens = [torch.randint(2, VOCAB, (2, 1), generator=generator) for _ in range(CACHE - 5)]
    expected = eager_steps(decoder.model, prompt, tokens)

    def python_kernel(*args, **kwargs):
        raise AssertionError("the compiled step called the head's Python kernel")

    decoder.prefill(prompt)  # eager: the Python kernel
    monkeypatch.setattr(weight_only, "weight_only_linear_kernel", python_kernel)
    for token, reference in zip(tokens, expected, strict=True):
        torch.testing.assert_close(decoder.step(token), reference, rtol=1e-4, atol=1e-4)
    assert decoder.position == CACHE


def test_bad_input_and_a_full_cache_raise(llama_decoder):
    with pytest.raises(ValueError, match="int64"):
        llama_decoder.step(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        llama_decoder.step(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        llama_decoder.prefill(torch.zeros(1, CACHE, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed"):
        llama_decoder.generate(torch.zeros(1, 5, dtype=torch.long), CACHE)
    llama_decoder.prefill(torch.full((1, CACHE - 1), 3))
    llama_decoder.step(torch.full((1, 1), 3))
    with pytest.raises(ValueError, match="cache is full"):
        llama_decoder.step(torch.full((1, 1), 3))


def test_sliding_window_caches_are_refused_before_compiling():
    config = MistralConfig(**SHAPES, sliding_window=8)
    with pytest.raises(NotImplementedError, match="StaticSlidingWindowLayer"):
        rabit.AOTDecoder(MistralForCausalLM(config).eval(), max_cache_len=CACHE)
