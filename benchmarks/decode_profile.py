"""Where one batch-1 decode step of SmolLM2-135M goes on the CPU, by op class, for a compiled decode step.

    python benchmarks/decode_profile.py                                  # backend="rabit", 2 threads
    python benchmarks/decode_profile.py --backend inductor               # the fp32 model through Inductor
    python benchmarks/decode_profile.py --threads 1 --options cpu_tables=int8
    python benchmarks/decode_profile.py --head fp                          # the LM head left in fp32

The model is packed data-free (``quantize_``, k = 2, 0 SVID rounds: speed only; the LM head as ``--head`` says,
default RaBiTConfig's) unless ``--backend inductor``;
Hugging Face ``generate`` with a static KV cache compiles the decode step once (``fullgraph=True``,
:func:`rabit_compiler.generation.decode_compile_config`). After a warm-up ``generate`` (the compilation), one
``generate`` of ``--new-tokens`` tokens is timed without the profiler (decode tokens/s) and one is profiled
(``torch.profiler``, Inductor's kernels named in the trace). Every profiled event is put in one class, the first of:

* ``packed linears``: ``rabit::`` operators (``rabit::lut_gemv``; the sign-flip kernel before it) and Inductor
  kernels of the bitwise form (``bitwise_and`` in the name);
* ``head``: ``rabit::weight_only_linear``, or a matmul whose output has ``vocab`` columns (the lm_head);
  ``fp32 linears``: any other matmul;
* ``norms``: Inductor kernels computing ``rsqrt`` (RMSNorm, with the residual add Inductor fused into it);
* ``attention``: attention (``rabit::decode_attention``, sdpa), rotary embedding and KV-cache kernels (softmax,
  bmm, index_copy, cat, neg, ...);
* ``other kernels``: the remaining kernels of the compiled graph (SwiGLU, embedding, copies);
* ``eager ops``: ops outside the compiled graph (``generate``'s own token selection and bookkeeping);

an event inside an event of a class counts in its ancestor's class. ``framework`` is the rest of the step's wall
time: Python (``generate``, Dynamo's guards, the AOTAutograd/Inductor wrappers) and the dispatcher between events.
Times are per decode step (the profiled steps' total / their count); the profiler's own overhead inflates them a
little, so the decode tokens/s line is from the unprofiled run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import defaultdict

import torch
import torch._inductor.config as inductor_config
from decode import parse_options
from torch.profiler import ProfilerActivity, profile

import rabit_compiler as rabit
from rabit_compiler.generation import decode_compile_config, timed_generate
from rabit_compiler.models import load_smollm2

CLASSES = ("packed linears", "head", "fp32 linears", "norms", "attention", "other kernels", "eager ops", "framework")
_MATMULS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul"}
_ATTENTION = re.compile(r"softmax|scaled_dot|bmm|amax|index_copy|index_put|\bcat\b|_cat_|neg|cos|sin")


def event_class(event, vocab: int, compiled: bool) -> str | None:
    """The class of one profiler event (None: none by itself; its time is its parent's or the framework's)."""
    name = event.name
    if name.startswith("rabit::weight_only"):
        return "head"
    if name.startswith("rabit::decode_attention"):
        return "attention"
    if name.startswith("rabit::") or ("cpp_fused" in name and "bitwise_and" in name):
        return "packed linears"
    if name in _MATMULS:
        shapes = [s for s in (event.input_shapes or []) if s]
        weight = shapes[2] if name == "aten::addmm" and len(shapes) > 2 else shapes[1] if len(shapes) > 1 else None
        return "head" if weight is not None and vocab in weight else "fp32 linears"
    if not compiled:
        return "eager ops" if name.startswith("aten::") else None
    if "cpp_fused" in name and "rsqrt" in name:
        return "norms"
    if "cpp_fused" in name or name.startswith("aten::"):
        return "attention" if _ATTENTION.search(name.lower()) else "other kernels"
    return None


def _inside_compiled_region(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Torch-Compiled Region"):
            return True
        parent = parent.cpu_parent
    return False


def classify(events, vocab: int) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Microseconds per class over ``events`` (outermost classified events only), and per (class, event name)."""
    totals: dict[str, float] = defaultdict(float)
    by_name: dict[tuple[str, str], float] = defaultdict(float)
    classes = {id(e): event_class(e, vocab, _inside_compiled_region(e)) for e in events}
    for event in events:
        label = classes[id(event)]
        if label is None:
            continue
        parent = event.cpu_parent
        while parent is not None and classes.get(id(parent)) is None:
            parent = parent.cpu_parent
        if parent is None:
            totals[label] += event.time_range.elapsed_us()
            by_name[label, re.sub(r"_\d+$", "", event.name.removeprefix("graph_0_"))] += event.time_range.elapsed_us()
    return totals, by_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["rabit", "inductor"], default="rabit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=12, help="list the events with the most time")
    parser.add_argument("--head", default=None, help="RaBiTConfig.head (default: RaBiTConfig's)")
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="backend options, e.g. cpu_tables=int8 (values parsed as Python literals)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inductor_config.cpp.enable_kernel_profile = True  # Inductor's kernels appear in the trace by name
    options = parse_options(args.options)
    model, tokenizer = load_smollm2()
    if args.backend == "rabit":
        head = {} if args.head is None else {"head": args.head}
        rabit.quantize_(model, rabit.RaBiTConfig(rounds=0, **head), progress=False)
    prompt = tokenizer("The Prime Minister said on Tuesday that the government would", return_tensors="pt")
    config = decode_compile_config("cpu", args.backend, options=options)
    timed_generate(model, prompt["input_ids"], args.new_tokens, config)  # compiles
    _, timing = timed_generate(model, prompt["input_ids"], args.new_tokens, config)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as trace:
        _, profiled = timed_generate(model, prompt["input_ids"], args.new_tokens, config)
    steps = args.new_tokens - 1  # decode steps (the first token comes from the prefill)
    step_us = (profiled.total_s - profiled.time_to_first_token_s) / steps * 1e6
    totals, by_name = classify(_decode_events(trace.events()), model.config.vocab_size)
    totals["framework"] = step_us * steps - sum(totals.values())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# decode step profile: SmolLM2-135M, backend={args.backend}, options={options}, head={args.head}, "
          f"{args.threads} threads, torch {torch.__version__}, commit {commit}")
    print(f"decode {timing.decode_tokens_per_s:.2f} tokens/s unprofiled ({1e3 / timing.decode_tokens_per_s:.2f} ms per "
          f"step); profiled step {step_us / 1e3:.2f} ms over {steps} steps")
    print("| class | ms per step | share |")
    print("|---|---|---|")
    for label in CLASSES:
        per_step = totals.get(label, 0.0) / steps
        print(f"| {label} | {per_step / 1e3:.3f} | {per_step / step_us:.1%} |")
    print(f"\nthe {args.top} events (kernels numbered alike counted together) with the most time, ms per step:")
    for (label, name), total in sorted(by_name.items(), key=lambda item: -item[1])[:args.top]:
        print(f"  {total / steps / 1e3:7.3f}  {label:15s} {name[:110]}")


def _decode_events(events):
    """The events of the decode steps on the thread that runs them: from the first compiled region on (the prefill
    runs before it)."""
    regions = [e for e in events if e.name.startswith("Torch-Compiled Region")]
    if not regions:
        raise RuntimeError("no compiled region in the trace: the decode step did not run compiled")
    first = min(regions, key=lambda e: e.time_range.start)
    return [e for e in events if e.thread == first.thread and e.time_range.start >= first.time_range.start]


if __name__ == "__main__":
    main()
