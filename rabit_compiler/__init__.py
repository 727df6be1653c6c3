"""rabit-compiler: RaBiT residual-binary 2-bit weights for PyTorch LLMs, as FX passes and a
``torch.compile`` backend (``backend="rabit"``)."""

from rabit_compiler import kernels as kernels  # registers the rabit:: torch.library ops
from rabit_compiler.backend import rabit_backend, register
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.quantize import QuantizeReport, RaBiTLinear, quantize_
from rabit_compiler.serialization import RaBiTFormatError, load, save

register()

__all__ = [
    "QuantizeReport", "RaBiTConfig", "RaBiTFormatError", "RaBiTLinear", "load", "quantize_", "rabit_backend", "save",
]
