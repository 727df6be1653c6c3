"""rabit-compiler: RaBiT residual-binary 2-bit weights for PyTorch LLMs, as FX passes and a
``torch.compile`` backend (``backend="rabit"``)."""

from rabit_compiler import kernels as kernels  # registers the rabit:: torch.library ops
from rabit_compiler.aot_decode import AOTDecoder
from rabit_compiler.backend import rabit_backend, register
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.integrations import transformers as _transformers  # noqa: F401  (registers quant_method "rabit")
from rabit_compiler.integrations.imports import after_import
from rabit_compiler.qat import DistributedConfig, QATConfig, QATTrainer, convert, distributed_run, prepare_qat
from rabit_compiler.quantize import QuantizeReport, RaBiTLinear, quantize_
from rabit_compiler.serialization import RaBiTFormatError, load, save

register()
after_import("peft.tuners.lora.layer", "rabit_compiler.integrations.peft")  # LoRA on RaBiTLinear; peft not imported

__all__ = [
    "AOTDecoder", "DistributedConfig", "QATConfig", "QATTrainer", "QuantizeReport", "RaBiTConfig", "RaBiTFormatError",
    "RaBiTLinear",
    "convert", "distributed_run", "load", "prepare_qat", "quantize_", "rabit_backend", "save",
]
