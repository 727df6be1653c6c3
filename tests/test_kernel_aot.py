"""Ahead-of-time compilation of every Triton kernel variant the launcher can pick, for sm_89 and sm_90, without a GPU.

For each variant (:func:`rabit_compiler.kernels.triton_gemv.launch_configs`) and architecture this compiles the
kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, reads the cubin's resource
usage (``cuobjdump -res-usage``) and SASS (``cuobjdump -sass``), and asserts

* no register spills: no local-memory instructions (``LDL`` / ``STL``) and a zero stack frame;
* 16-byte loads of the sign planes: the layout Triton gave every int32 (sign word) load keeps 4 contiguous words
  in a thread, and the SASS holds 128-bit global loads (``LDG.E.128`` or, for loads pipelined through shared
  memory, ``LDGSTS.E.BYPASS.128``); for one GEMV and one GEMM variant, compiling with ``WORD_ALIGN=1`` (sign rows
  not known to be 16-byte aligned) must remove 128-bit loads, which ties them to the sign planes.

The compiles run in subprocesses (:mod:`rabit_compiler.kernels.aot`, which documents how arguments are
specialised), with TRITON_INTERPRET unset (the interpreter tests set it in this process), spread over the CPU
cores. Skips cleanly without cuobjdump or a CUDA-capable triton. The pack kernel is checked for spills only (it
reads floats; its int32 traffic is stores).

Run ``python tests/test_kernel_aot.py [--full]`` for the table of registers, spills and load widths per variant.
"""

from __future__ import annotations

import os
import sys

import pytest
from rabit_compiler.kernels.aot import compile_variants, label, missing_toolchain

ARCHS = (89, 90)


def _full_matrix() -> bool:
    return os.environ.get("RABIT_AOT_FULL") == "1" or os.environ.get("RABIT_HYPOTHESIS_PROFILE") == "thorough"


def _in_default_subset(dtype: str, constexprs: dict) -> bool:
    """One linear (NUM_SEGMENTS=1): every tile configuration in fp16 except three paths (the tiles of four, with
    one plane masked); bf16 and fp32 for two paths and the decode tiles only (the same loads and tile shapes; only
    x's element type changes). Siblings: three segments (q/k/v), fp16, two paths, every tile configuration (the
    segment count only changes the scalar prologue). The full matrix (1..4 segments for every variant; about
    4x the single-linear matrix, some minutes) with RABIT_AOT_FULL=1 or the "thorough" hypothesis profile."""
    if constexprs["NUM_SEGMENTS"] != 1:
        return dtype == "float16" and constexprs["NUM_PATHS"] == 2 and constexprs["NUM_SEGMENTS"] == 3
    if dtype == "float16":
        return constexprs["NUM_PATHS"] != 3
    return constexprs["NUM_PATHS"] == 2 and constexprs["BLOCK_M"] in (1, 16)


def _specs(full: bool | None = None) -> list[dict]:
    from rabit_compiler.kernels.triton_gemv import launch_configs

    full = _full_matrix() if full is None else full
    specs = []
    for arch in ARCHS:
        for cfg in launch_configs(arch):
            dtype = str(cfg["dtype"]).removeprefix("torch.")
            if not full and not _in_default_subset(dtype, cfg["constexprs"]):
                continue
            specs.append(dict(kernel=cfg["kernel"], dtype=dtype, arch=arch,
                              constexprs=cfg["constexprs"], num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"]))
    # The differential check: the same GEMV / GEMM variant with sign rows not known to be 16-byte aligned.
    for arch in ARCHS:
        for kernel, block_m, block_n in (("_rbl_gemv_kernel", 1, 64), ("_rbl_gemm_kernel", 16, 128)):
            base = next(s for s in specs if s["kernel"] == kernel and s["arch"] == arch and s["dtype"] == "float16"
                        and s["constexprs"]["NUM_PATHS"] == 2 and s["constexprs"]["BLOCK_M"] == block_m
                        and s["constexprs"]["NUM_SEGMENTS"] == 1)
            assert base["constexprs"]["BLOCK_N"] == block_n
            specs.append(dict(base, constexprs=dict(base["constexprs"], WORD_ALIGN=1), unaligned=True))
    from rabit_compiler.kernels.triton_pack import PACK_BLOCK_R, PACK_BLOCK_W, PACK_NUM_WARPS

    for arch in ARCHS:  # the pack kernel: no spills (it reads floats, so no sign-plane load check)
        for dtype in ("float16", "bfloat16", "float32"):
            specs.append(dict(kernel="_pack_signs_kernel", dtype=dtype, arch=arch, num_warps=PACK_NUM_WARPS,
                              num_stages=2, constexprs=dict(BLOCK_R=PACK_BLOCK_R, BLOCK_W=PACK_BLOCK_W)))
    return specs


@pytest.fixture(scope="module")
def aot_results():
    reason = missing_toolchain()
    if reason:
        pytest.skip(reason)
    return compile_variants(_specs())


def test_every_variant_compiles_without_spills(aot_results):
    spilled = [f"{label(r)}: regs {r['regs']}, stack {r['stack']}, {r['local_ops']} LDL/STL"
               for r in aot_results if r["stack"] or r["local_ops"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_sign_planes_use_128_bit_loads(aot_results):
    bad = []
    for r in aot_results:
        if r.get("unaligned") or r["kernel"] == "_pack_signs_kernel":
            continue
        if not r["sign_load_widths"] or min(r["sign_load_widths"]) < 4:
            bad.append(f"{label(r)}: int32 load layouts hold {r['sign_load_widths']} contiguous words per thread")
        if not r["wide_loads"]:
            bad.append(f"{label(r)}: no 128-bit global load in the SASS")
    assert not bad, "\n".join(bad)


def test_128_bit_loads_belong_to_the_sign_planes(aot_results):
    for unaligned in (r for r in aot_results if r.get("unaligned")):
        aligned = next(r for r in aot_results if not r.get("unaligned") and r["kernel"] == unaligned["kernel"]
                       and r["arch"] == unaligned["arch"] and r["dtype"] == unaligned["dtype"]
                       and r["constexprs"] == dict(unaligned["constexprs"], WORD_ALIGN=4))
        assert max(unaligned["sign_load_widths"]) < 4, label(unaligned)
        assert unaligned["wide_loads"] < aligned["wide_loads"], (
            f"{label(aligned)}: {aligned['wide_loads']} 128-bit loads, {unaligned['wide_loads']} without the "
            "sign-row alignment: the 128-bit loads are not the sign words")


def _print_table(results: list[dict]) -> None:
    for r in results:
        print(f"{label(r):105s} regs {r['regs']:3d} stack {r['stack']:4d} LDL/STL {r['local_ops']:3d} "
              f"sign words/thread {r['sign_load_widths']} 128-bit loads {r['wide_loads']} {r['wide_kinds']} "
              f"K-loop instructions {r['loop']['instructions']}")


if __name__ == "__main__":
    import time

    start = time.time()
    _print_table(compile_variants(_specs(full="--full" in sys.argv)))
    print(f"{time.time() - start:.1f} s")
