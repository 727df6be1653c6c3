"""Perplexity on token windows: the value against a float64 reference, and one input shape per call."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rabit_compiler.evaluate import perplexity

VOCAB = 11


class BigramLM(torch.nn.Module):
    """Logits of the next token from the current one (a table), with every input shape it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        self.shapes.append(tuple(ids.shape))
        return SimpleNamespace(logits=self.table[ids])


def reference_perplexity(table: torch.Tensor, windows: torch.Tensor) -> float:
    log_probs = torch.log_softmax(table.double()[windows[:, :-1]], dim=-1)
    nll = -log_probs.gather(-1, windows[:, 1:, None]).sum()
    return math.exp(nll.item() / (windows.shape[0] * (windows.shape[1] - 1)))


@settings(max_examples=30, deadline=None)
@given(num_windows=st.integers(1, 13), seq_len=st.integers(2, 9), batch_size=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_perplexity_matches_reference_with_one_input_shape(num_windows, seq_len, batch_size, seed):
    windows = torch.randint(0, VOCAB, (num_windows, seq_len), generator=torch.Generator().manual_seed(seed))
    model = BigramLM().eval()
    got = perplexity(model, windows, batch_size=batch_size, progress=False)
    # fp32 logits, sums of at most 13 * 8 log-probabilities: a relative error of a few fp32 ulps per term
    assert got == pytest.approx(reference_perplexity(model.table.detach(), windows), rel=1e-5)
    assert len(set(model.shapes)) == 1
    assert model.shapes[0][0] <= batch_size
    assert len(model.shapes) == math.ceil(num_windows / batch_size)


def test_nine_windows_in_batches_of_four_run_as_three_of_three():
    model = BigramLM().eval()
    perplexity(model, torch.zeros(9, 5, dtype=torch.long), batch_size=4, progress=False)
    assert model.shapes == [(3, 5)] * 3


@pytest.mark.parametrize(("windows", "batch_size", "message"), [
    (torch.zeros(3, 4), 2, "integer tensor"),
    (torch.zeros(3, dtype=torch.long), 2, "integer tensor"),
    (torch.zeros(0, 4, dtype=torch.long), 2, "at least one window"),
    (torch.zeros(3, 1, dtype=torch.long), 2, "at least 2 tokens"),
    (torch.zeros(3, 4, dtype=torch.long), 0, "batch_size must be positive"),
])
def test_perplexity_rejects_bad_input(windows, batch_size, message):
    with pytest.raises(ValueError, match=message):
        perplexity(BigramLM().eval(), windows, batch_size=batch_size, progress=False)
