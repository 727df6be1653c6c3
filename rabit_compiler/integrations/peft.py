"""LoRA adapters on packed :class:`~rabit_compiler.RaBiTLinear` layers, through PEFT::

    y = RaBiTLinear(x) + lora_B(lora_A(dropout(x))) * scaling        scaling = lora_alpha / r (or / sqrt(r))

The packed sign words and scales are buffers and stay bit-identical: only ``lora_A`` / ``lora_B`` train, and
gradients reach the earlier layers through the packed op's input gradient. Forward, dropout, scaling, several
adapters and saving are PEFT's own ``lora.Linear``; this layer only refuses what needs the full-precision weight
(merging, DoRA and the other weight-derived variants, PiSSA-style inits): ``W_hat + scaling * B @ A`` is not a
k-path residual-binary weight, so packing it again would change the function the adapter was trained for.

Importing this module registers the layer with every ``peft.LoraConfig`` created afterwards (PEFT's custom-module
API, ``LoraConfig._register_custom_module``), so ``get_peft_model(model, LoraConfig(target_modules=[...]))`` and
``PeftModel.from_pretrained(model, adapter_dir)`` work unchanged; ``import rabit_compiler`` imports it as soon as
``peft.tuners.lora.layer`` has been imported (:mod:`rabit_compiler.integrations.imports`). It imports nothing from
the top-level ``peft`` package, which may still be initialising then.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import version
from typing import Any

from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from rabit_compiler.quantize import RaBiTLinear

logger = logging.getLogger("rabit_compiler")

MERGE_ERROR = (
    "a LoRA adapter cannot be merged into a packed RaBiTLinear: W_hat + scaling * B @ A is not a residual-binary "
    "weight, and re-fitting it would change the function the adapter was trained for. Keep the adapter unmerged "
    "(the PeftModel adds it at every forward), or train the packed weights themselves with QAT (rabit.prepare_qat)")
DATA_FREE_INITS = (True, False, "gaussian")


class RaBiTLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` around a packed :class:`RaBiTLinear` (``base_layer``); plain LoRA only."""

    def _get_in_out_features(self, module: RaBiTLinear) -> tuple[int, int]:
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        init = config.init_lora_weights
        if init not in DATA_FREE_INITS:
            raise ValueError(f"init_lora_weights={init!r} initialises from the full-precision weight, which a packed "
                             f"RaBiTLinear does not hold; use one of {DATA_FREE_INITS}")
        variant = self.resolve_lora_variant(config=config)
        if variant is not None:
            raise ValueError(f"{type(variant).__name__} needs the full-precision weight, which a packed RaBiTLinear "
                             "does not hold; use plain LoRA")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)


def _register() -> None:
    """Make every ``LoraConfig`` created from now on map :class:`RaBiTLinear` to :class:`RaBiTLoraLinear`."""
    post_init = LoraConfig.__post_init__

    @functools.wraps(post_init)
    def register_rabit_layer(self: LoraConfig) -> None:
        post_init(self)
        self._register_custom_module({RaBiTLinear: RaBiTLoraLinear})

    LoraConfig.__post_init__ = register_rabit_layer


if hasattr(LoraConfig, "_register_custom_module"):
    _register()
else:  # this runs inside `import peft`: raising would break peft itself
    logger.warning("rabit: peft %s has no LoraConfig._register_custom_module (peft>=0.21 has): LoRA adapters on "
                   "RaBiTLinear are unavailable", version("peft"))
