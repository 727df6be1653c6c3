"""Held-out perplexity of SmolLM2-135M after RaBiT *initialisation only* (no QAT), per init setting.

    python benchmarks/init_ppl.py                      # every setting below
    python benchmarks/init_ppl.py --only "greedy data-free" "default (gptq, hessian, 1 round, sequential)"
    python benchmarks/init_ppl.py --paths 2 3 4 --only "default (gptq, hessian, 1 round, sequential)"

Calibration: the first 16 x 512-token windows of lee_background.cor; evaluation: lee.cor, 9 x 512 tokens.
Prints one line per setting and k (held-out PPL, quantize_ wall time, bytes of parameters+buffers before/after).
"""

from __future__ import annotations

import argparse
import time

import torch

import rabit_compiler as rabit
from rabit_compiler.data import lee_corpus, token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.models import load_smollm2

SVID = dict(fit="svid", objective="diag", sequential=False)  # the fit before issue 14, stated in full
SETTINGS = {
    "greedy data-free": (dict(SVID, rounds=0), False),
    "iterative data-free": (SVID, False),
    "greedy+precondition": (dict(SVID, rounds=0), True),
    "iterative (2 rounds)+precondition": (dict(SVID, rounds=2), True),
    "iterative (5 rounds)+precondition rms a_in=1 a_out=1": (dict(SVID, rounds=5, statistic="rms"), True),
    "iterative (5 rounds)+precondition rms a_in=1 a_out=0.5": (
        dict(SVID, rounds=5, statistic="rms", alpha_out=0.5), True),
    "iterative (5 rounds)+precondition rms a_in=0.5 a_out=0.5": (
        dict(SVID, rounds=5, statistic="rms", alpha_in=0.5, alpha_out=0.5), True),
    "iterative (5 rounds)+precondition": (dict(SVID, rounds=5), True),
    "iterative+precondition (10 rounds, mean_abs, a_in=1 a_out=1: the default before issue 14)": (SVID, True),
    "iterative (20 rounds)+precondition": (dict(SVID, rounds=20), True),
    "default (gptq, hessian, 1 round, sequential)": ({}, True),
    "default, data-free": ({}, False),
    "gptq, 3 SVID rounds, 1 round, sequential": (dict(rounds=3), True),
    "gptq, 4 rounds, sequential": (dict(fit_rounds=4), True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help="run only these settings")
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--paths", type=int, nargs="+", default=[2], help="k binary paths per weight")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    train_text, heldout_text = lee_corpus()
    heldout = token_windows(tokenizer, heldout_text, 512)
    calibration = token_windows(tokenizer, train_text, 512, max_windows=args.calibration_windows)
    print(f"fp32: held-out PPL {perplexity(model, heldout, progress=False):.2f}", flush=True)
    for name in args.only or SETTINGS:
        overrides, use_calibration = SETTINGS[name]
        for paths in args.paths:
            model, _ = load_smollm2()
            started = time.perf_counter()
            report = rabit.quantize_(model, rabit.RaBiTConfig(paths=paths, **overrides),
                                     calibration=calibration if use_calibration else None, progress=False)
            seconds = time.perf_counter() - started
            ppl = perplexity(model, heldout, progress=False)
            print(f"{name}, k={paths}: held-out PPL {ppl:.4g}; quantize_ {seconds:.1f} s; {len(report.quantized)} "
                  f"linears; params+buffers {report.bytes_before / 1e6:.1f} -> {report.bytes_after / 1e6:.1f} MB",
                  flush=True)


if __name__ == "__main__":
    main()
