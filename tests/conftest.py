"""Shared test setup: hypothesis profiles (``RABIT_HYPOTHESIS_PROFILE=ci|thorough``) and helpers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("RABIT_HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches, so recompile counts and backends do not leak."""
    torch.compiler.reset()
    yield


# The slowest files first (on a cold 2-core CPU, benchmarks/RESULTS.md): `--dist loadfile` hands whole files to
# pytest-xdist's two workers in collection order (pyproject's --no-loadscope-reorder: not by test count), and a slow
# file handed out last can leave one worker running it alone for minutes; started first, the short files fill in.
SLOWEST_FILES = ("test_head.py", "test_architectures.py", "test_moe.py", "test_distributed.py", "test_kernel_aot.py",
                 "test_triton_kernels.py", "test_generate.py", "test_fit_models.py", "test_cpu_lowering.py",
                 "test_cpu_lut.py", "test_gpu_check.py", "test_aot_decode.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
