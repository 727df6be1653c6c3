"""Evaluation on token windows: perplexity, and greedy generation for a quick look at the text."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger("rabit_compiler")


def _device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """Perplexity of a causal LM on token windows: exp of the mean next-token negative log-likelihood.

    ``windows``: an integer tensor ``[num_windows, seq_len]`` (seq_len >= 2), e.g. from
    :func:`rabit_compiler.data.token_windows`. Each window is scored on its own with no BOS prepended:
    ``model(window).logits[:, :-1]`` predicts ``window[:, 1:]``, so there are ``num_windows * (seq_len - 1)``
    predictions. The loss is computed in fp32 whatever the model's dtype. Call ``model.eval()`` first.

    The windows go in ``ceil(num_windows / batch_size)`` batches of one size, at most ``batch_size`` (9 windows at
    4: three of 3); where they do not divide evenly, the last batch is filled up with copies of its last window,
    which are not scored. A compiled model so sees one input shape and compiles once.
    """
    if windows.dim() != 2 or windows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"windows must be an integer tensor [num_windows, seq_len], got {windows.dtype} "
                         f"{tuple(windows.shape)}")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"need at least one window of at least 2 tokens, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if model.training:
        logger.warning("perplexity: the model is in training mode (dropout is active); call model.eval() first")
    device = _device(model)
    num_windows = windows.shape[0]
    size = math.ceil(num_windows / math.ceil(num_windows / batch_size))
    total_nll = 0.0
    with torch.no_grad():
        for batch in tqdm(windows.split(size), desc="rabit: perplexity", disable=not progress):
            scored = batch.shape[0]
            filler = batch[-1:].expand(size - scored, -1)
            ids = torch.cat([batch, filler]).to(device=device, dtype=torch.long)
            logits = model(ids).logits[:scored, :-1]  # [scored, L-1, V]
            targets = ids[:scored, 1:]  # [scored, L-1]
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += nll.item()
    return math.exp(total_nll / (num_windows * (windows.shape[1] - 1)))


def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` with ``model.generate``; returns only the new text (decoded without
    special tokens), not the prompt."""
    inputs = tokenizer(prompt, return_tensors="pt").to(_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
