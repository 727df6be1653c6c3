"""Two versions of the LUT kernel's source in one process, alternating: time per call and the ratio, per shape.

    git show HEAD~1:kernels/cpu_lut.cpp > /tmp/before.cpp
    python benchmarks/lut_ab.py /tmp/before.cpp kernels/cpu_lut.cpp --threads 1 --rounds 15
    python benchmarks/lut_ab.py /tmp/before.cpp kernels/cpu_lut.cpp --model smollm2 --isa avx2

On a shared 2-core VM one process can run 1.5-2x slower than the next for minutes, so a kernel change is judged
here, not by separate runs of ``lut_bandwidth.py``: each source is built as its own operator namespace
(``rabit_a``, ``rabit_b``), both see the same random layers (k = 2, int8 tables, one row of x, the backend's
sibling groups, every block of the model so that the signs exceed the caches), the outputs are checked to be
identical, and every round times a pass of each (the order alternating). Per shape: median µs per call of A and
B, B / A, and in how many rounds B was faster.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lut_bandwidth import QWEN_BLOCKS, QWEN_SHAPES, random_layout
from rabit_compiler.kernels import cpp_build, cpu_lut

# name: (sibling out_features, in_features), blocks
MODELS = {
    "qwen-coder": (QWEN_SHAPES, QWEN_BLOCKS),
    "smollm2": ({"qkv": ([576, 192, 192], 576), "o": ([576], 576), "gate+up": ([1536, 1536], 576),
                 "down": ([576], 1536)}, 30),
}


def build_in_namespace(source: Path, namespace: str, directory: Path, what: str) -> ctypes.CDLL:
    """A kernel source built and loaded with its operators in ``namespace`` instead of ``rabit`` and its C symbols
    suffixed ``_<namespace>``, so that two versions of one kernel live in one process."""
    text = cpp_build.source_text(source)
    text = text.replace("TORCH_LIBRARY_FRAGMENT(rabit,", f"TORCH_LIBRARY_FRAGMENT({namespace},")
    text = text.replace("TORCH_LIBRARY_IMPL(rabit,", f"TORCH_LIBRARY_IMPL({namespace},")
    text = re.sub(r'(extern "C" (?:AOTI_TORCH_EXPORT )?\w+ )(\w+)\(', rf"\1\2_{namespace}(", text)
    renamed = directory / namespace / source.name
    renamed.parent.mkdir()
    renamed.write_text(text)
    return ctypes.CDLL(str(cpp_build.build_library(renamed, f"{what} {source}")))


def alternate(rounds: int, time_pass: Callable[[str], float]) -> str:
    """``time_pass("a")`` and ``time_pass("b")`` (seconds) once each per round, the order alternating; the medians
    in µs, B / A and in how many rounds B was faster, as one line."""
    times = {"a": [], "b": []}
    for round_index in range(rounds):
        for tag in ("ab" if round_index % 2 == 0 else "ba"):
            times[tag].append(time_pass(tag))
    wins = sum(tb < ta for ta, tb in zip(times["a"], times["b"], strict=True))
    median_a, median_b = statistics.median(times["a"]) * 1e6, statistics.median(times["b"]) * 1e6
    return f"A {median_a:7.2f} us  B {median_b:7.2f} us  B/A {median_b / median_a:5.2f}  B faster in {wins}/{rounds}"


def build_as(source: Path, namespace: str, isa: str, directory: Path):
    """``source`` built in ``namespace`` (:func:`build_in_namespace`), on path ``isa``; the ``lut_gemv.out``
    overload."""
    library = build_in_namespace(source, namespace, directory, "LUT kernel")
    getattr(library, f"rabit_lut_set_isa_{namespace}")(cpu_lut.ISA_PATHS.index(isa))
    return getattr(torch.ops, namespace).lut_gemv.out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="cpu_lut.cpp, version A")
    parser.add_argument("b", type=Path, help="cpu_lut.cpp, version B")
    parser.add_argument("--model", choices=MODELS, default="qwen-coder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--isa", choices=cpu_lut.ISA_PATHS, default=None, help="default: the best this CPU runs")
    parser.add_argument("--shapes", nargs="*", default=None, help="default: all of the model's")
    args = parser.parse_args()
    isa = args.isa or cpu_lut.available_isas()[-1]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        ops = {name: build_as(source, f"rabit_{name}", isa, Path(directory))
               for name, source in (("a", args.a), ("b", args.b))}
    shapes, blocks = MODELS[args.model]
    torch.manual_seed(0)
    layers = {}
    for name, (sizes, in_features) in shapes.items():
        if args.shapes and name not in args.shapes:
            continue
        x = torch.randn(1, in_features)
        layers[name] = [(x, random_layout(sizes, in_features, 2, cpu_lut.byte_planes_for("int8", isa)), sizes,
                         in_features, torch.empty(1, sum(sizes))) for _ in range(blocks)]

    def one_pass(op, calls) -> float:
        started = time.perf_counter()
        for x, layout, sizes, in_features, out in calls:
            op(x, layout.signs, layout.row_scale, layout.col_scale, layout.bias, sizes, in_features, True, out=out)
        return (time.perf_counter() - started) / len(calls)

    print(f"A {args.a}, B {args.b}: {args.model} shapes x {blocks} blocks, ISA {isa}, {args.threads} threads, "
          f"{args.rounds} rounds")
    for name, calls in layers.items():
        x, layout, sizes, in_features, _ = calls[0]
        a, b = (ops[tag](x, layout.signs, layout.row_scale, layout.col_scale, layout.bias, sizes, in_features, True,
                         out=torch.full((1, sum(sizes)), float("nan"))) for tag in "ab")
        if not torch.equal(a, b):
            raise SystemExit(f"{name}: A and B differ (largest difference {(a - b).abs().max().item():.3g})")
        def warm_pass(tag: str, calls: list = calls) -> float:
            one_pass(ops[tag], calls)
            return one_pass(ops[tag], calls)

        print(f"  {name:8s} " + alternate(args.rounds, warm_pass))


if __name__ == "__main__":
    main()
