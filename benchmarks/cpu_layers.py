"""Per-layer CPU time of the packed residual-binary linear on SmolLM2-135M shapes vs fp32 ``F.linear``.

    python benchmarks/cpu_layers.py                          # rows 1 (decode) and 128 (prefill), k=2
    python benchmarks/cpu_layers.py --rows 1 2 4 8 16 128 --repeats 7

Each measurement calls one graph of ``--layers`` distinct layers of a shape, all applied to the same input
(the Python/guard overhead of a call is shared, as in a whole model, and the weights do not all stay in
L1/L2), and reports time / layers: the median over ``--runs`` calls (fewer for a slow variant, see
``--seconds``), best of ``--repeats`` rounds (the CPU is shared; the load average is printed). Random
weights and signs (speed does not depend on the values).

Variants, measured in the same run with ``torch.set_num_threads(--threads)``:

* ``fp32 eager``: ``F.linear`` (the matmul library); ``fp32 inductor``: the same graph through Inductor;
* ``rabit op``: ``rabit::residual_binary_linear`` eagerly (its CPU kernel: unpack + one matmul per path);
* ``lowered bitwise`` / ``lowered dense``: :func:`rabit_compiler.passes.lower_for_cpu` with that form, then
  Inductor (:mod:`rabit_compiler.kernels.cpu_lowering`).

Weight bytes per layer: fp32 ``4 N K``; packed ``4 k N ceil(K/32) + 2 k (N + K)`` (fp16 scales). GB/s is
those bytes over the time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rabit_compiler.kernels import pack_signs, words_per_row
from rabit_compiler.passes.lower import lower_for_cpu
from torch._inductor.compile_fx import compile_fx
from tqdm import tqdm

SMOLLM2_SHAPES = {  # (N, K): q/o_proj, k/v_proj, gate/up_proj, down_proj
    "q/o 576x576": (576, 576),
    "k/v 192x576": (192, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
}


class FloatLayers(torch.nn.Module):
    """``layers`` fp32 linears ``[N, K]`` applied to the same ``x``."""

    def __init__(self, layers: int, out_features: int, in_features: int):
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5, requires_grad=False)
            for _ in range(layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.linear(x, weight) for weight in self.weights]


class PackedLayers(torch.nn.Module):
    """``layers`` packed k-path linears ``[N, K]`` (fp16 scales) applied to the same ``x``."""

    def __init__(self, layers: int, out_features: int, in_features: int, paths: int):
        super().__init__()
        self.in_features = in_features
        self.layers = layers
        for i in range(layers):
            self.register_buffer(f"packed_signs_{i}", pack_signs(torch.randn(paths, out_features, in_features)))
            self.register_buffer(f"row_scale_{i}", torch.rand(paths, out_features).half())
            self.register_buffer(f"col_scale_{i}", torch.rand(paths, in_features).half())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            torch.ops.rabit.residual_binary_linear(x, getattr(self, f"packed_signs_{i}"),
                                                   getattr(self, f"row_scale_{i}"),
                                                   getattr(self, f"col_scale_{i}"), None, self.in_features)
            for i in range(self.layers)
        ]


def lowering_backend(form: str) -> Callable:
    """A ``torch.compile`` backend: :func:`lower_for_cpu` with ``form``, then Inductor."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        calls = lower_for_cpu(gm, example_inputs, form=form)
        if not calls or any(call.form != form for call in calls):
            raise RuntimeError(f"lowering did not produce the {form} form: {calls}")
        return compile_fx(gm, example_inputs)

    return backend


def median_time(fn: Callable[[], object], runs: int, repeats: int, seconds: float) -> float:
    """Best over ``repeats`` rounds of the median of ``runs`` timed calls (fewer, at least 5, if a round
    would take over ``seconds``), in seconds. With one thread the clock is the thread's CPU time (robust to
    the other jobs on a shared CPU), else wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = time.perf_counter()
    for _ in range(3):
        fn()
    runs = max(5, min(runs, int(seconds / ((time.perf_counter() - start) / 3))))
    best = float("inf")
    for _ in range(repeats):
        times = []
        for _ in range(runs):
            start = clock()
            fn()
            times.append(clock() - start)
        times.sort()
        best = min(best, times[len(times) // 2])
    return best


def packed_bytes(out_features: int, in_features: int, paths: int) -> int:
    return 4 * paths * out_features * words_per_row(in_features) + 2 * paths * (out_features + in_features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--paths", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget of one round of one variant")
    parser.add_argument("--shapes", nargs="*", choices=sorted(SMOLLM2_SHAPES), default=list(SMOLLM2_SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {commit}, "
          f"load average before: {os.getloadavg()}")
    print(f"{args.layers} layers per call, k={args.paths}, median of {args.runs} calls, best of {args.repeats}; "
          "times per layer in microseconds (speed-up vs fp32 eager)")
    print("| shape | rows | fp32 eager | fp32 inductor | rabit op (eager) | lowered bitwise | lowered dense | "
          "fp32 GB/s | bitwise GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    jobs = [(name, rows) for name in args.shapes for rows in args.rows]
    for name, rows in tqdm(jobs, desc="layers", leave=False):
        out_features, in_features = SMOLLM2_SHAPES[name]
        torch.compiler.reset()  # every job compiles new modules with the same forward: no recompile limit
        x = torch.randn(rows, in_features)
        dense_model = FloatLayers(args.layers, out_features, in_features)
        packed_model = PackedLayers(args.layers, out_features, in_features, args.paths)
        variants = {
            "fp32 eager": dense_model,
            "fp32 inductor": torch.compile(dense_model, dynamic=False),
            "rabit op": packed_model,
            "bitwise": torch.compile(packed_model, backend=lowering_backend("bitwise"), dynamic=False),
            "dense": torch.compile(packed_model, backend=lowering_backend("dense"), dynamic=False),
        }
        expected = packed_model(x)
        for variant in ("bitwise", "dense"):
            got = variants[variant](x)
            error = max((g - e).abs().max().item() / e.abs().max().item() for g, e in zip(got, expected, strict=True))
            if error > 1e-4:
                raise AssertionError(f"{variant} differs from the op by {error:.3g} (relative) on {name}")
        times = {label: median_time(lambda fn=fn, x=x: fn(x), args.runs, args.repeats, args.seconds) / args.layers
                 for label, fn in variants.items()}
        base = times["fp32 eager"]
        cells = [f"{times[label] * 1e6:.1f} ({base / times[label]:.2f}x)" for label in variants]
        fp32_rate = 4 * out_features * in_features / times["fp32 eager"] / 1e9
        packed_rate = packed_bytes(out_features, in_features, args.paths) / times["bitwise"] / 1e9
        tqdm.write(f"| {name} | {rows} | " + " | ".join(cells) + f" | {fp32_rate:.1f} | {packed_rate:.2f} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
