"""The Triton pack kernel (``kernels/triton_pack.py``), run by Triton's interpreter on CPU, against the torch packer.

``pack_signs`` (torch ops) is the definition of format v1 (tests/test_packing.py checks it against unpacking);
the kernel must give the same int32 words bit for bit, including zeros (+1), -0.0 and NaN (+1), padding bits
past K (0), and any leading axes (paths, rows).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rabit_compiler.kernels.packing import pack_signs, unpack_signs, words_per_row  # noqa: E402

pytest.importorskip("triton")
from rabit_compiler.kernels.triton_pack import PACK_BLOCK_R, PACK_BLOCK_W, pack_signs_triton  # noqa: E402

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@given(
    leading=st.lists(st.integers(1, 4), min_size=0, max_size=2), n=st.integers(1, 40), k=st.integers(1, 600),
    dtype=st.sampled_from(FLOAT_DTYPES), zero_fraction=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**31),
)
def test_pack_kernel_matches_torch_packer(leading, n, k, dtype, zero_fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(*leading, n, k, generator=generator)
    values[torch.rand(values.shape, generator=generator) < zero_fraction] = 0.0
    values = values.to(dtype)
    packed = pack_signs_triton(values)
    assert packed.dtype == torch.int32 and packed.shape == (*leading, n, words_per_row(k))
    assert torch.equal(packed, pack_signs(values))
    assert torch.equal(unpack_signs(packed, k), torch.where(values < 0, -1.0, 1.0))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_special_values_and_multi_block_grid(dtype):
    """-0.0, NaN of either sign and infinities; more rows and words than one program covers."""
    rows, k = 2 * PACK_BLOCK_R + 3, 32 * PACK_BLOCK_W + 70
    values = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    specials = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf")], dtype=dtype)
    values[:, 31:31 + specials.numel()] = specials
    packed = pack_signs_triton(values)
    assert torch.equal(packed, pack_signs(values))
    assert (packed[:, -1] >> (k % 32) == 0).all(), "bits past K must be 0"


def test_non_contiguous_other_dtypes_and_empty():
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(70, 3, generator=generator).T  # [3, 70], last dim strided
    assert torch.equal(pack_signs_triton(values), pack_signs(values))
    for other in (values.double(), (values * 5).to(torch.int64), values < 0):
        assert torch.equal(pack_signs_triton(other), pack_signs(other))
    assert pack_signs_triton(torch.zeros(0, 5)).shape == (0, 1)
    with pytest.raises(TypeError, match="cannot pack"):
        pack_signs_triton(torch.zeros(2, 3, dtype=torch.complex64))
