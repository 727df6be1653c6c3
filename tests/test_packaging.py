"""What a non-editable install (a wheel) carries: the kernels are compiled from their sources on first use, so every
source and every header those sources include must be package data."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernel_sources_and_their_headers_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    kernels = ROOT / config["package-dir"]["rabit_compiler.kernels"]
    patterns = config["package-data"]["rabit_compiler.kernels"]
    from rabit_compiler.kernels.cpp_build import _LOCAL_INCLUDE

    sources = sorted(kernels.glob("*.cpp"))
    headers = {name for source in sources for name in _LOCAL_INCLUDE.findall(source.read_text())}
    assert headers, "the CPU kernels share work_sharing.h"
    for path in [*sources, *(kernels / name for name in sorted(headers))]:
        assert path.is_file(), f"{path.name} is included but missing"
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), (
            f"kernels/{path.name} is not package data ({patterns}): a wheel would ship without it")
