"""Two versions of the CPU decode-attention kernel's source in one process, alternating: time per call, per shape.

    git show HEAD~1:kernels/cpu_attention.cpp > /tmp/before.cpp
    python benchmarks/attention_ab.py /tmp/before.cpp kernels/cpu_attention.cpp --rounds 15

The shapes are a decode step's after grouped-query folding (SmolLM2: 3 KV heads x 3 query rows, head dim 64;
Qwen2.5-Coder-1.5B: 2 x 6, 128), one call per layer over a static cache of 112 slots (``--slots``) of which the
first ``n`` are attended. Each source is built as its own operator namespace (as in ``lut_ab.py``), the outputs are
checked to be identical (``--rounding``: equal up to fp32 rounding, for a change of summation order), and every
round times a pass over the layers of each (the order alternating), "warm" (the layers' KV
caches as the previous pass left them) and "cold" (caches flushed by writing 48 MB first, as in a decode step where
the weights stream between two layers' attention). Times include the Python call (a few µs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from lut_ab import alternate, build_in_namespace

# name: (KV heads, query rows per head, head dim, layers)
MODELS = {"smollm2": (3, 3, 64, 30), "qwen-coder": (2, 6, 128, 28)}
SLOTS = 112


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="cpu_attention.cpp, version A")
    parser.add_argument("b", type=Path, help="cpu_attention.cpp, version B")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--positions", type=int, nargs="+", default=[16, 48, 100], help="attended slots n")
    parser.add_argument("--slots", type=int, default=SLOTS, help="cache slots (>= every n)")
    parser.add_argument("--rounding", action="store_true",
                        help="accept outputs equal up to fp32 rounding (relative 1e-5) instead of identical")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = {}
    with tempfile.TemporaryDirectory() as directory:
        for tag, source in (("a", args.a), ("b", args.b)):
            build_in_namespace(source, f"rabit_{tag}", Path(directory), "attention kernel")
            ops[tag] = getattr(torch.ops, f"rabit_{tag}").decode_attention.out
    torch.manual_seed(0)
    flush = torch.empty(48 << 20, dtype=torch.uint8)
    if max(args.positions) > args.slots:
        parser.error("--slots must be at least every --positions")
    print(f"A {args.a}, B {args.b}: {args.threads} threads, {args.rounds} rounds, {args.slots} cache slots")
    for model, (heads, rows, dim, layers) in MODELS.items():
        calls = [(torch.randn(1, heads, rows, dim), torch.randn(1, heads, args.slots, dim),
                  torch.randn(1, heads, args.slots, dim), torch.empty(1, heads, rows, dim)) for _ in range(layers)]
        for count in args.positions:
            mask = torch.zeros(1, 1, 1, args.slots, dtype=torch.bool)
            mask[..., :count] = True
            a, b = ([op(q, k, v, mask, dim ** -0.5, out=torch.full_like(out, float("nan")))
                     for q, k, v, out in calls] for op in ops.values())
            same = (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6)) if args.rounding else torch.equal
            if not all(same(x, y) for x, y in zip(a, b, strict=True)):
                raise SystemExit(f"{model} n={count}: A and B differ")
            for cold in (False, True):
                def one_pass(tag: str, cold: bool = cold, mask: torch.Tensor = mask, calls: list = calls,
                             scale: float = dim ** -0.5) -> float:
                    if cold:
                        flush.add_(1)
                    started = time.perf_counter()
                    for q, k, v, out in calls:
                        ops[tag](q, k, v, mask, scale, out=out)
                    return (time.perf_counter() - started) / len(calls)

                print(f"  {model:10s} n={count:<4d} {'cold' if cold else 'warm'}  " + alternate(args.rounds, one_pass))


if __name__ == "__main__":
    main()
