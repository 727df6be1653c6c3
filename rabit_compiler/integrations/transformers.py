"""RaBiT models through transformers' own ``save_pretrained`` / ``from_pretrained`` / ``pipeline``.

``import rabit_compiler`` registers the quantization method ``"rabit"``: :class:`RaBiTQuantizationConfig` (the
``quantization_config`` saved in ``config.json``, see :func:`rabit_compiler.serialization.quantization_record`)
and :class:`RaBiTHfQuantizer`, which ``from_pretrained`` runs on a checkpoint with that config: it checks the
tensor files (sizes, sha256, packed tensors' dtypes and shapes) and swaps the recorded linears for packed modules
of the recorded shapes on the meta device before any weight is read, so the packed tensors load as they are
and no fp weight of a quantized layer is ever materialised. :func:`mark_quantized` (called by ``quantize_``,
``convert`` and ``save``) attaches the same quantizer to a model quantized in this process, so that its
``save_pretrained`` writes the quantization_config and the packed tensors.

Without ``import rabit_compiler``, transformers does not know ``"rabit"``: it warns and loads the fp
architecture, which fails on the packed layers' ``weight`` (int32 ``[k, N, ceil(K/32)]`` where ``[N, K]`` is
expected) unless the caller passes ``ignore_mismatched_sizes=True``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.serialization import (
    QUANT_METHOD,
    build_packed_layers,
    check_record,
    digest_metadata,
    expected_tensors,
    place_packed_layers,
    quantization_record,
    rabit_config,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger("rabit_compiler")


@register_quantization_config(QUANT_METHOD)
class RaBiTQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a RaBiT model: the entries of
    :func:`~rabit_compiler.serialization.quantization_record`, checked on construction (an invalid one, e.g. an
    edited ``config.json``, raises :class:`~rabit_compiler.RaBiTFormatError` naming the entry)."""

    def __init__(self, **record: Any):
        check_record(record, "quantization_config")
        self.__dict__.update(record)

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: RaBiTConfig | None) -> RaBiTQuantizationConfig:
        return cls(**quantization_record(model, config))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__))


@register_quantizer(QUANT_METHOD)
class RaBiTHfQuantizer(HfQuantizer):
    """Loads and saves pre-quantized RaBiT checkpoints (quantize with :func:`rabit_compiler.quantize_`)."""

    requires_calibration = True
    quantization_config: RaBiTQuantizationConfig

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> PreTrainedModel:
        with torch.device("meta"):
            layers = build_packed_layers(self.quantization_config.layers, "quantization_config")
        if checkpoint_files:
            verify_checkpoint([Path(f) for f in checkpoint_files], expected_tensors(layers))
        else:
            logger.warning("rabit: from_pretrained gave no checkpoint files (a state_dict was passed?): the packed "
                           "tensors' checksums and shapes are not verified before loading")
        place_packed_layers(model, layers)
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        model.rabit_config = rabit_config(self.quantization_config.to_dict(), "quantization_config")
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Called by ``save_pretrained`` before it writes ``config.json``: records the model's packed layers as
        they are now, and the sha256 of every tensor for the safetensors header."""
        config = getattr(model, "rabit_config", None)
        self.quantization_config.__dict__.update(quantization_record(model, config))
        # save_pretrained next reverts transformers' weight conversions (e.g. MoE experts back to per-expert 2-D
        # weights); a RaBiT checkpoint keeps the model's own names, which from_pretrained loads unconverted
        model._weight_conversions = []
        state_dict = model.state_dict()
        return state_dict, digest_metadata(state_dict)

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (PEFT) train on top of the packed layers; the packed tensors themselves have no gradient."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def mark_quantized(model: torch.nn.Module, config: RaBiTConfig | None) -> None:
    """Record ``config`` on ``model`` and, for a Hugging Face model, attach the ``"rabit"`` quantizer and
    quantization_config as ``from_pretrained`` would, so that ``save_pretrained`` writes a RaBiT checkpoint."""
    from transformers import PreTrainedModel  # not at import: transformers may be importing rabit_compiler

    model.rabit_config = config
    if not isinstance(model, PreTrainedModel):
        return
    try:
        quantization_config = RaBiTQuantizationConfig.from_model(model, config)
    except ValueError as error:  # packed weights in symbolically traced owners: no checkpoint format for them
        logger.warning("rabit: %s; rabit.save refuses this model and save_pretrained would write its packed "
                       "buffers under names no load rebuilds", error)
        return
    model.config.quantization_config = quantization_config
    model.hf_quantizer = RaBiTHfQuantizer(quantization_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True
