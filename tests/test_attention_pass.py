"""The grouped-query decode attention pass: it fires exactly on one-position attention over a repeated cache, and
the folded call equals a float64 reference of the original (random heads, groups, cache lengths, masks, dtypes)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rabit_compiler.passes.attention import fold_grouped_query_attention
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import rabit_compiler as rabit
from rabit_compiler.aot_decode import cache_keyword


def repeat_kv(cache: torch.Tensor, groups: int) -> torch.Tensor:
    """Hugging Face's ``repeat_kv``, as models write it."""
    b, kv_heads, length, dim = cache.shape
    return cache[:, :, None, :, :].expand(b, kv_heads, groups, length, dim).reshape(b, kv_heads * groups, length, dim)


class Attention(torch.nn.Module):
    def __init__(self, groups: int, scale: float | None):
        super().__init__()
        self.groups, self.scale = groups, scale

    def forward(self, query, key_cache, value_cache, mask):
        key, value = repeat_kv(key_cache, self.groups), repeat_kv(value_cache, self.groups)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                                                scale=self.scale, is_causal=False)


def folding(counts: list[int]):
    def backend(gm, example_inputs):
        counts.append(fold_grouped_query_attention(gm))
        return gm.forward

    return backend


def reference(query, key_cache, value_cache, mask, groups, scale) -> torch.Tensor:
    """softmax(q K^T * scale + mask) V in float64 on the repeated cache."""
    q, k, v = (t.double() for t in (query, repeat_kv(key_cache, groups), repeat_kv(value_cache, groups)))
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return scores.softmax(-1) @ v


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), groups=st.integers(1, 4), length=st.integers(1, 37),
       dim=st.sampled_from([4, 17, 32]), positions=st.sampled_from([1, 1, 3]),
       mask_kind=st.sampled_from(["none", "bool", "float"]), dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.sampled_from([None, 0.3]), seed=st.integers(0, 2**16))
def test_folded_decode_attention_equals_the_repeated_cache(batch, kv_heads, groups, length, dim, positions,
                                                           mask_kind, dtype, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, positions, dim, generator=generator, dtype=dtype)
    key_cache, value_cache = (torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=dtype)
                              for _ in range(2))
    mask = None
    if mask_kind != "none":  # one mask row shared by every head (a static cache's unfilled slots), >= 1 key kept
        keep = torch.rand(batch, 1, 1, length, generator=generator) < 0.7
        keep[..., 0] = True
        mask = keep if mask_kind == "bool" else torch.where(keep, 0.0, float("-inf")).to(dtype)
    counts: list[int] = []
    torch.compiler.reset()
    compiled = torch.compile(Attention(groups, scale), backend=folding(counts), fullgraph=True, dynamic=False)
    result = compiled(query, key_cache, value_cache, mask)
    assert counts == [1 if positions == 1 else 0]  # prefill (several positions) keeps its form
    expected = reference(query, key_cache, value_cache, mask, groups, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12  # fp32 softmax-weighted sums of unit-size values
    assert result.dtype == dtype and result.shape == expected.shape
    assert torch.allclose(result.double(), expected, rtol=tolerance, atol=tolerance)


def test_a_mask_per_head_is_left_alone():
    counts: list[int] = []
    torch.compiler.reset()
    compiled = torch.compile(Attention(2, None), backend=folding(counts), fullgraph=True)
    mask = torch.zeros(1, 4, 1, 5)
    compiled(torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), mask)
    assert counts == [0]


@pytest.mark.parametrize("inductor", [False, True])
def test_grouped_query_llama_decodes_like_eager_with_the_fold(inductor):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=67, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    rabit.quantize_(model, rabit.RaBiTConfig(rounds=0), progress=False)
    prompt = torch.randint(0, 67, (1, 5))
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        compiled = rabit.rabit_backend(gm, example_inputs, options={"inductor": inductor})
        graphs.append(gm)
        return compiled

    step = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)
    logits = {}
    for name, forward in (("eager", model.forward), ("compiled", step)):
        cache = StaticCache(config=copy.deepcopy(config), max_cache_len=12)
        with torch.no_grad():
            out = model(prompt, cache_position=torch.arange(5), **{cache_keyword(model): cache}).logits
            steps = []
            for position in range(5, 9):
                token = out[:, -1:].argmax(-1)
                out = forward(input_ids=token, cache_position=torch.tensor([position]),
                              **{cache_keyword(model): cache})
                out = out.logits
                steps.append(out)
        logits[name] = torch.cat(steps)
    calls = [node for gm in graphs for node in gm.graph.nodes
             if node.op == "call_function" and str(node.target) == "rabit.decode_attention.default"]
    # the CPU decode attention kernel reading the caches themselves
    assert len(calls) == 2 and all(node.args[1].op == "placeholder" for node in calls)
    assert torch.allclose(logits["compiled"], logits["eager"], rtol=1e-4, atol=1e-4)
