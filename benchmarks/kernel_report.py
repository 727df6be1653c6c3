"""Static report of the packed residual-binary kernels: runs anywhere, no GPU.

    python benchmarks/kernel_report.py [--skip-aot]

1. Bytes per weight and per layer for k = 1..4 sign planes on the benchmark shapes ``W [N, K]``: the packed signs
   ``k * N * ceil(K/32) * 4`` bytes plus fp16 scales ``2 k (N + K)``, against fp16 ``2 N K``.
2. Predicted roofline time per layer at batch 1 (every byte of the weight read once; x and y are a few KB) on the
   RTX 4090 (1008 GB/s, NVIDIA's GeForce RTX 4090 specification) and the H100 SXM (3.35 TB/s, NVIDIA H100 Tensor
   Core GPU datasheet, "GPU memory bandwidth", SXM form factor), and the fp16 ratio it implies.
3. From the SASS of the sm_89 / sm_90 cubins (``triton.compile`` ahead of time; see
   :mod:`rabit_compiler.kernels.aot`): registers, stack and spill instructions, the width of the sign-word loads,
   and the K loop's instruction count per packed int32 word and per sign bit of the tile (per thread: the loop
   body handles ``PATHS_P2 * BLOCK_N * BLOCK_KW / (32 * num_warps)`` words per iteration; k = 3 is padded to 4).
4. For the batch-1 GEMV, both inner loops (``LUT_BITS`` 0: a select per sign bit; 4: a table lookup per nibble):
   the sign-byte rate its K loop can sustain, from those counts and the per-SM issue and ALU-pipe rates (CUDA C++
   Programming Guide throughput table; SM counts and boost clocks from NVIDIA's whitepapers), against DRAM
   bandwidth: whether the roofline of table 1 is reachable at all. Also the bytes each program reads besides the
   sign words (x and h, or the LUT loop's tables), per sign byte: traffic served by L2 / L1, which the model does
   not price (no NVIDIA document gives an L2 bandwidth).

Prints markdown (the section recorded in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys

BANDWIDTH_GBS = {"RTX 4090": 1008.0, "H100 SXM": 3350.0}
# (arch, SMs, boost clock GHz): NVIDIA Ada GPU architecture whitepaper (RTX 4090: 128 SMs, 2.52 GHz boost) and
# H100 Tensor Core GPU architecture whitepaper / datasheet (H100 SXM5: 132 SMs, 1.98 GHz max boost).
GPU_CORES = {"RTX 4090": (89, 128, 2.52), "H100 SXM": (90, 132, 1.98)}
# Per SM per clock, CUDA C++ Programming Guide, "Throughput of native arithmetic instructions", compute
# capability 8.9 and 9.0: 4 warp instructions issued (128 thread instructions); 64 lanes for 32-bit bitwise ops
# (LOP3), compares / selects (ISETP, FSEL) and shifts -- the ALU pipe.
ISSUE_PER_SM_CLOCK = 128
ALU_PER_SM_CLOCK = 64
LAYER_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (14336, 4096)]  # W [N, K]
ARCHS = (89, 90)


def packed_bytes(num_paths: int, out_features: int, in_features: int) -> int:
    """Bytes of one packed layer: int32 sign words and fp16 row / column scales (no bias)."""
    from rabit_compiler.kernels.packing import words_per_row

    return num_paths * out_features * words_per_row(in_features) * 4 + 2 * num_paths * (out_features + in_features)


def bytes_table() -> list[str]:
    lines = ["| W [N, K] | k | packed MB | bits / weight | fp16 MB | "
             + " | ".join(f"{gpu} RaBiT us | {gpu} fp16 us" for gpu in BANDWIDTH_GBS) + " | fp16 / RaBiT bytes |",
             "|---|---|---|---|---|" + "---|---|" * len(BANDWIDTH_GBS) + "---|"]
    for n, k_in in LAYER_SHAPES:
        fp16 = 2 * n * k_in
        for paths in range(1, 5):
            packed = packed_bytes(paths, n, k_in)
            times = " | ".join(f"{packed / (bw * 1e3):.2f} | {fp16 / (bw * 1e3):.2f}" for bw in BANDWIDTH_GBS.values())
            lines.append(f"| {n}x{k_in} | {paths} | {packed / 1e6:.3f} | {8 * packed / (n * k_in):.3f} | "
                         f"{fp16 / 1e6:.2f} | {times} | {fp16 / packed:.2f}x |")
    return lines


def report_specs() -> list[dict]:
    """fp16 variants, one linear, every tile configuration and k = 1..4; and 3 siblings for k = 2; per arch."""
    from rabit_compiler.kernels.triton_gemv import launch_configs

    specs = []
    for arch in ARCHS:
        for variant in launch_configs(arch):
            c = variant["constexprs"]
            if str(variant["dtype"]) != "torch.float16":
                continue
            if c["NUM_SEGMENTS"] == 1 or (c["NUM_SEGMENTS"] == 3 and c["NUM_PATHS"] == 2):
                specs.append(dict(kernel=variant["kernel"], dtype="float16", arch=arch, constexprs=c,
                                  num_warps=variant["num_warps"], num_stages=variant["num_stages"]))
    return specs


def pack_specs() -> list[dict]:
    """The GPU pack kernel for fp16 / bf16 / fp32 sources, per arch."""
    from rabit_compiler.kernels.triton_pack import PACK_BLOCK_R, PACK_BLOCK_W, PACK_NUM_WARPS

    return [dict(kernel="_pack_signs_kernel", dtype=dtype, arch=arch, num_warps=PACK_NUM_WARPS, num_stages=2,
                 constexprs=dict(BLOCK_R=PACK_BLOCK_R, BLOCK_W=PACK_BLOCK_W))
            for arch in ARCHS for dtype in ("float16", "bfloat16", "float32")]


def other_bytes_per_sign_byte(r: dict) -> float:
    """Bytes one GEMV program reads per K block besides the sign words (fp16 x and h for the select loop, the fp32
    tables of all padded planes for the LUT loop), per sign byte it reads (batch 1)."""
    c = r["constexprs"]
    columns = 32 * c["BLOCK_KW"]
    sign_bytes = 4 * c["PATHS_P2"] * c["BLOCK_N"] * c["BLOCK_KW"]
    if c["LUT_BITS"]:
        return c["PATHS_P2"] * columns // 4 * 16 * 4 / sign_bytes
    return columns * 2 * (1 + c["NUM_PATHS"]) / sign_bytes


def lut_specs() -> list[dict]:
    """The LUT GEMV's table kernel for fp16 x, k = 1..4, per arch."""
    from rabit_compiler.kernels.triton_gemv import lut_table_configs

    return [dict(spec, dtype="float16", arch=arch) for arch in ARCHS for spec in lut_table_configs()
            if str(spec["dtype"]) == "torch.float16"]


def instruction_ceiling(results: list[dict]) -> list[str]:
    """For each batch-1 GEMV variant (both inner loops): the sign-byte throughput the K loop's instructions allow
    (issue rate and ALU pipe), against the DRAM bandwidth the roofline assumes."""
    from rabit_compiler.kernels.aot import ALU_OPCODES

    lines = ["| GPU | k | inner loop | instr / useful sign bit | ALU instr / useful sign bit | issue-bound GB/s of "
             "signs | ALU-bound GB/s of signs | DRAM GB/s | predicted bound | other bytes read / sign byte |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for gpu, (arch, sms, ghz) in GPU_CORES.items():
        for r in sorted(results, key=lambda r: (r["constexprs"]["NUM_PATHS"], r["constexprs"].get("LUT_BITS", 0))):
            c = r["constexprs"]
            if r["arch"] != arch or r["kernel"] != "_rbl_gemv_kernel" or c["BLOCK_M"] != 1 or c["NUM_SEGMENTS"] != 1:
                continue
            # useful bits only: with k = 3 the tile pads the path axis to 4 and computes on the masked plane
            bits_per_thread = 32 * c["NUM_PATHS"] * c["BLOCK_N"] * c["BLOCK_KW"] / (32 * r["num_warps"])
            per_bit = r["loop"]["instructions"] / bits_per_thread
            alu_per_bit = sum(n for op, n in r["loop"]["opcodes"].items() if op in ALU_OPCODES) / bits_per_thread
            issue_gbs = sms * ISSUE_PER_SM_CLOCK * ghz / per_bit / 8
            alu_gbs = sms * ALU_PER_SM_CLOCK * ghz / alu_per_bit / 8
            dram = BANDWIDTH_GBS[gpu]
            ceiling = min(issue_gbs, alu_gbs)
            bound = (f"DRAM (instruction ceiling {ceiling / dram:.0%} of it)" if ceiling >= dram
                     else f"instructions ({ceiling / dram:.0%} of DRAM)")
            loop = "LUT (nibble lookups)" if c["LUT_BITS"] else "select per bit"
            lines.append(f"| {gpu} | {c['NUM_PATHS']} | {loop} | {per_bit:.2f} | {alu_per_bit:.2f} | {issue_gbs:.0f} | "
                         f"{alu_gbs:.0f} | {dram:.0f} | {bound} | {other_bytes_per_sign_byte(r):.2f} |")
    return lines


def aot_tables() -> list[str]:
    from rabit_compiler.kernels.aot import compile_variants, missing_toolchain

    reason = missing_toolchain()
    if reason:
        return [f"AOT section skipped: {reason}"]
    linear_specs = report_specs()
    table_specs = lut_specs()
    results = compile_variants(linear_specs + table_specs + pack_specs())
    split = len(linear_specs) + len(table_specs)
    results, tables, packs = results[:len(linear_specs)], results[len(linear_specs):split], results[split:]
    lines = ["| kernel | arch | k | S | BM x BN x BKW | warps / stages | regs | stack | LDL/STL | sign words "
             "per load | 128-bit loads | K-loop instr | instr / tile word | instr / tile bit / row | main opcodes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["constexprs"]
        words_per_thread = c["PATHS_P2"] * c["BLOCK_N"] * c["BLOCK_KW"] / (32 * r["num_warps"])
        per_word = r["loop"]["instructions"] / words_per_thread
        top = ", ".join(f"{op} {n}" for op, n in list(r["loop"]["opcodes"].items())[:4])
        name = r["kernel"].removeprefix("_rbl_").removesuffix("_kernel") + (" LUT" if c.get("LUT_BITS") else "")
        lines.append(
            f"| {name} | sm_{r['arch']} | {c['NUM_PATHS']} | "
            f"{c['NUM_SEGMENTS']} | {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_KW']} | {r['num_warps']} / "
            f"{r['num_stages']} | {r['regs']} | {r['stack']} | {r['local_ops']} | "
            f"{sorted(set(r['sign_load_widths']))} | {r['wide_loads']} | {r['loop']['instructions']} | "
            f"{per_word:.1f} | {per_word / 32 / c['BLOCK_M']:.2f} | {top} |")
    lines += ["", "LUT GEMV table kernel (fp16 x, per token before the GEMV): " + "; ".join(
        f"sm_{r['arch']} k={r['constexprs']['NUM_PATHS']}: {r['regs']} regs, stack {r['stack']}, {r['local_ops']} "
        f"LDL/STL" for r in tables)]
    lines += ["", "GPU pack kernel: " + "; ".join(
        f"sm_{r['arch']} {r['dtype']}: {r['regs']} regs, stack {r['stack']}, {r['local_ops']} LDL/STL, "
        f"{r['wide_loads']} 128-bit loads" for r in packs)]
    lines += ["", "### Batch-1 GEMV: can the K loop keep up with DRAM? (counts above x per-SM rates, boost clock)", ""]
    return lines + instruction_ceiling(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-aot", action="store_true", help="only the bytes / roofline tables")
    args = parser.parse_args(argv)
    print("### Bytes per weight and batch-1 roofline time per layer (weight bytes / DRAM bandwidth)\n")
    print("\n".join(bytes_table()))
    if not args.skip_aot:
        print("\n### SASS of the fp16 kernel variants (ahead of time, no GPU)\n")
        print("\n".join(aot_tables()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
