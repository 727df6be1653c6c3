"""``quantize_``: replace a model's linear weights by packed residual-binary weights, in place.

1. Find the linears. Data-free, when every 2-D weight of the model sits in an ``nn.Linear``, GPT-2 ``Conv1D``
   or ``nn.Embedding``: from the modules alone, no tracing, no input (a weight that is also a parameter of
   another module, e.g. tied to an embedding, counts as used elsewhere). Otherwise (calibration data, or
   raw parameters that may feed ``F.linear``/``matmul``): through the model's Dynamo graph on an example
   input, collecting channel statistics on the calibration data (:mod:`rabit_compiler.calibration`).
2. Fit k binary paths per weight (``RaBiTConfig.fit``, from the statistics; with ``sequential``, decoder block
   by decoder block, see :mod:`rabit_compiler.sequential`) and pack.
3. Swap the owner: an ``nn.Linear`` or GPT-2 ``Conv1D`` becomes a :class:`RaBiTLinear`; any other module
   that uses a raw parameter through ``F.linear``/``matmul`` is symbolically traced and its graph frozen by
   the same *freeze & pack* pass the backend uses. A layer that cannot be swapped stays in full precision
   with a logged reason.
4. MoE experts held as 3-D parameters (transformers 5) are packed per expert into a
   :class:`~rabit_compiler.experts.RaBiTExperts` (:mod:`rabit_compiler.experts`). A model with experts is traced
   (step 1) so that its routers, the linears whose output selects experts, are found: they stay in full precision.

The full-precision weights are dropped: the model's memory falls to about k/16 of the linear weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from rabit_compiler.calibration import CapturedLinear, ChannelStat
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.experts import (
    ExpertsLayout,
    ExpertStatistics,
    capture_with_experts,
    find_experts,
    log_not_sequential,
    quantize_experts_,
)
from rabit_compiler.head import quantize_head_
from rabit_compiler.kernels import PackedResidualBinary, words_per_row
from rabit_compiler.passes import ROUTER_REASON, freeze_and_pack
from rabit_compiler.quantizer import fit_linear, pack_fit
from rabit_compiler.sequential import fit_in_block_order

logger = logging.getLogger("rabit_compiler")


class RaBiTLinear(torch.nn.Module):
    """A packed residual-binary linear layer: ``y = sum_i g_i * (B_i @ (h_i * x)) + b``.

    Buffers ``weight``: the packed sign words, int32 ``[k, N, ceil(K/32)]`` (also readable as
    ``packed_signs``), ``row_scale [k, N]``, ``col_scale [k, K]``; ``bias [N]`` (a parameter, as it was) or None.
    The sign words sit under the name ``weight`` so that a checkpoint of this layer, loaded by a model that
    expects a float ``weight [N, K]``, fails on the shape instead of silently keeping random weights.
    """

    def __init__(self, packed: PackedResidualBinary, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.num_paths = packed.num_paths
        self.register_buffer("weight", packed.packed_signs)
        self.register_buffer("row_scale", packed.row_scale)
        self.register_buffer("col_scale", packed.col_scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)

    @property
    def packed_signs(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rabit.residual_binary_linear(
            x, self.weight, self.row_scale, self.col_scale, self.bias, self.in_features
        )

    def packed(self) -> PackedResidualBinary:
        return PackedResidualBinary(self.weight, self.row_scale, self.col_scale, self.bias, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [N, K]``."""
        return self.packed().dequantize(dtype)

    def metadata(self) -> dict[str, Any]:
        """What :meth:`from_metadata` needs to rebuild this layer empty: k, N, K and the dtypes."""
        return {"paths": self.num_paths, "out_features": self.out_features, "in_features": self.in_features,
                "scale_dtype": dtype_name(self.row_scale.dtype),
                "bias_dtype": None if self.bias is None else dtype_name(self.bias.dtype)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> RaBiTLinear:
        """An uninitialised layer of the recorded shapes and dtypes, on the current default device (the meta
        device when a checkpoint is about to fill it)."""
        k, n, kk = metadata["paths"], metadata["out_features"], metadata["in_features"]
        scale_dtype = getattr(torch, metadata["scale_dtype"])
        packed = PackedResidualBinary(torch.empty(k, n, words_per_row(kk), dtype=torch.int32),
                                      torch.empty(k, n, dtype=scale_dtype), torch.empty(k, kk, dtype=scale_dtype),
                                      None, kk)
        bias_dtype = metadata["bias_dtype"]
        return cls(packed, None if bias_dtype is None else torch.empty(n, dtype=getattr(torch, bias_dtype)))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, paths={self.num_paths}, "
                f"bias={self.bias is not None}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass
class QuantizeReport:
    """What :func:`quantize_` did: layers packed, layers left in full precision (with reasons), the LM head
    made weight-only (its name, or None), and the bytes of the model's parameters and buffers before and after."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    head: str | None = None
    bytes_before: int = 0
    bytes_after: int = 0


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of all distinct parameters and buffers of ``model``."""
    seen: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def quantize_(
    model: torch.nn.Module,
    config: RaBiTConfig | None = None,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    example_input: torch.Tensor | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``model``'s linear layers in place to ``config.paths``-path residual binary.

    ``calibration``: token windows ``[num, T]`` (or an iterable of batches) used for the channel-importance
    preconditioning (and for an int4 head's GPTQ rounding: :func:`~rabit_compiler.head.quantize_head_`); without
    it the fit is data-free. The model is traced (once, with ``example_input``; by
    default the first calibration batch, else 8 token ids) only when calibration is given, a 2-D parameter
    sits outside ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` modules or the model has MoE experts (see the module
    docstring); tracing
    resets the ``torch.compiler`` caches when done. Returns a :class:`QuantizeReport`.
    """
    config = config or RaBiTConfig()
    report = QuantizeReport(bytes_before=model_bytes(model))
    sequential = config.sequential and calibration is not None
    experts, left = find_experts(model)
    linears, traced, expert_stats = find_linears(model, calibration, example_input, progress, experts,
                                                 input_grams=config.needs_input_gram and not sequential,
                                                 expert_grams=config.needs_input_gram)
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    by_owner: dict[str, list[tuple[str, CapturedLinear]]] = {}
    for linear in linears:
        reason = skip_reason(linear, config, names)
        if reason is not None:
            report.skipped[linear.name] = reason
            continue
        owner_name, _, attr = names[id(linear.weight)].rpartition(".")
        by_owner.setdefault(owner_name, []).append((attr, linear))

    def swap(owner_name: str, uses: list[tuple[str, CapturedLinear]]) -> None:
        reason = _swap(model, owner_name, uses, config)
        for _, linear in uses:
            if reason is None:
                report.quantized.append(linear.name)
            else:
                report.skipped[linear.name] = reason

    if sequential:
        log_not_sequential(experts)
        single = {owner: uses[0][1] for owner, uses in by_owner.items() if len(uses) == 1 and uses[0][0] == "weight"}
        fit_in_block_order(model, single, calibration, config.needs_input_gram,
                           lambda owner, _: swap(owner, by_owner.pop(owner)), progress)
    for owner_name, uses in tqdm(by_owner.items(), desc="rabit: fit + pack", disable=not progress):
        swap(owner_name, uses)
    linears.clear()
    packed_experts, experts_left = quantize_experts_(model, experts, config, expert_stats, progress)
    report.quantized.extend(packed_experts)
    report.skipped.update({**left, **experts_left})
    report.head = quantize_head_(model, config.head, config.scale_dtype, calibration, config.damp, progress)
    report.skipped.pop(report.head, None)
    for name, reason in report.skipped.items():
        logger.info("rabit: left in full precision: %s (%s)", name, reason)
    from rabit_compiler.integrations.transformers import mark_quantized  # imports this module

    mark_quantized(model, config)  # what save / save_pretrained record
    if traced:
        torch.compiler.reset()
    report.bytes_after = model_bytes(model)
    logger.info("rabit: quantized %d linears; parameters+buffers %.1f MB -> %.1f MB", len(report.quantized),
                report.bytes_before / 1e6, report.bytes_after / 1e6)
    return report


def find_linears(model: torch.nn.Module, calibration: torch.Tensor | Iterable[torch.Tensor] | None,
                 example_input: torch.Tensor | None, progress: bool, experts: dict[str, ExpertsLayout],
                 input_grams: bool = False, expert_grams: bool = False
                 ) -> tuple[list[CapturedLinear], bool, ExpertStatistics | None]:
    """The linears to fit, whether the model was traced to find them (see the module docstring), and the
    calibration statistics of the ``experts`` modules' experts (None without calibration); with ``input_grams`` /
    ``expert_grams`` the calibration also collects each linear's / expert's ``X^T X``."""
    unowned = unowned_matrices(model)
    if calibration is None and not unowned and not experts:
        return module_linears(model), False, None
    if example_input is None:
        example_input = default_example_input(model, calibration, unowned)
    capture, statistics = capture_with_experts(model, example_input, calibration, experts, progress, input_grams,
                                               expert_grams)
    for reason in capture.skipped:
        logger.info("rabit: not a quantizable linear: %s", reason)
    linears = list(capture.linears.values())
    if calibration is None:  # the tracing run recorded statistics of the example input: not calibration data
        for linear in linears:
            linear.input_stat, linear.output_stat = ChannelStat(), ChannelStat()
    return linears, True, statistics


def _linear_layout(module: torch.nn.Module) -> str | None:
    """``"out_in"`` for an ``nn.Linear`` (weight ``[N, K]``), ``"in_out"`` for a GPT-2 ``Conv1D`` (``[K, N]``)."""
    if isinstance(module, torch.nn.Linear):
        return "out_in"
    return "in_out" if type(module).__name__ == "Conv1D" else None


def module_linears(model: torch.nn.Module) -> list[CapturedLinear]:
    """Every ``nn.Linear`` / ``Conv1D`` of ``model`` from its modules alone (no statistics); a weight that is a
    parameter of more than one module (a tie) is marked as used elsewhere."""
    holders: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        holders[id(parameter)] = holders.get(id(parameter), 0) + 1
    linears = []
    for name, module in model.named_modules():
        layout = _linear_layout(module)
        if layout is not None and isinstance(module.weight, torch.nn.Parameter):
            linears.append(CapturedLinear(name=name, weight=module.weight, bias=module.bias, layout=layout,
                                          other_uses=holders[id(module.weight)] > 1))
    return linears


def unowned_matrices(model: torch.nn.Module) -> list[str]:
    """2-D floating-point parameters held by modules other than ``nn.Linear``, ``Conv1D`` and ``nn.Embedding``:
    only a traced run shows whether they feed linear layers."""
    names = []
    for module_name, module in model.named_modules():
        if _linear_layout(module) is not None or isinstance(module, torch.nn.Embedding):
            continue
        for attr, parameter in module.named_parameters(recurse=False):
            if parameter.dim() == 2 and parameter.is_floating_point():
                names.append(f"{module_name}.{attr}" if module_name else attr)
    return names


def default_example_input(model: torch.nn.Module, calibration: object, unowned: list[str] | None = None
                          ) -> torch.Tensor:
    """A ``[1, T]`` token batch to trace ``model`` with: the first calibration window, else ids ``0..7``.
    ``unowned`` (the parameters that made tracing necessary) is named in the error when neither exists."""
    if isinstance(calibration, torch.Tensor):
        return calibration[:1]
    if calibration is not None:
        raise ValueError("pass example_input when calibration is not a tensor of token windows")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        why = (f": {unowned} are parameters outside nn.Linear / Conv1D / nn.Embedding modules, and only a run of "
               "the model shows whether they feed linear layers") if unowned else ""
        raise ValueError(f"pass example_input (an input the model's forward takes) to trace the model{why}; the "
                         "model has no config.vocab_size to make token ids from")
    return torch.arange(8).remainder(vocab).unsqueeze(0)


def skip_reason(linear: CapturedLinear, config: RaBiTConfig, names: dict[int, str]) -> str | None:
    """Why ``linear`` stays in full precision (``names``: id of each model parameter -> its name), or None."""
    if config.skips(linear.name):
        return "matches a skip pattern"
    if id(linear.weight) not in names:
        return "weight is not a parameter of the model"
    if linear.other_uses:
        return "weight is also used outside linear layers (e.g. tied to an embedding)"
    if linear.router:
        return ROUTER_REASON
    weight = linear.weight
    if weight.dim() != 2 or weight.numel() == 0:
        return f"weight of shape {tuple(weight.shape)} is empty or not 2-D"
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        return "weight is not floating point or has NaN/Inf values"
    return None


def _fit_and_pack(linear: CapturedLinear, config: RaBiTConfig) -> PackedResidualBinary:
    config = config.for_layer(linear.name)
    return pack_fit(fit_linear(linear, config), config, device=linear.weight.device)


def _swap(model: torch.nn.Module, owner_name: str, uses: list[tuple[str, CapturedLinear]],
          config: RaBiTConfig) -> str | None:
    """Replace the module ``owner_name`` whose parameters ``uses`` feed linears; a reason if it could not."""
    if not owner_name:
        return "the weight belongs to the root module, which cannot be replaced in place"
    owner = model.get_submodule(owner_name)
    (attr, linear), many = uses[0], len(uses) > 1
    is_conv1d = type(owner).__name__ == "Conv1D" and linear.layout == "in_out"
    if not many and attr == "weight" and (isinstance(owner, torch.nn.Linear) or is_conv1d):
        set_submodule(model, owner_name, RaBiTLinear(_fit_and_pack(linear, config), owner.bias))
        return None
    return _freeze_owner(model, owner_name, owner, dict(uses), config)


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """``model.<name> = module`` for a dotted ``name`` that already exists in ``model`` (else AttributeError)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise AttributeError(f"{type(parent).__name__} has no attribute {child!r} (setting {name!r})")
    setattr(parent, child, module)


class _LeafTracer(fx.Tracer):
    """Traces only the owner's own forward: every child module is a leaf."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return True


def _freeze_owner(model: torch.nn.Module, owner_name: str, owner: torch.nn.Module,
                  uses: dict[str, CapturedLinear], config: RaBiTConfig) -> str | None:
    """Symbolically trace a module that uses raw parameters in linears, and freeze those uses."""
    kind = type(owner).__name__
    try:
        graph = _LeafTracer().trace(owner)
    except Exception as error:  # symbolic tracing fails on data-dependent Python control flow
        return f"its module {kind} cannot be symbolically traced ({type(error).__name__}: {error})"
    gm = fx.GraphModule(owner, graph, class_name=kind + "RaBiT")

    def quantize(name: str, weight: torch.Tensor, oriented: torch.Tensor) -> PackedResidualBinary:
        return _fit_and_pack(uses[name], config)

    packed, _ = freeze_and_pack(gm, quantize, skip=lambda name: name not in uses)
    missing = set(uses) - {site.name for site in packed}
    if missing:
        return f"{kind} uses {sorted(missing)} in ways other than a linear layer"
    for attr in uses:
        if any(n.op == "get_attr" and n.target == attr for n in gm.graph.nodes):
            return f"{kind} also uses {attr} outside a linear"
        delattr(gm, attr)
    set_submodule(model, owner_name, gm)
    return None
