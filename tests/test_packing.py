"""The packed format: pack/unpack are inverse, padding is inert, malformed tensors are named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import FORMAT_VERSION, pack_paths, pack_signs, unpack_signs, words_per_row
from rabit_compiler.kernels.packing import PackedResidualBinary


@given(rows=st.integers(1, 9), cols=st.integers(1, 130), planes=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_unpack_inverts_pack(rows, cols, planes, seed):
    generator = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(planes, rows, cols, generator=generator) < 0.5, -1.0, 1.0)
    packed = pack_signs(signs)
    assert packed.dtype == torch.int32
    assert packed.shape == (planes, rows, words_per_row(cols))
    assert torch.equal(unpack_signs(packed, cols), signs)
    assert torch.equal(pack_signs(unpack_signs(packed, cols)), packed)


@given(cols=st.integers(1, 100))
def test_padding_bits_are_zero_and_zero_packs_as_plus_one(cols):
    signs = -torch.ones(1, cols)
    packed = pack_signs(signs)
    used_in_last = cols - 32 * (words_per_row(cols) - 1)
    last = int(packed[0, -1]) & 0xFFFFFFFF
    assert last == (1 << used_in_last) - 1, "bits past K must stay 0"
    assert torch.equal(unpack_signs(pack_signs(torch.zeros(2, cols)), cols), torch.ones(2, cols))


def test_bit_layout_is_little_endian_with_set_bit_negative():
    signs = torch.ones(1, 40)
    signs[0, 0] = -1
    signs[0, 31] = -1
    signs[0, 33] = -1
    packed = pack_signs(signs)
    assert int(packed[0, 0]) == 1 - 2**31  # bits 0 and 31 set, as a signed int32
    assert int(packed[0, 1]) == 2


def test_storage_is_about_two_bits_per_weight():
    n = k = 4096
    packed = pack_paths(torch.ones(2, n, k), torch.ones(2, n), torch.ones(2, k))
    bits_per_weight = 8 * packed.nbytes() / (n * k)
    assert FORMAT_VERSION == 1
    assert bits_per_weight == 2 + 2 * 16 * (n + k) / (n * k)  # 2.016


def test_malformed_packed_tensors_are_named():
    signs = torch.ones(2, 5, 40)
    good = pack_paths(signs, torch.ones(2, 5), torch.ones(2, 40))
    with pytest.raises(ValueError, match="words per row"):
        PackedResidualBinary(good.packed_signs, good.row_scale, good.col_scale, None, 70)
    with pytest.raises(ValueError, match="row_scale"):
        PackedResidualBinary(good.packed_signs, good.row_scale[:, :4], good.col_scale, None, 40)
    with pytest.raises(ValueError, match="col_scale"):
        PackedResidualBinary(good.packed_signs, good.row_scale, good.col_scale[:1], None, 40)
    with pytest.raises(ValueError, match="bias"):
        PackedResidualBinary(good.packed_signs, good.row_scale, good.col_scale, torch.ones(3), 40)
    with pytest.raises(TypeError, match="int32"):
        unpack_signs(good.packed_signs.long(), 40)


def test_scale_overflow_in_fp16_is_an_error_not_inf():
    with pytest.raises(OverflowError, match="float32"):
        pack_paths(torch.ones(1, 2, 3), torch.full((1, 2), 1e6), torch.ones(1, 3), scale_dtype=torch.float16)
