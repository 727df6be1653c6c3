"""Quantization-aware training: the training form of a residual-binary linear (:mod:`.layers`), the
distillation trainer (:mod:`.train`), end-to-end scale tuning (:mod:`.tune`), Muon in fp32 (:mod:`.muon`),
multi-process runs (:mod:`.distributed`), the memory formula (:mod:`.memory`) and path diagnostics
(:mod:`.diagnostics`)."""

from rabit_compiler.qat.distributed import DistributedConfig, distributed_run
from rabit_compiler.qat.layers import (
    METHODS,
    LinearFits,
    ResidualBinaryTrainExperts,
    ResidualBinaryTrainLinear,
    convert,
    fit_linears,
    fits_settings,
    load_fits,
    packed_fits,
    prepare_qat,
    qat_layers,
    rtn_,
    save_fits,
)
from rabit_compiler.qat.train import OPTIMIZERS, QATConfig, QATTrainer
from rabit_compiler.qat.tune import tune_scales_

__all__ = [
    "METHODS", "OPTIMIZERS", "DistributedConfig", "LinearFits", "QATConfig", "QATTrainer", "ResidualBinaryTrainExperts",
    "ResidualBinaryTrainLinear", "convert", "distributed_run", "fit_linears", "fits_settings", "load_fits",
    "packed_fits", "prepare_qat", "qat_layers", "rtn_", "save_fits", "tune_scales_",
]
