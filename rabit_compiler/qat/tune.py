"""End-to-end scale tuning: the last, optional PTQ step. Every sign of a packed model stays as the fit chose
it; only the row and column scales (``2k(N + K)`` numbers per layer) and the biases are trained, by the
distillation of :class:`~rabit_compiler.qat.train.QATTrainer` (KL to the full-precision teacher)."""

from __future__ import annotations

import torch

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.qat.layers import convert, packed_fits, prepare_qat
from rabit_compiler.qat.train import QATConfig, QATTrainer


def tune_config(steps: int, batch_size: int, seq_len: int, lr: float = 1e-3, **settings) -> QATConfig:
    """The scale tuning's training settings: ``steps`` AdamW steps of ``batch_size`` windows of ``seq_len`` tokens,
    lr ``lr`` (only ``lr_scale`` matters: there are no latents) with up to 4 warm-up steps then cosine; ``settings``:
    any other :class:`QATConfig` field."""
    return QATConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr_scale=lr,
                     warmup_steps=min(4, steps - 1), optimizer="adamw", **settings)


def tune_scales_(model: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor,
                 config: QATConfig | None = None, progress: bool = True) -> dict[str, list]:
    """Tune the scales of ``model`` (packed by :func:`~rabit_compiler.quantize_`) in place against ``teacher``
    (the full-precision model) on token ``windows [num, T]``, and pack it again (scales in the model's
    ``rabit_config.scale_dtype``). ``config``: the training settings (default: 64 AdamW steps of 4 windows,
    lr 1e-3 with 4 warm-up steps then cosine; ``seq_len`` is taken from ``windows``); only its ``lr_scale``
    matters for the learning rate (there are no latents). Returns the trainer's history."""
    config = config or tune_config(64, 4, windows.shape[1])
    rabit_config = getattr(model, "rabit_config", None) or RaBiTConfig()
    fits = packed_fits(model)
    if not fits.fits:
        raise ValueError("the model has no packed RaBiTLinear layers to tune (run quantize_ first)")
    prepare_qat(model, rabit_config, "scales", fits=fits, progress=progress)
    history = QATTrainer(model, teacher, config, windows, progress=progress).train()
    model.eval()
    convert(model, rabit_config)
    return history
