"""Batch-1 decode speed, end to end through Hugging Face ``generate`` with a static KV cache, in one run:

- fp eager (fp16 on CUDA, fp32 on CPU), no compilation;
- fp ``torch.compile`` (Inductor) of the decode step;
- torchao int4 weight-only (group 128) + Inductor, when torchao imports (else a line saying it is not installed);
- RaBiT eager (``quantize_``, the packed op without compilation) and RaBiT ``backend="rabit"``.

All compiled variants use the same settings: decode step compiled once (``fullgraph=True``, static shapes),
prefill uncompiled, ``mode="reduce-overhead"`` (CUDA graphs) on CUDA. Each variant runs once to warm up
(compile) and once timed. Reported: time to first token (prefill + first token), decode tokens/s after the
second token, the first decode step of the warm-up run (includes compilation), parameter+buffer bytes, peak
GPU memory on CUDA, and whether the greedy tokens equal the eager run of the same weights.

Models: ``smollm2`` (SmolLM2-135M-Instruct, real weights), ``tiny`` (a 2-layer random Llama, for CI),
``llama2-7b`` / ``llama3-8b`` (the real shapes with *random weights*: speed only; CUDA only).

    python benchmarks/decode.py --model smollm2             # CPU or GPU
    python benchmarks/decode.py --tiny                      # seconds on CPU
    python benchmarks/decode.py --model llama2-7b llama3-8b smollm2 --new-tokens 128   # a GPU
"""

from __future__ import annotations

import argparse
import ast
import gc
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import rabit_compiler as rabit
from rabit_compiler.generation import decode_compile_config, timed_generate
from rabit_compiler.quantize import model_bytes

RANDOM_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
CUDA_ONLY = ("llama2-7b", "llama3-8b")
VARIANTS = ("fp-eager", "fp-inductor", "torchao-int4", "rabit-eager", "rabit")
EAGER_REFERENCE = {"fp-inductor": "fp-eager", "rabit": "rabit-eager"}


@dataclass
class Row:
    model: str
    variant: str
    weights_mb: float | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    first_step_s: float | None = None
    peak_gpu_mb: float | None = None
    tokens_match: str = ""
    note: str = ""


def build_model(name: str, device: torch.device, dtype: torch.dtype,
                prompt_tokens: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The model in ``dtype`` on ``device`` and a prompt ``[1, T]``; and a description."""
    if name == "smollm2":
        from rabit_compiler.models import load_smollm2

        model, tokenizer = load_smollm2(torch.float32)
        prompt = tokenizer("The Prime Minister said on Tuesday that the government would", return_tensors="pt")
        return model.to(device=device, dtype=dtype), prompt["input_ids"].to(device), "real weights"
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **RANDOM_SHAPES[name])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    prompt = torch.randint(3, config.vocab_size, (1, prompt_tokens), device=device)
    return model, prompt, "RANDOM weights (speed only)"


def torchao_int4(model: torch.nn.Module) -> str:
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_

    ao_quantize_(model, Int4WeightOnlyConfig(group_size=128))
    return "group 128"


def rabit_quantizer(paths: int, rounds: int, head: str | None = None) -> Callable[[torch.nn.Module], str]:
    def quantize(model: torch.nn.Module) -> str:
        config = rabit.RaBiTConfig(paths=paths, rounds=rounds, **({} if head is None else {"head": head}))
        report = rabit.quantize_(model, config, progress=False)
        return (f"k={paths}, data-free, {rounds} SVID rounds, {len(report.quantized)} linears packed, "
                f"head {config.head}")

    return quantize


def parse_options(items: list[str]) -> dict[str, object] | None:
    """``["key=value", ...]`` -> backend options (values read as Python literals where they parse), None if empty."""
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options or None


def variant_setup(variant: str, device: torch.device,
                  args: argparse.Namespace) -> tuple[Callable[[torch.nn.Module], str] | None, object]:
    """(how to transform the fp model, the decode CompileConfig or None for eager)."""
    inductor = decode_compile_config(device, "inductor")
    quantize = rabit_quantizer(args.paths, args.rounds, args.head)
    return {
        "fp-eager": (None, None),
        "fp-inductor": (None, inductor),
        "torchao-int4": (torchao_int4, inductor),
        "rabit-eager": (quantize, None),
        "rabit": (quantize, decode_compile_config(device, "rabit", options=parse_options(args.options))),
    }[variant]


def run_variant(name: str, variant: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace,
                tokens_by_variant: dict[str, torch.Tensor]) -> Row:
    row = Row(name, variant)
    if variant == "torchao-int4":
        try:
            import torchao  # noqa: F401
        except ImportError:
            row.note = "torchao is not installed: no int4 baseline"
            return row
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, prompt, weights = build_model(name, device, dtype, args.prompt_tokens)
    transform, compile_config = variant_setup(variant, device, args)
    notes = [weights]
    try:
        if transform is not None:
            notes.append(transform(model))
        row.weights_mb = model_bytes(model) / 1e6
        _, warmup = timed_generate(model, prompt, args.new_tokens, compile_config)
        tokens, timing = timed_generate(model, prompt, args.new_tokens, compile_config)
    except Exception as error:  # report the failure of this variant and go on with the others
        row.note = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return row
    finally:
        del model
        gc.collect()
    row.ttft_s = timing.time_to_first_token_s
    row.tokens_per_s = timing.decode_tokens_per_s
    row.first_step_s = warmup.first_decode_step_s
    if device.type == "cuda":
        row.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 1e6
    tokens_by_variant[variant] = tokens
    reference = tokens_by_variant.get(EAGER_REFERENCE.get(variant, ""))
    if reference is not None:
        row.tokens_match = "yes" if torch.equal(tokens, reference) else "NO"
    row.note = "; ".join(notes)
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    print("| model | variant | params+buffers MB | time to first token s | decode tokens/s | × fp compiled | "
          "first decode step (warm-up, incl. compile) s | peak GPU MB | greedy tokens = eager | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next((r.tokens_per_s for r in rows if r.model == row.model and r.variant == "fp-inductor"), None)
        speedup = row.tokens_per_s / base if row.tokens_per_s and base else None
        print(f"| {row.model} | {row.variant} | {_fmt(row.weights_mb, '.1f')} | {_fmt(row.ttft_s, '.3f')} | "
              f"{_fmt(row.tokens_per_s, '.2f')} | {_fmt(speedup, '.2f')} | {_fmt(row.first_step_s, '.1f')} | "
              f"{_fmt(row.peak_gpu_mb, '.0f')} | {row.tokens_match or '—'} | {row.note} |")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=["smollm2", *RANDOM_SHAPES], default=None,
                        help="default: llama2-7b llama3-8b smollm2 on CUDA, smollm2 elsewhere")
    parser.add_argument("--tiny", action="store_true", help="only the tiny random model (CI)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of the random models")
    parser.add_argument("--paths", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=0, help="SVID rounds of the data-free fit (speed only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--head", default=None, help="RaBiTConfig.head of the rabit variants (default: its default)")
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="rabit backend options for the rabit variant, e.g. cpu_tables=int8")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = ["tiny"] if args.tiny else args.model or (["llama2-7b", "llama3-8b", "smollm2"]
                                                       if device.type == "cuda" else ["smollm2"])
    if device.type != "cuda" and any(name in CUDA_ONLY for name in models):
        parser.error(f"{', '.join(n for n in models if n in CUDA_ONLY)} run only on CUDA (no GPU here); "
                     "use --model smollm2 or --tiny")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"# decode benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {_commit()}")
    print(f"device: {gpu or platform.processor() or 'cpu'} ({device.type}, {torch.get_num_threads()} threads); "
          f"torch {torch.__version__}; fp dtype {dtype}; batch 1, {args.new_tokens} new tokens, static KV cache; "
          f"compiled variants: fullgraph decode step, mode={decode_compile_config(device, 'inductor').mode}")
    rows = []
    for name in models:
        references: dict[str, torch.Tensor] = {}
        for variant in args.variants:
            started = time.perf_counter()
            rows.append(run_variant(name, variant, device, dtype, args, references))
            print(f"  {name} {variant}: done in {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
