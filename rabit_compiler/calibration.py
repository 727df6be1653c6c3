"""Find every linear of a model through its Dynamo graph, and collect channel statistics on calibration data.

The model is captured once with ``torch.compile`` and a capturing backend: the *find* pass maps each
linear node to the ``nn.Parameter`` feeding it (by identity), so this works for any architecture Dynamo
can trace (``nn.Linear``, GPT-2 ``Conv1D``, a raw parameter used through ``F.linear``). The captured graph
then runs through an :class:`fx.Interpreter` that records, per linear:

- ``input_stat [K]``: per-input-channel magnitude of the activations ``x`` (RMS or mean ``|x|``);
- ``output_stat [N]``: per-output-channel magnitude of ``dL/dy`` (next-token loss) when the model returns
  logits, else of ``y`` itself;
- ``input_gram [K, K]`` (when asked for): ``X^T X`` of the input rows, one ``addmm_`` per batch, shared by the
  linears that read the same input (q/k/v, gate/up).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from rabit_compiler.passes import GraphWeights, LinearSite, find_linears, selects_experts, weight_used_elsewhere

logger = logging.getLogger("rabit_compiler")

CALIBRATION_BATCH = 4
LOGITS_BUDGET_BYTES = 2**29
"""The fp32 logits of one calibration batch may take this much: the next-token loss holds ~4 copies of them (the
cast, the log-softmax and both gradients) while the backward runs, so a 152k-token vocabulary (Qwen2.5) calibrates
one 512-token window at a time instead of 4; SmolLM2's 49k keeps 4. Each batch's loss is a mean, so equal-sized
batches weigh alike whatever their size, and a uniform scale of the output-gradient statistics leaves every fit
unchanged."""


@dataclass
class ChannelStat:
    """Running per-channel ``sum(|v|)`` and ``sum(v^2)`` over rows."""

    abs_sum: torch.Tensor | None = None
    square_sum: torch.Tensor | None = None
    rows: int = 0

    def update(self, values: torch.Tensor) -> None:
        rows = values.detach().reshape(-1, values.shape[-1]).float()
        abs_sum, square_sum = rows.abs().sum(0), rows.square().sum(0)
        if self.abs_sum is None:
            self.abs_sum, self.square_sum = abs_sum, square_sum
        else:
            self.abs_sum += abs_sum
            self.square_sum += square_sum
        self.rows += rows.shape[0]

    def summary(self, statistic: str) -> torch.Tensor | None:
        if self.rows == 0:
            return None
        if statistic == "rms":
            return (self.square_sum / self.rows).sqrt()
        return self.abs_sum / self.rows


@dataclass
class InputGram:
    """Running ``X^T X [K, K]`` (fp32) over the rows of a linear's inputs."""

    matrix: torch.Tensor | None = None
    rows: int = 0

    def update(self, values: torch.Tensor) -> None:
        rows = values.detach().reshape(-1, values.shape[-1]).float()
        if self.matrix is None:
            self.matrix = rows.T @ rows
        else:
            self.matrix.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def add(self, gram: torch.Tensor, rows: int) -> None:
        """Add an already computed ``X^T X`` of ``rows`` rows (shared by linears that read the same ``X``)."""
        self.matrix = gram.clone() if self.matrix is None else self.matrix.add_(gram)
        self.rows += rows

    def mean(self) -> torch.Tensor | None:
        """``X^T X / rows``, or None before any update."""
        return None if self.rows == 0 else self.matrix / self.rows


@dataclass
class CapturedLinear:
    """One linear layer of the model: its weight parameter (as stored), bias, layout and statistics; ``router``: its
    output selects MoE experts (see :func:`~rabit_compiler.passes.find.selects_experts`)."""

    name: str
    weight: torch.nn.Parameter
    bias: torch.Tensor | None
    layout: str
    input_stat: ChannelStat = field(default_factory=ChannelStat)
    output_stat: ChannelStat = field(default_factory=ChannelStat)
    input_gram: InputGram | None = None
    other_uses: bool = False
    router: bool = False


class _StatsInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sites: dict[fx.Node, tuple[LinearSite, CapturedLinear]],
                 output_gradients: bool):
        super().__init__(gm)
        self.sites = sites
        self.output_gradients = output_gradients
        self.grams_updated: set[tuple[int, fx.Node]] = set()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.grams_updated.clear()
        return super().run(*args, **kwargs)

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if node not in self.sites:
            return result
        site, captured = self.sites[node]
        captured.input_stat.update(self.env[site.x])
        gram = captured.input_gram
        if gram is not None and (id(gram), site.x) not in self.grams_updated:
            gram.update(self.env[site.x])
            self.grams_updated.add((id(gram), site.x))
        if self.output_gradients and torch.is_grad_enabled():
            if not result.requires_grad:
                result = result.detach().requires_grad_(True)
            result.register_hook(lambda grad, captured=captured: captured.output_stat.update(grad))
        else:
            captured.output_stat.update(result)
        return result


class LinearCapture:
    """Captures a model's linears (see the module docstring); ``self.linears`` maps id(weight) to them.
    ``input_grams``: also accumulate each linear's ``X^T X``."""

    def __init__(self, model: torch.nn.Module, output_gradients: bool, input_grams: bool = False):
        self.model = model
        self.output_gradients = output_gradients
        self.input_grams = input_grams
        self.linears: dict[int, CapturedLinear] = {}
        self.skipped: list[str] = []
        self._names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        self._compiled = torch.compile(model, backend=self._backend, dynamic=False)

    def _backend(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        sites, skipped = find_linears(gm, example_inputs)
        self.skipped.extend(f"{s.node.name}: {s.reason}" for s in skipped)
        weights = GraphWeights(gm, example_inputs)
        site_nodes = {site.node for site in sites}
        grams: dict[fx.Node, InputGram] = {}
        by_node = {site.node: (site, self._record(gm, site, weights, site_nodes, grams)) for site in sites}
        interpreter = _StatsInterpreter(gm, by_node, self.output_gradients)
        return lambda *args: interpreter.run(*args)

    def _record(self, gm: fx.GraphModule, site: LinearSite, weights: GraphWeights,
                site_nodes: set[fx.Node], grams: dict[fx.Node, InputGram]) -> CapturedLinear:
        weight = weights.value(site.weight)
        bias = weights.value(site.bias) if site.bias is not None else None
        name = self._names.get(id(weight), weights.name(site.weight))
        captured = self.linears.get(id(weight))
        if captured is None:
            captured = CapturedLinear(name=name.removesuffix(".weight"), weight=weight, bias=bias, layout=site.layout)
            self.linears[id(weight)] = captured
        if self.input_grams:
            if captured.input_gram is None:
                captured.input_gram = grams.setdefault(site.x, InputGram())
            else:
                grams.setdefault(site.x, captured.input_gram)
        if weight_used_elsewhere(gm, site, site_nodes):
            captured.other_uses = True
        if selects_experts(site.node, site_nodes):
            captured.router = True
        return captured

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._compiled(*args, **kwargs)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` predicting ``input_ids [B, T]`` shifted by one."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
    )


def calibration_batches(calibration: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Token windows ``[num, T]`` split into batches of ``batch_size`` (or the given batches), checked."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"calibration tokens must be an integer tensor [num_windows, seq_len], got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        if calibration.shape[0] == 0:
            raise ValueError("calibration has no windows")
        return list(calibration.split(batch_size))
    batches = [torch.as_tensor(b) for b in calibration]
    if not batches:
        raise ValueError("calibration is empty")
    return batches


def capture_linears(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    batch_size: int = CALIBRATION_BATCH,
    progress: bool = True,
    input_grams: bool = False,
) -> LinearCapture:
    """Trace ``model(example_input)`` once to find its linears; with ``calibration`` (token windows
    ``[num, T]`` or an iterable of ``[B, T]`` batches) also collect their channel statistics (and ``X^T X``
    when ``input_grams``), with gradients of the next-token loss when the model returns logits."""
    device = next(model.parameters()).device
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        vocab = _logits_width(model, example_input.to(device))
        logits_model = vocab is not None
        capture = LinearCapture(model, output_gradients=logits_model, input_grams=input_grams)
        if calibration is None:
            with torch.no_grad():
                capture(example_input.to(device))
            return capture
        if logits_model and isinstance(calibration, torch.Tensor) and calibration.dim() == 2:
            batch_size = min(batch_size, max(1, LOGITS_BUDGET_BYTES // (4 * vocab * max(1, calibration.shape[1]))))
        batches = calibration_batches(calibration, batch_size)
        for batch in tqdm(batches, desc="rabit: calibration", disable=not progress):
            batch = batch.to(device)
            if logits_model:
                with torch.enable_grad():
                    next_token_loss(capture(batch).logits, batch).backward()
            else:
                with torch.no_grad():
                    capture(batch)
        return capture
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])


def _logits_width(model: torch.nn.Module, example_input: torch.Tensor) -> int | None:
    """The vocabulary size if the model maps token ids to an output with ``.logits`` (a language model), else None."""
    if example_input.is_floating_point():
        return None
    with torch.no_grad():
        output = model(example_input[:1, :2] if example_input.dim() == 2 else example_input)
    logits = getattr(output, "logits", None)
    return logits.shape[-1] if isinstance(logits, torch.Tensor) else None
