"""The LM head in weight-only int8 / int4: its perplexity cost on SmolLM2 and its batch-1 time, in one run.

For each scheme the fp32 model's head (49,152 x 576, tied to the embedding) is replaced by a ``WeightOnlyLinear``
(untied: the embedding kept exact) and the held-out perplexity measured (``lee.cor``,
512-token windows, no BOS); then one batch-1 call of the head is timed against fp32 ``F.linear`` on the same x
(median of many warm calls) at each thread count, on every ISA path the CPU runs.

    python benchmarks/head.py                   # all schemes, threads 1 and 2
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import time

import torch
from rabit_compiler.kernels.weight_only import ISAS, native_isa, quantize_weight_only, weight_only_linear_kernel

from rabit_compiler.data import lee_corpus, token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.head import WeightOnlyLinear
from rabit_compiler.models import load_smollm2

SCHEMES = {"int8 per row": (8, None), "int8 g32": (8, 32), "int4 g128": (4, 128), "int4 g64": (4, 64),
           "int4 g32": (4, 32)}


def median_us(fn, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--windows", type=int, default=9)
    args = parser.parse_args(argv)
    model, tokenizer = load_smollm2()
    windows = token_windows(tokenizer, lee_corpus()[1], 512, max_windows=args.windows)
    weight = model.lm_head.weight.detach()
    x = torch.randn(1, weight.shape[1])
    isas = ISAS[ISAS.index(native_isa()):]
    print("| head | held-out PPL | MB | threads | path | us per batch-1 call |")
    print("|---|---|---|---|---|---|")
    ppl = perplexity(model, windows, progress=False)
    for t in args.threads:
        torch.set_num_threads(t)
        time_us = median_us(lambda: torch.nn.functional.linear(x, weight))
        print(f"| fp32 | {ppl:.3f} | {weight.numel() * 4 / 1e6:.1f} | {t} | F.linear | {time_us:.0f} |", flush=True)
    for name, (bits, group_size) in SCHEMES.items():
        quantized = copy.deepcopy(model)
        quantized.lm_head = head = WeightOnlyLinear(quantize_weight_only(weight, bits, group_size))
        quantized.config.tie_word_embeddings = False
        ppl = perplexity(quantized, windows, progress=False)
        mb = sum(b.numel() * b.element_size() for b in head.buffers()) / 1e6
        for t, isa in itertools.product(args.threads, isas):
            torch.set_num_threads(t)
            time_us = median_us(functools.partial(weight_only_linear_kernel, x, head.qweight, head.scale, None, bits,
                                                  group_size, head.in_features, isa=isa))
            print(f"| {name} | {ppl:.3f} | {mb:.1f} | {t} | {isa} | {time_us:.0f} |", flush=True)


if __name__ == "__main__":
    main()
