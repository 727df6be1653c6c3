"""The LUT decode kernel alone, over every packed linear of a model's shapes: bytes of signs streamed per second.

    python benchmarks/lut_bandwidth.py --threads 2                       # Qwen2.5-Coder-1.5B shapes, int8 tables
    python benchmarks/lut_bandwidth.py --threads 1 --source /tmp/other.cpp    # the same with another kernel source
    python benchmarks/lut_bandwidth.py --threads 1 --isa avx2            # another ISA path than the CPU's best

One decode row, k paths, random signs and scales (speed does not depend on them), the sibling groups the backend
fuses (q/k/v, gate/up). Per shape: the 28 blocks' layers called back to back (their signs exceed the caches, as in a
decode step), µs per call and GB/s of signs; then the whole model's linears in block order, ms per step: the LUT
share of a decode step without the framework around it. Median of ``--repeats``. ``--source`` builds the kernel from
another ``cpu_lut.cpp``, one process per source; to compare two sources, ``lut_ab.py`` alternates them in one
process (a shared VM's speed drifts between processes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rabit_compiler.kernels import cpu_lut
from rabit_compiler.kernels.packing import pack_signs

# name: (sibling out_features, in_features); Qwen2.5-Coder-1.5B, 28 decoder blocks
QWEN_SHAPES = {"qkv": ([1536, 256, 256], 1536), "o": ([1536], 1536), "gate+up": ([8960, 8960], 1536),
               "down": ([1536], 8960)}
QWEN_BLOCKS = 28


def random_layout(sizes: list[int], in_features: int, paths: int, byte_planes: bool) -> cpu_lut.TiledLayout:
    """Siblings of ``sizes`` rows, random signs and scales (speed does not depend on them), in the kernel's layout."""
    rows = sum(sizes)
    return cpu_lut.tiled_layout(pack_signs(torch.randn(paths, rows, in_features)), torch.rand(paths, rows),
                                torch.rand(len(sizes), paths, in_features), None, sizes, byte_planes)


def timed(calls, repeats: int) -> float:
    """Median seconds of one pass over ``calls`` (after 3 warm-up passes)."""
    times = []
    for _ in range(repeats + 3):
        started = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", type=int, default=2)
    parser.add_argument("--tables", choices=cpu_lut.TABLE_PRECISIONS, default="int8")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--source", type=Path, default=None, help="build the kernel from this cpu_lut.cpp")
    parser.add_argument("--isa", choices=cpu_lut.ISA_PATHS, default=None, help="default: the best this CPU runs")
    args = parser.parse_args()
    if args.source is not None:
        cpu_lut._SOURCE = args.source
    with cpu_lut.use_isa(args.isa or cpu_lut.active_isa()):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Time the layers of QWEN_BLOCKS blocks on the active ISA path, its own sign layout."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = {k: torch.randn(1, k) for _, k in QWEN_SHAPES.values()}
    layers: dict[str, list] = {name: [] for name in QWEN_SHAPES}
    for _ in range(QWEN_BLOCKS):
        for name, (sizes, in_features) in QWEN_SHAPES.items():
            layout = random_layout(sizes, in_features, args.paths, cpu_lut.byte_planes_for(args.tables))
            out = torch.empty(1, sum(sizes))

            def call(layout=layout, sizes=sizes, k=in_features, out=out) -> None:
                cpu_lut.lut_gemv(inputs[k], layout, sizes, k, args.tables, out=out)

            layers[name].append((call, layout.signs.numel() * layout.signs.element_size()))
    print(f"kernel source {cpu_lut._SOURCE}, ISA {cpu_lut.active_isa()}, {args.threads} threads, k = {args.paths}, "
          f"{args.tables} tables, 1 row; Qwen2.5-Coder-1.5B shapes x {QWEN_BLOCKS} blocks")
    for name, entries in layers.items():
        seconds = timed([call for call, _ in entries], args.repeats)
        megabytes = sum(size for _, size in entries) / 1e6
        print(f"  {name:8s} {seconds / len(entries) * 1e6:7.1f} us/call  {megabytes / len(entries):5.2f} MB/call  "
              f"{megabytes / 1e3 / seconds:5.1f} GB/s")
    in_order = [entry for block in zip(*layers.values(), strict=True) for entry in block]
    seconds = timed([call for call, _ in in_order], args.repeats)
    megabytes = sum(size for _, size in in_order) / 1e6
    print(f"  all      {seconds * 1e3:7.2f} ms/step  {megabytes:6.0f} MB/step  {megabytes / 1e3 / seconds:5.1f} GB/s")


if __name__ == "__main__":
    main()
