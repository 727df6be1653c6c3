"""Per-layer CPU time of the packed residual-binary linear on SmolLM2-135M shapes vs fp32 ``F.linear``.

    python benchmarks/cpu_layers.py                          # rows 1 (decode) and 128 (prefill), k=2
    python benchmarks/cpu_layers.py --rows 1 2 4 8 16 128 --repeats 7
    python benchmarks/cpu_layers.py --warm --layers 1 --rows 1 --threads 1     # one compiled layer, warm caches

Each measurement calls one graph of ``--layers`` distinct layers of a shape, all applied to the same input
(the Python/guard overhead of a call is shared, as in a whole model), and reports time / layers: the median
over ``--runs`` calls (fewer for a slow variant, see ``--seconds``), best of ``--repeats`` rounds (the CPU
is shared; the load average is printed). Random weights and signs (speed does not depend on the values).

Cold caches by default: before every timed call a buffer of ``--flush-mb`` (default twice the last-level
cache) is written, so each layer's weights come from DRAM, as in decoding a whole model, whose weights
(424 MB of fp32 linears for SmolLM2-135M) never fit in cache. ``--warm`` times back-to-back calls instead,
where a small fp32 weight (a 192x576 layer is 442 KB) stays in L2/L3 and the matmul library's GEMV runs
from cache.

Variants, measured in the same run with ``torch.set_num_threads(--threads)``:

* ``fp32-eager``: ``F.linear`` (the matmul library); ``fp32-inductor``: the same graph through Inductor;
* ``op``: ``rabit::residual_binary_linear`` eagerly (its CPU kernel: the LUT kernel of
  :mod:`rabit_compiler.kernels.cpu_lut` with fp32 tables up to ``KERNEL_MAX_ROWS`` rows, else unpack + one matmul
  per path);
* ``backend``: :func:`rabit_compiler.passes.lower_for_cpu` with the form and tables it picks by default
  (``"kernel"`` for decode rows: ``rabit::lut_gemv`` called from the Inductor graph; ``"dense"`` for prefill), then
  Inductor: what ``backend="rabit"`` runs;
* ``lut-fp32`` / ``lut-int8``: ``lower_for_cpu`` forced to the kernel form with fp32 / int8 tables, then Inductor;
* ``bitwise`` / ``dense``: ``lower_for_cpu`` forced to that form, then Inductor
  (:mod:`rabit_compiler.kernels.cpu_lowering`; ``bitwise`` is Inductor's own matmul-free loop nest);
* ``aot-int8``: ``lower_for_cpu`` (default form, int8 tables), then AOTInductor as :class:`rabit_compiler.AOTDecoder`
  builds a decode step: the weights as the library's constants (read in place), ``x`` its one input, called as
  ``AOTDecoder.step`` calls it (the loader's ``boxed_run`` on a flat list): no Dynamo guards, pytree specs or
  Python wrapper per call (the kernel calls through the C shims).

Weight bytes per layer: fp32 ``4 N K``; packed ``4 k N ceil(K/32) + 2 k (N + S K)`` (fp16 scales, S sibling
members). GB/s is those bytes over the time (packed: of the ``backend`` column). The two "fused" shapes
are what the backend runs for q/k/v and gate/up (one siblings call) against what the fp32 model runs (one
``F.linear`` per member); their time is per group, not per member.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rabit_compiler.kernels import pack_signs, words_per_row
from rabit_compiler.kernels.cpu_lut import DEFAULT_TABLE_PRECISION
from rabit_compiler.passes.lower import lower_for_cpu
from torch._inductor.compile_fx import compile_fx
from tqdm import tqdm

from rabit_compiler.aot_decode import _DecodeStep, compile_step

SMOLLM2_SHAPES = {  # (out_features of each member, K); several members: siblings sharing x, fused into one call
    "q/o 576x576": ((576,), 576),
    "k/v 192x576": ((192,), 576),
    "gate/up 1536x576": ((1536,), 576),
    "down 576x1536": ((576,), 1536),
    "q+k+v fused (576+192+192)x576": ((576, 192, 192), 576),
    "gate+up fused (2x1536)x576": ((1536, 1536), 576),
}


VARIANTS = ("fp32-eager", "fp32-inductor", "op", "lut-fp32", "lut-int8", "bitwise", "dense", "aot-int8", "backend")
LOWERED = {"lut-fp32": ("kernel", "fp32"), "lut-int8": ("kernel", "int8"), "bitwise": ("bitwise", None),
           "dense": ("dense", None), "aot-int8": (None, "int8"),
           "backend": (None, None)}  # variant: (forced form, tables; None: the default)


class FloatLayers(torch.nn.Module):
    """``layers`` groups of fp32 linears ``[N_s, K]`` (one ``F.linear`` per member, as the fp32 model runs
    them), all applied to the same ``x``."""

    def __init__(self, layers: int, out_features: tuple[int, ...], in_features: int):
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(n, in_features) / in_features**0.5, requires_grad=False)
            for _ in range(layers) for n in out_features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.linear(x, weight) for weight in self.weights]


class PackedLayers(torch.nn.Module):
    """``layers`` packed k-path linears (fp16 scales) applied to the same ``x``: one member ``[N, K]`` is one
    ``rabit::residual_binary_linear`` call, several are one ``rabit::residual_binary_linear_siblings`` call
    (the form the backend's fuse pass gives q/k/v and gate/up)."""

    def __init__(self, layers: int, out_features: tuple[int, ...], in_features: int, paths: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = list(out_features)
        self.layers = layers
        total = sum(out_features)
        for i in range(layers):
            self.register_buffer(f"packed_signs_{i}", pack_signs(torch.randn(paths, total, in_features)))
            self.register_buffer(f"row_scale_{i}", torch.rand(paths, total).half())
            col_shape = (paths, in_features) if len(out_features) == 1 else (len(out_features), paths, in_features)
            self.register_buffer(f"col_scale_{i}", torch.rand(col_shape).half())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i in range(self.layers):
            tensors = (getattr(self, f"packed_signs_{i}"), getattr(self, f"row_scale_{i}"),
                       getattr(self, f"col_scale_{i}"), None, self.in_features)
            if len(self.out_features) == 1:
                outputs.append(torch.ops.rabit.residual_binary_linear(x, *tensors))
            else:
                outputs.append(torch.ops.rabit.residual_binary_linear_siblings(x, *tensors, self.out_features))
        return outputs


def lowering_backend(form: str | None, tables: str = DEFAULT_TABLE_PRECISION) -> Callable:
    """A ``torch.compile`` backend: :func:`lower_for_cpu` with ``form`` (None: the form it picks) and ``tables``,
    then Inductor."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        calls = lower_for_cpu(gm, example_inputs, form=form, tables=tables)
        if not calls or any(call.form is None or form not in (None, call.form) for call in calls):
            raise RuntimeError(f"lowering did not produce the {form} form: {calls}")
        return compile_fx(gm, example_inputs)

    return backend


def aot_compiled(packed_model: PackedLayers, x: torch.Tensor) -> Callable:
    """``packed_model`` lowered for the CPU (int8 tables) and compiled by AOTInductor, as ``AOTDecoder`` does."""
    captured: dict = {}

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        lower_for_cpu(gm, example_inputs, tables="int8")
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch.compile(packed_model, backend=capture, fullgraph=True, dynamic=False)(x)
    inputs = captured["inputs"]
    step = _DecodeStep(captured["gm"], inputs, {next(i for i, t in enumerate(inputs) if t is x): 0})
    runner, _ = compile_step(step, (x,))
    run = runner.loader.boxed_run  # the call AOTDecoder.step makes: flat tensor lists, no pytree specs
    return lambda x, run=run, step=step: run([x])[0]


def build_variant(label: str, dense_model: FloatLayers, packed_model: PackedLayers, x: torch.Tensor) -> Callable:
    """The callable timed as column ``label`` (see the module docstring)."""
    if label in ("fp32-eager", "op"):
        return dense_model if label == "fp32-eager" else packed_model
    if label == "fp32-inductor":
        return torch.compile(dense_model, dynamic=False)
    if label == "aot-int8":
        return aot_compiled(packed_model, x)
    form, tables = LOWERED[label]
    return torch.compile(packed_model, backend=lowering_backend(form, tables or DEFAULT_TABLE_PRECISION),
                         dynamic=False)


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (sysfs), or 32 MiB when it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 * 2**20)


def median_time(fn: Callable[[], object], runs: int, repeats: int, seconds: float,
                flush: torch.Tensor | None) -> float:
    """Best over ``repeats`` rounds of the median of ``runs`` timed calls (fewer, at least 5, if a round
    would take over ``seconds``), in seconds; ``flush`` (if given) is overwritten before each timed call,
    untimed, to evict the weights from the caches. With one thread the clock is the thread's CPU time
    (robust to the other jobs on a shared CPU), else wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = time.perf_counter()
    for _ in range(3):
        fn()
    runs = max(5, min(runs, int(seconds / ((time.perf_counter() - start) / 3))))
    best = float("inf")
    for _ in range(repeats):
        times = []
        for _ in range(runs):
            if flush is not None:
                flush.add_(1)
            start = clock()
            fn()
            times.append(clock() - start)
        times.sort()
        best = min(best, times[len(times) // 2])
    return best


def packed_bytes(out_features: int, in_features: int, paths: int, members: int = 1) -> int:
    return 4 * paths * out_features * words_per_row(in_features) + 2 * paths * (out_features + members * in_features)


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
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="columns to time (fp32-eager and backend always)")
    parser.add_argument("--warm", action="store_true", help="no cache flush between calls (weights stay cached)")
    parser.add_argument("--flush-mb", type=int, default=2 * last_level_cache_bytes() // 2**20,
                        help="size of the buffer written before each timed call (default: 2x last-level cache)")
    args = parser.parse_args()
    flush = None if args.warm else torch.zeros(args.flush_mb * 2**20 // 4)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {commit}, "
          f"load average before: {os.getloadavg()}; "
          + ("warm caches" if flush is None else f"cold caches ({args.flush_mb} MB written before each call)"))
    print(f"{args.layers} layers per call, k={args.paths}, median of {args.runs} calls, best of {args.repeats}; "
          "times per layer in microseconds (speed-up vs fp32-eager)")
    columns = ["fp32-eager", *[v for v in VARIANTS if v in args.variants and v not in ("fp32-eager", "backend")],
               "backend"]
    print("| shape | rows | " + " | ".join(columns) + " | fp32 GB/s | backend GB/s |")
    print("|---|---|" + "---|" * (len(columns) + 2))
    jobs = [(name, rows) for name in args.shapes for rows in args.rows]
    for name, rows in tqdm(jobs, desc="layers", leave=False):
        members, in_features = SMOLLM2_SHAPES[name]
        out_features = sum(members)
        torch.compiler.reset()  # every job compiles new modules with the same forward: no recompile limit
        x = torch.randn(rows, in_features)
        dense_model = FloatLayers(args.layers, members, in_features)
        packed_model = PackedLayers(args.layers, members, in_features, args.paths)
        variants = {label: build_variant(label, dense_model, packed_model, x) for label in columns}
        expected = packed_model(x)
        for variant in (v for v in columns if v in LOWERED):
            got = variants[variant](x)
            error = max((g - e).abs().max().item() / e.abs().max().item() for g, e in zip(got, expected, strict=True))
            if error > (2e-2 if "int8" in variant else 1e-4):  # int8 tables: one scale step per 32 columns
                raise AssertionError(f"{variant} differs from the op by {error:.3g} (relative) on {name}")
        times = {label: median_time(lambda fn=fn, x=x: fn(x), args.runs, args.repeats, args.seconds, flush)
                 / args.layers
                 for label, fn in variants.items()}
        base = times["fp32-eager"]
        cells = [f"{times[label] * 1e6:.1f} ({base / times[label]:.2f}x)" for label in variants]
        fp32_rate = 4 * out_features * in_features / times["fp32-eager"] / 1e9
        packed_rate = packed_bytes(out_features, in_features, args.paths, len(members)) / times["backend"] / 1e9
        tqdm.write(f"| {name} | {rows} | " + " | ".join(cells) + f" | {fp32_rate:.1f} | {packed_rate:.2f} |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
