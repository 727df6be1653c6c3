"""Qwen2.5-Coder-1.5B-Instruct: held-out perplexity of the bf16 model and of the default 2-bit PTQ (`quantize_`),
fit time and peak memory (issue 14, item 4).

    python benchmarks/qwen_ptq.py --paths 2 3 --out benchmarks/qwen_ptq.jsonl

The model is loaded in bf16 (3.55 GB; :func:`rabit_compiler.models.load_qwen_coder`), calibrated on the first
16 x 512 tokens of ``lee_background.cor`` and scored on ``lee.cor`` in 512-token windows (no BOS), the text
``benchmarks/init_methods.py`` uses for SmolLM2, here in Qwen's tokens. ``quantize_`` fits layer by layer (the
sequential default: one decoder block's statistics in memory at a time), so peak RAM is the bf16 model, one
block's X^T X and the calibration activations. Each k reloads the model. One JSON line per row: the fp row, then
one per k (PPL, quantize_ seconds, peak RSS of the process so far).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.data import lee_corpus, token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.models import load_qwen_coder
from rabit_compiler.quantize import quantize_


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-fp", action="store_true", help="no fp row (already measured)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/qwen_ptq.jsonl"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = dict(model="Qwen2.5-Coder-1.5B-Instruct", dtype="bfloat16", commit=commit, threads=torch.get_num_threads(),
                  machine=f"{platform.machine()}, torch {torch.__version__}", date=time.strftime("%Y-%m-%dT%H:%M"))

    def record(row: dict) -> None:
        row = {**header, **row, "peak_rss_gb": round(peak_rss_gb(), 2)}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")

    train_text, heldout_text = lee_corpus()
    rows: list[int | None] = ([] if args.skip_fp else [None]) + args.paths
    for paths in rows:
        started = time.perf_counter()
        model, tokenizer = load_qwen_coder()
        load_seconds = time.perf_counter() - started
        heldout = token_windows(tokenizer, heldout_text, args.seq_len)
        if paths is None:
            record(dict(method="bf16", windows=list(heldout.shape), load_s=load_seconds,
                        ppl=perplexity(model, heldout, batch_size=1)))
            continue
        calibration = token_windows(tokenizer, train_text, args.seq_len, max_windows=args.calibration_windows)
        config = RaBiTConfig(paths=paths)
        started = time.perf_counter()
        report = quantize_(model, config, calibration=calibration)
        quantize_seconds = time.perf_counter() - started
        record(dict(method=f"ptq k={paths} (fit {config.fit}, objective {config.objective}, sequential "
                           f"{config.sequential}, head {config.head})", windows=list(heldout.shape),
                    quantize_s=quantize_seconds, packed=len(report.quantized), skipped=sorted(report.skipped),
                    mb_before=report.bytes_before / 1e6, mb_after=report.bytes_after / 1e6,
                    ppl=perplexity(model, heldout, batch_size=1)))
        del model


if __name__ == "__main__":
    main()
