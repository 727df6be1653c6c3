"""Inter-path diagnostics of residual-binary layers on calibration inputs.

For a layer in QAT form with paths ``W_1, W_2`` (``[N, K]``, the first two) and the original full-precision
weight ``W [N, K]`` (from the teacher), on the layer's real inputs ``x [M, K]``:

- path correlation ``Corr(y_1, y_2)`` with ``y_i = x W_i^T``: how redundant the two paths' outputs are;
- residual alignment ``Corr(R_1 x, y_2)`` with ``R_1 = W - W_1``: how much path 2 fits the error path 1
  leaves (the RaBiT paper reports ~0.6 for coupled training vs ~0.25 for standard residual QAT).

``Corr`` is the Pearson correlation over all ``M * N`` output elements, accumulated in fp64 over batches.

And, against the initial fits, the fraction of each path's signs that training has flipped
(:func:`sign_changes`): how far QAT moved away from the init (few flips on path 1 make coupled training and
path freezing nearly the same thing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rabit_compiler.qat.layers import LinearFits, ResidualBinaryTrainLinear, qat_layers


class _Correlation:
    """Streaming Pearson correlation of two equally shaped tensors (fp64 sums)."""

    def __init__(self) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64)
        self.count = 0

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
        self.sums += torch.stack([a.sum(), b.sum(), (a * a).sum(), (b * b).sum(), (a * b).sum()])
        self.count += a.numel()

    def value(self) -> float:
        sa, sb, saa, sbb, sab = (s / self.count for s in self.sums)
        variance = (saa - sa * sa) * (sbb - sb * sb)
        return float((sab - sa * sb) / variance.sqrt()) if variance > 0 else float("nan")


@dataclass
class PathDiagnostics:
    """One layer's ``Corr(y_1, y_2)`` and ``Corr(R_1 x, y_2)`` (see the module docstring)."""

    layer: str
    path_correlation: float
    residual_alignment: float


def _reference_weight(teacher: torch.nn.Module, name: str) -> torch.Tensor:
    module = teacher.get_submodule(name)
    weight = module.weight.detach().float()
    return weight if isinstance(module, torch.nn.Linear) else weight.T  # GPT-2 Conv1D stores [K, N]


def path_diagnostics(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor,
                     batch_size: int = 4, layers: list[str] | None = None) -> list[PathDiagnostics]:
    """Run ``student`` (prepared by :func:`~rabit_compiler.qat.prepare_qat`, at least 2 paths) on token
    ``windows [num, T]`` and return the diagnostics of its QAT layers (all, or those named in ``layers``),
    the original weights taken from ``teacher`` (same module names)."""
    chosen = qat_layers(student)
    if layers is not None:
        unknown = sorted(set(layers) - set(chosen))
        if unknown:
            raise ValueError(f"not QAT layers of the student: {unknown}")
        chosen = {name: chosen[name] for name in layers}
    if not chosen:
        raise ValueError("the student has no ResidualBinaryTrainLinear layers (call prepare_qat first)")
    if any(layer.num_paths < 2 for layer in chosen.values()):
        raise ValueError("path diagnostics need at least 2 paths per layer")
    sums = {name: (_Correlation(), _Correlation()) for name in chosen}

    def hook(name: str, layer: ResidualBinaryTrainLinear, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().float().reshape(-1, layer.in_features)
        paths = layer.current_paths()
        first, second = paths.path(0), paths.path(1)
        residual = _reference_weight(teacher, name).to(first.device) - first
        y1, y2 = x @ first.T, x @ second.T
        sums[name][0].update(y1, y2)
        sums[name][1].update(x @ residual.T, y2)

    handles = [layer.register_forward_pre_hook(lambda m, i, name=name: hook(name, m, i))
               for name, layer in chosen.items()]
    device = next(student.parameters()).device
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                student(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return [PathDiagnostics(name, pair[0].value(), pair[1].value()) for name, pair in sums.items()]


def sign_changes(student: torch.nn.Module, fits: LinearFits) -> list[float]:
    """Per path i, the fraction of all QAT layers' signs ``B_i`` (as the forward derives them now) that differ
    from the initial fits the student was prepared from: ``sum |B_i != B_i^init| / sum N K``."""
    layers = qat_layers(student)
    if not layers:
        raise ValueError("the student has no ResidualBinaryTrainLinear layers (call prepare_qat first)")
    changed, total = None, 0
    for name, layer in layers.items():
        if name not in fits.fits:
            raise ValueError(f"no initial fit for {name}")
        current = layer.current_paths().signs
        initial = fits.fits[name].signs.to(current.device)
        flips = (current != initial).flatten(1).sum(1).double()
        changed = flips if changed is None else changed + flips
        total += current[0].numel()
    return (changed / total).tolist()
