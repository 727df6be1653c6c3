"""The weight-only head's decode kernel, fp32 vs int8 activations, at the LM-head shapes of both real models.

    python benchmarks/head_kernel.py            # SmolLM2 49,152 x 576 and Qwen2.5-Coder 151,936 x 1536, 1 / 2 threads

Random weights quantized per scheme (int8 one scale per row, the default head; int4 one scale per 32 columns), one
row of x, fp16 scales; per scheme and thread count, 5 alternating rounds of 10 calls per arithmetic, the median
round's ms per call, and the bytes the call reads (qweight + scales) over that time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rabit_compiler.kernels.weight_only import native_isa, quantize_weight_only, weight_only_linear_kernel

SHAPES = {"SmolLM2-135M": (49152, 576), "Qwen2.5-Coder-1.5B": (151936, 1536)}
SCHEMES = {"int8 per row": (8, None), "int4 g32": (4, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# head kernel, ISA path {native_isa()}, torch {torch.__version__}")
    print("| model | scheme | threads | fp32 activations ms | int8 activations ms | speed-up | int8: GB/s |")
    print("|---|---|---|---|---|---|---|")
    for model, (n, k) in SHAPES.items():
        x, out = torch.randn(1, k), torch.empty(1, n)
        for scheme, (bits, group_size) in SCHEMES.items():
            quantized = quantize_weight_only(torch.randn(n, k), bits, group_size, torch.float16)
            megabytes = (quantized.qweight.numel() + 2 * quantized.scale.numel()) / 1e6
            for threads in args.threads:
                seconds: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for int8_activations in (False, True):
                        started = time.perf_counter()
                        for _ in range(args.calls):
                            weight_only_linear_kernel(x, quantized.qweight, quantized.scale, None, bits, group_size,
                                                      k, threads=threads, out=out, int8_activations=int8_activations)
                        seconds[int8_activations].append((time.perf_counter() - started) / args.calls)
                exact, rounded = (statistics.median(seconds[mode]) * 1e3 for mode in (False, True))
                print(f"| {model} | {scheme} | {threads} | {exact:.2f} | {rounded:.2f} | {exact / rounded:.2f}x | "
                      f"{megabytes / rounded:.1f} |", flush=True)


if __name__ == "__main__":
    main()
