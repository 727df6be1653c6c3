"""Ahead-of-time compilation of every Triton kernel variant the launcher can pick, for sm_89 and sm_90, without a GPU.

For each variant (:func:`rabit_compiler.kernels.triton_gemv.launch_configs`) and architecture this compiles the
kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, reads the cubin's resource
usage (``cuobjdump -res-usage``) and SASS (``cuobjdump -sass``), and asserts

* no register spills: no local-memory instructions (``LDL`` / ``STL``) and a zero stack frame;
* 16-byte loads of the sign planes: the layout Triton gave every int32 (sign word) load keeps 4 contiguous words
  in a thread, and the SASS holds 128-bit global loads (``LDG.E.128`` or, for loads pipelined through shared
  memory, ``LDGSTS.E.BYPASS.128``); for one GEMV (each inner loop) and one GEMM variant, compiling with
  ``WORD_ALIGN=1`` (sign rows not known to be 16-byte aligned) must remove 128-bit loads, which ties them to the
  sign planes;
* the GEMV's lookup-table inner loop (``LUT_BITS=4``) is what it claims to be: per nibble of sign bits one
  shared-memory lookup (``LDS``), no select, no shuffle; and its K loop needs fewer instructions, and fewer on
  the ALU pipe, per sign bit than the select loop of the same tile (the point of the option).

The compiles run in subprocesses (:mod:`rabit_compiler.kernels.aot`, which documents how arguments are
specialised), with TRITON_INTERPRET unset (the interpreter tests set it in this process), spread over the CPU
cores. By default a subset (:func:`_in_default_subset` on sm_90, less on sm_89: :func:`_specs`); the full
matrix with RABIT_AOT_FULL=1. Skips cleanly without cuobjdump or a CUDA-capable triton. The pack kernel and the
LUT GEMV's table kernel are checked for spills only (they read floats; their int32 traffic is stores or none).

Run ``python tests/test_kernel_aot.py [--full]`` for the table of registers, spills and load widths per variant.
"""

from __future__ import annotations

import os
import sys

import pytest
from rabit_compiler.kernels.aot import ALU_OPCODES, compile_variants, label, missing_toolchain

ARCHS = (89, 90)
_NO_SIGN_LOADS = ("_pack_signs_kernel", "_rbl_lut_kernel")


def _full_matrix() -> bool:
    return os.environ.get("RABIT_AOT_FULL") == "1" or os.environ.get("RABIT_HYPOTHESIS_PROFILE") == "thorough"


def _in_default_subset(kernel: str, dtype: str, constexprs: dict) -> bool:
    """One linear (NUM_SEGMENTS=1): every tile configuration in fp16 for two and four paths (one path's tiles are
    twice as wide as two paths', the same sign words per thread; three paths use the tiles of four, one plane
    masked); bf16 and fp32 for the two-path decode GEMV only (the same loads and tile shapes; only x's element type
    changes). Siblings: three segments (q/k/v), fp16, two paths, the decode GEMV and the small-batch GEMM tiles (the
    segment count only changes the scalar prologue). The full matrix (1..4 segments for every variant; about 4x the
    single-linear matrix, some minutes) with RABIT_AOT_FULL=1 or the "thorough" hypothesis profile. The LUT GEMV
    (LUT_BITS=4) in fp16 only: its K loop never reads x, so bf16 / fp32 change only the epilogue."""
    if constexprs.get("LUT_BITS") and dtype != "float16":
        return False
    if constexprs["NUM_SEGMENTS"] != 1:
        return (dtype == "float16" and constexprs["NUM_PATHS"] == 2 and constexprs["NUM_SEGMENTS"] == 3
                and constexprs["BLOCK_M"] in (1, 16))
    if dtype == "float16":
        return constexprs["NUM_PATHS"] in (2, 4)
    return kernel == "_rbl_gemv_kernel" and constexprs["NUM_PATHS"] == 2 and constexprs["BLOCK_M"] == 1


def _specs(full: bool | None = None) -> list[dict]:
    """The default subset on sm_90; on sm_89 (the same Triton code, another ptxas target) only the single-linear
    fp16 GEMV tiles at two paths (both inner loops: what a decode step runs). Everything on both architectures with
    the full matrix."""
    from rabit_compiler.kernels.triton_gemv import launch_configs

    full = _full_matrix() if full is None else full
    specs = []
    for arch in ARCHS:
        for cfg in launch_configs(arch):
            dtype = str(cfg["dtype"]).removeprefix("torch.")
            if not full and not _in_default_subset(cfg["kernel"], dtype, cfg["constexprs"]):
                continue
            c = cfg["constexprs"]
            if not full and arch != 90 and not (cfg["kernel"] == "_rbl_gemv_kernel" and dtype == "float16"
                                                and c["NUM_PATHS"] == 2 and c["NUM_SEGMENTS"] == 1):
                continue
            specs.append(dict(kernel=cfg["kernel"], dtype=dtype, arch=arch,
                              constexprs=cfg["constexprs"], num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"]))
    # The differential check: the same GEMV / GEMM variant with sign rows not known to be 16-byte aligned.
    for arch in ARCHS if full else (90,):
        for kernel, block_m, block_n, lut_bits in (("_rbl_gemv_kernel", 1, 64, 0), ("_rbl_gemv_kernel", 1, 64, 4),
                                                   ("_rbl_gemm_kernel", 16, 128, 0)):
            base = next(s for s in specs if s["kernel"] == kernel and s["arch"] == arch and s["dtype"] == "float16"
                        and s["constexprs"]["NUM_PATHS"] == 2 and s["constexprs"]["BLOCK_M"] == block_m
                        and s["constexprs"]["NUM_SEGMENTS"] == 1
                        and s["constexprs"].get("LUT_BITS", 0) == lut_bits)
            assert base["constexprs"]["BLOCK_N"] == block_n
            specs.append(dict(base, constexprs=dict(base["constexprs"], WORD_ALIGN=1), unaligned=True))
    from rabit_compiler.kernels.triton_gemv import lut_table_configs
    from rabit_compiler.kernels.triton_pack import PACK_BLOCK_R, PACK_BLOCK_W, PACK_NUM_WARPS

    for arch in ARCHS if full else (90,):  # the pack and table kernels: no spills (they read floats: no sign loads)
        for dtype in ("float16", "bfloat16", "float32") if full else ("float16",):
            specs.append(dict(kernel="_pack_signs_kernel", dtype=dtype, arch=arch, num_warps=PACK_NUM_WARPS,
                              num_stages=2, constexprs=dict(BLOCK_R=PACK_BLOCK_R, BLOCK_W=PACK_BLOCK_W)))
        for table in lut_table_configs():
            dtype = str(table["dtype"]).removeprefix("torch.")
            if full or dtype == "float16":
                specs.append(dict(table, dtype=dtype, arch=arch))
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
        if r.get("unaligned") or r["kernel"] in _NO_SIGN_LOADS:
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


def _bits_per_thread(r: dict) -> float:
    """Sign bits of all planes (k = 3 padded to 4) one thread handles per K-loop iteration and row of x."""
    c = r["constexprs"]
    return 32 * c["PATHS_P2"] * c["BLOCK_N"] * c["BLOCK_KW"] / (32 * r["num_warps"])


def test_lut_loop_is_one_lookup_per_nibble(aot_results):
    bad = []
    for r in aot_results:
        if r["kernel"] != "_rbl_gemv_kernel" or not r["constexprs"]["LUT_BITS"] or r.get("unaligned"):
            continue
        ops = r["loop"]["opcodes"]
        nibbles = _bits_per_thread(r) / 4 * r["constexprs"]["BLOCK_M"]
        if ops.get("LDS", 0) != nibbles or ops.get("FSEL", 0) or ops.get("SHFL", 0):
            bad.append(f"{label(r)}: {nibbles:.0f} nibbles per thread, K loop {ops}")
    assert not bad, "\n".join(bad)


def test_lut_loop_needs_fewer_instructions_per_bit(aot_results):
    def key(r):
        return (r["arch"], r["dtype"], r["num_warps"],
                tuple(sorted((name, value) for name, value in r["constexprs"].items() if name != "LUT_BITS")))

    select = {key(r): r for r in aot_results if r["kernel"] == "_rbl_gemv_kernel" and not r.get("unaligned")
              and not r["constexprs"]["LUT_BITS"]}
    pairs = [(select[key(r)], r) for r in aot_results if r["kernel"] == "_rbl_gemv_kernel"
             and not r.get("unaligned") and r["constexprs"]["LUT_BITS"] and key(r) in select]
    assert pairs, "no LUT variant with a select twin"
    bad = []
    for old, new in pairs:
        alu = [sum(n for op, n in r["loop"]["opcodes"].items() if op in ALU_OPCODES) for r in (old, new)]
        if new["loop"]["instructions"] >= old["loop"]["instructions"] or alu[1] >= alu[0]:
            bad.append(f"{label(new)}: {new['loop']['instructions']} instructions ({alu[1]} ALU) per K-loop "
                       f"iteration, select loop {old['loop']['instructions']} ({alu[0]} ALU)")
    assert not bad, "\n".join(bad)


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
