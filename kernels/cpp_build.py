"""Building and loading the C++ operator libraries of the CPU kernels (``cpu_lut.cpp``, ``cpu_attention.cpp``).

A library is built on first use by Inductor's own C++ toolchain (``torch._inductor.cpp_builder``: the compiler,
flags, ISA and OpenMP that ``torch.compile`` uses on the CPU), cached in Inductor's cache directory under a hash of
the source, torch version and flags, and loaded with ``torch.ops.load_library``: its ``TORCH_LIBRARY`` operators are
real dispatcher operators with no Python in their call path. A failed build raises (never a silent fallback).

Each library also exports its operators as AOTInductor C shims (``aoti_torch_cpu_<op>``), so that a decode step
compiled ahead of time calls them directly (declared by :mod:`rabit_compiler.aot_decode`); the library is loaded
with ``RTLD_GLOBAL`` so that the step's shared library finds those symbols when it is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger("rabit_compiler")

_LOADED: dict[str, ctypes.CDLL] = {}


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"$', re.MULTILINE)


def source_text(source: Path) -> str:
    """``source`` with each ``#include "name.h"`` replaced by that header of ``kernels/``: the sources are compiled
    from copies in the build cache, where a relative include would not be found."""
    return _LOCAL_INCLUDE.sub(lambda match: (Path(__file__).parent / match.group(1)).read_text(), source.read_text())


def build_library(source: Path, what: str) -> Path:
    """Build (or find in the cache) the shared library of ``source``; its path. ``what`` names it in messages."""
    from torch._inductor.cpp_builder import CppBuilder, CppTorchOptions, get_cpp_compiler
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from torch.utils._filelock import FileLock

    text = source_text(source)
    options = CppTorchOptions(vec_isa=pick_vec_isa(), include_pytorch=True, shared=True)
    flags = [torch.__version__, get_cpp_compiler(), *options.get_cflags(), *options.get_definitions(),
             *options.get_ldflags(), *options.get_libraries()]
    key = hashlib.sha256("\n".join([text, *flags]).encode()).hexdigest()[:20]
    directory = Path(cache_dir()) / f"rabit_{source.stem}" / key
    library = directory / f"rabit_{source.stem}.so"
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / "build.lock"), timeout=600):
        if not library.exists():
            (directory / source.name).write_text(text)
            logger.info("rabit: building the %s into %s", what, directory)
            try:
                CppBuilder(f"{source.stem}_build", [str(directory / source.name)], options, str(directory)).build()
            except Exception as error:
                raise RuntimeError(
                    f"rabit: building the {what} (kernels/{source.name}) with Inductor's C++ toolchain failed; it "
                    f"needs the C++ compiler that torch.compile uses on the CPU: {error}") from error
            (directory / f"{source.stem}_build.so").rename(library)
    return library


def load_library(source: Path, what: str, fakes: dict[str, Callable]) -> ctypes.CDLL:
    """Build if needed and load the operators of ``source``, registering ``fakes`` (op name -> its fake, for
    tracing) on the first call (idempotent); the library, for its C functions."""
    if str(source) not in _LOADED:
        path = build_library(source, what)
        torch.ops.load_library(str(path))
        for name, fake in fakes.items():
            torch.library.register_fake(name, fake)
        _LOADED[str(source)] = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
    return _LOADED[str(source)]
