"""The AOTInductor decode step (:class:`rabit_compiler.AOTDecoder`): its logits equal the eager packed
model's step by step on the same static cache (GQA, q/k/v bias, batch 2, an int8 head), greedy text equal to
``generate``, and clear errors for a full cache, bad tokens and unsupported caches. One decoder is built for the
module (an AOTInductor build takes most of a minute on 2 cores); a Llama at batch 1 with the fp head is decoded
ahead of time by the CLI's test (``test_generate.py``: ``rabit generate --aot`` streams ``generate``'s text)."""

from __future__ import annotations

import pytest
import torch
from rabit_compiler.kernels import weight_only
from transformers import (
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
BATCH = 2
SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=0, eos_token_id=None)  # generate never stops early


def packed(model_class, config, head: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = model_class(config).eval()
    rabit.quantize_(model, rabit.RaBiTConfig(rounds=1, layer_paths={"*.down_proj": 3}, head=head), progress=False)
    return model


@pytest.fixture(scope="module")
def decoder() -> rabit.AOTDecoder:
    """Qwen2 (q/k/v bias, grouped-query attention), batch 2, an int8 head (the C++ ``rabit::weight_only_gemv``)."""
    return rabit.AOTDecoder(packed(Qwen2ForCausalLM, Qwen2Config(**SHAPES), head="int8"), max_cache_len=CACHE,
                            batch_size=BATCH, options={"cpu_tables": "fp32"})


def eager_steps(model, prompt: torch.Tensor, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """The eager packed model's logits for each of ``tokens`` after ``prompt``, on a static cache like the
    decoder's."""
    cache = StaticCache(config=model.config, max_cache_len=CACHE)
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{cache_keyword(model): cache})
        return [model(input_ids=t, use_cache=True, **{cache_keyword(model): cache}).logits for t in tokens]


def test_steps_equal_the_eager_model_over_the_whole_cache_and_run_no_python_kernel(decoder, monkeypatch):
    """The head in the step is the C++ operator ``rabit::weight_only_gemv`` called through its C shim, so the steps
    match the eager model (which runs the same kernel from Python) while the Python kernel entry raises."""

    def python_kernel(*args, **kwargs):
        raise AssertionError("the compiled step called the head's Python kernel")

    for seed in (0, 1):  # the second prefill resets the cache
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(2, VOCAB, (BATCH, 5), generator=generator)
        tokens = [torch.randint(2, VOCAB, (BATCH, 1), generator=generator) for _ in range(CACHE - 5)]
        expected = eager_steps(decoder.model, prompt, tokens)
        decoder.prefill(prompt)  # eager: the Python kernel
        with monkeypatch.context() as patch:
            patch.setattr(weight_only, "weight_only_linear_kernel", python_kernel)
            for token, reference in zip(tokens, expected, strict=True):
                logits = decoder.step(token)
                assert logits.shape == reference.shape
                # fp32 tables: fp32 sums in another order than the eager kernel's; logits are O(1)
                torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
        assert decoder.position == CACHE


def test_greedy_generation_equals_transformers_generate(decoder):
    prompt = torch.randint(2, VOCAB, (BATCH, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = decoder.model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(decoder.generate(prompt, 12), expected)


def test_bad_input_and_a_full_cache_raise(decoder):
    with pytest.raises(ValueError, match="int64"):
        decoder.step(torch.zeros(BATCH + 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        decoder.step(torch.zeros(BATCH, 1))
    with pytest.raises(ValueError, match=rf"input_ids must be \[{BATCH}, T\]"):
        decoder.prefill(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        decoder.prefill(torch.zeros(BATCH, CACHE, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed"):
        decoder.generate(torch.zeros(BATCH, 5, dtype=torch.long), CACHE)
    decoder.prefill(torch.full((BATCH, CACHE - 1), 3))
    decoder.step(torch.full((BATCH, 1), 3))
    with pytest.raises(ValueError, match="cache is full"):
        decoder.step(torch.full((BATCH, 1), 3))


def test_sliding_window_caches_are_refused_before_compiling():
    config = MistralConfig(**SHAPES, sliding_window=8)
    with pytest.raises(NotImplementedError, match="StaticSlidingWindowLayer"):
        rabit.AOTDecoder(MistralForCausalLM(config).eval(), max_cache_len=CACHE)
