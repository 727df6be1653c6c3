"""The LM head in weight-only int8 / int4 (:mod:`rabit_compiler.kernels.weight_only`), the embedding left exact.

In a small model the head dominates the bytes read per decoded token (SmolLM2: a 49,152 x 576 fp32 head is 113 MB,
every packed linear together 27 MB). :func:`quantize_head_` replaces it with a :class:`WeightOnlyLinear`; a head tied
to the input embedding is untied first, so the embedding keeps its full-precision rows (one row read per token).
With calibration an int4 head is rounded by GPTQ under its own inputs (:func:`head_input_gram`): rounded to nearest
it costs perplexity that int8 does not, by GPTQ little more than int8 (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from rabit_compiler.calibration import CALIBRATION_BATCH, calibration_batches
from rabit_compiler.config import HEAD_SCHEMES
from rabit_compiler.fit import dampened, inverse_hessian_factor
from rabit_compiler.kernels.weight_only import (
    BLOCK,
    WeightOnlyQuantized,
    check_scheme,
    dequantize_weight_only,
    gptq_weight_only,
    num_groups,
    quantize_weight_only,
)

logger = logging.getLogger("rabit_compiler")

class WeightOnlyLinear(torch.nn.Module):
    """``y = x @ (q * s)^T + b``: buffers ``qweight`` (int8 ``[N, K]`` or packed int4 ``[N, 16 ceil(K/32)]``) and
    ``scale [N, G]``; ``bias [N]`` (a parameter) or None."""

    def __init__(self, quantized: WeightOnlyQuantized, bias: torch.Tensor | None = None):
        super().__init__()
        check_scheme(quantized.bits, quantized.group_size)
        self.bits, self.group_size = quantized.bits, quantized.group_size
        self.in_features, self.out_features = quantized.in_features, quantized.qweight.shape[0]
        self.register_buffer("qweight", quantized.qweight)
        self.register_buffer("scale", quantized.scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int, group_size: int | None,
                    scale_dtype: torch.dtype = torch.float16) -> WeightOnlyLinear:
        return cls(quantize_weight_only(linear.weight, bits, group_size, scale_dtype), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rabit.weight_only_linear(x, self.qweight, self.scale, self.bias, self.bits,
                                                  self.group_size or 0, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [N, K]``."""
        return dequantize_weight_only(self.qweight, self.scale, self.bits, self.group_size, self.in_features, dtype)

    def metadata(self) -> dict[str, Any]:
        """What :meth:`from_metadata` needs to rebuild this layer empty (see :mod:`rabit_compiler.serialization`)."""
        return {"bits": self.bits, "group_size": self.group_size, "out_features": self.out_features,
                "in_features": self.in_features, "scale_dtype": str(self.scale.dtype).removeprefix("torch."),
                "bias_dtype": None if self.bias is None else str(self.bias.dtype).removeprefix("torch.")}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> WeightOnlyLinear:
        """An uninitialised layer of the recorded scheme, shapes and dtypes, on the current default device."""
        bits, group_size, n, k = (metadata[key] for key in ("bits", "group_size", "out_features", "in_features"))
        check_scheme(bits, group_size)
        row_bytes = k if bits == 8 else 16 * -(-k // BLOCK)
        qweight = torch.empty(n, row_bytes, dtype=torch.int8 if bits == 8 else torch.uint8)
        scale = torch.empty(n, num_groups(k, group_size), dtype=getattr(torch, metadata["scale_dtype"]))
        bias_dtype = metadata["bias_dtype"]
        return cls(WeightOnlyQuantized(qweight, scale, bits, group_size, k),
                   None if bias_dtype is None else torch.empty(n, dtype=getattr(torch, bias_dtype)))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def head_name(model: torch.nn.Module) -> str | None:
    """Dotted name of the model's LM head: a Hugging Face model's output embeddings, else a module ``lm_head``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or (head is None and name.rpartition(".")[2] == "lm_head"):
            return name
    return None


def quantize_head_(model: torch.nn.Module, scheme: str, scale_dtype: torch.dtype = torch.float16,
                   calibration: torch.Tensor | Iterable[torch.Tensor] | None = None, damp: float = 0.01,
                   progress: bool = False) -> str | None:
    """Replace the LM head by a :class:`WeightOnlyLinear` of ``scheme`` (a key of :data:`HEAD_SCHEMES`, or
    ``"auto"``: int4 with ``calibration``, int8 without), untying it from the input embedding if tied. Returns the
    head's name, or None when nothing was replaced (scheme ``"fp"``, no head found, or a head that is not an
    ``nn.Linear``: logged).

    With ``calibration`` (token windows ``[num, T]`` or batches), an int4 head is rounded by GPTQ under the second
    moment ``H`` of its inputs on those tokens as ``model`` computes them now (:func:`gptq_weight_only`, ``H``
    dampened by ``damp``); without, and for int8 (whose rounding costs no measurable perplexity), to nearest."""
    if scheme == "auto":
        scheme = "int8" if calibration is None else "int4"
    if scheme not in HEAD_SCHEMES:
        raise ValueError(f"head scheme must be one of {sorted((*HEAD_SCHEMES, 'auto'))}, got {scheme!r}")
    if HEAD_SCHEMES[scheme] is None:
        return None
    name = head_name(model)
    head = None if name is None else model.get_submodule(name)
    if not isinstance(head, torch.nn.Linear):
        logger.info("rabit: LM head left as it is: %s", "none found" if head is None else
                    f"{name} is a {type(head).__name__}, not an nn.Linear")
        return None
    bits, group_size = HEAD_SCHEMES[scheme]
    by_gptq = calibration is not None and bits == 4
    if by_gptq:
        factor = inverse_hessian_factor(dampened(head_input_gram(model, head, calibration, progress), damp))
        quantized = gptq_weight_only(head.weight, bits, group_size, factor, scale_dtype)
        replacement = WeightOnlyLinear(quantized, head.bias)
    else:
        replacement = WeightOnlyLinear.from_linear(head, bits, group_size, scale_dtype)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # the embedding keeps its fp rows; the head is its own tensor now
    logger.info("rabit: LM head %s -> weight-only %s%s", name, scheme,
                " (GPTQ under its calibration inputs)" if by_gptq else "")
    return name


class _HeadReached(Exception):
    """Raised by :func:`head_input_gram`'s hook: the head's inputs are recorded, its logits are not needed."""


def head_input_gram(model: torch.nn.Module, head: torch.nn.Module,
                    calibration: torch.Tensor | Iterable[torch.Tensor], progress: bool = False) -> torch.Tensor:
    """``H = X^T X / rows`` ``[K, K]`` (fp32) of the inputs ``X`` that ``head`` (a linear of ``in_features``
    columns) receives when ``model`` runs on ``calibration``; the forward stops at the head (no logits)."""
    gram = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)
    rows = 0

    def record(module: torch.nn.Module, args: tuple) -> None:
        nonlocal rows
        inputs = args[0].detach().reshape(-1, head.in_features).double()
        gram.add_((inputs.T @ inputs).cpu())
        rows += inputs.shape[0]
        raise _HeadReached

    device = next(model.parameters()).device
    hook = head.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for batch in tqdm(calibration_batches(calibration, CALIBRATION_BATCH), desc="rabit: head inputs",
                              disable=not progress):
                try:
                    model(batch.to(device))
                except _HeadReached:
                    continue
    finally:
        hook.remove()
    if rows == 0:
        raise ValueError("the calibration never reached the LM head: no input second moment to fit it under")
    return (gram / rows).float()
