"""A/B of the grouped-query decode attention fold (backend option ``fold_gqa``) on SmolLM2-135M, in one process.

    python benchmarks/fold_gqa.py --threads 1 2 --repeats 3 --cache 64 512

The model is packed data-free (speed only; int8 head), the decode step compiled with ``backend="rabit"`` and
int8 tables, once with the fold and once without, alternating ``--repeats`` times per thread count and static
cache length (the repeated cache copy grows with the cache's length, not with the tokens in it). Prints the median
step time of each (48 steps after two warm-up steps).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from cpu_peers import PROMPT, torch_decode_steps

import rabit_compiler as rabit
from rabit_compiler.models import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=int, nargs="+", default=[64, 512], help="static cache lengths")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    rabit.quantize_(model, rabit.RaBiTConfig(rounds=0, fit="svid"), progress=False)
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    print("| threads | static cache | fold_gqa | median step ms (each repeat) | tok/s (median) |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for cache in args.cache:
            medians: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):
                for fold in (False, True):
                    torch.compiler.reset()
                    steps, _ = torch_decode_steps(model, prompt, 48, "rabit",
                                                  {"cpu_tables": "int8", "fold_gqa": fold},
                                                  max_cache_len=cache)
                    medians[fold].append(1e3 * float(np.median(steps)))
            for fold, values in medians.items():
                print(f"| {threads} | {cache} | {fold} | {' / '.join(f'{v:.2f}' for v in values)} | "
                      f"{1e3 / np.median(values):.1f} |", flush=True)


if __name__ == "__main__":
    main()
