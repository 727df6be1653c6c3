"""RaBiT against llama.cpp on the same CPU, in one run: batch-1 decode speed, held-out perplexity, bytes per token.

Every variant decodes the same prompt greedily at batch 1 with the same number of threads, and the timing covers
forward passes only (no sampling, no framework loop): llama.cpp's ``eval`` of one token, torch's call of the decode
step on a static KV cache. Variants, one after another in this process:

- llama.cpp (``llama-cpp-python``) on the GGUF the model ships as, and on llama.cpp's own re-quantizations of it
  (``llama_model_quantize`` with ``allow_requantize``; ``--llama-formats``);
- torch fp32 eager and fp32 Inductor (the decode step compiled, ``fullgraph=True``);
- RaBiT: ``quantize_`` (k = 2, the default fit, 16 x 512 calibration windows of the Lee news corpus) then
  ``backend="rabit"``, once per LM-head scheme (``--heads``: weight-only int8 / int4, or fp) and CPU table precision
  of the decode kernel (``--tables``: fp32, exact, or int8), the decode step compiled by ``torch.compile`` and/or
  ahead of time by :class:`~rabit_compiler.aot_decode.AOTDecoder` (``--decoders``). ``--rabit-model DIR`` reads a
  model that ``rabit quantize --method ptq`` saved instead (a 1.5 B model's fit takes most of an hour here), with
  the head it was saved with; its bf16 tensors (embedding, norms) are cast to fp32, as the fp rows run.

Perplexity: held-out ``lee.cor``, 512-token windows, no BOS, the same token ids for every runtime (llama.cpp's from
its logits of the same windows). Bytes per token: every weight tensor read to decode one token (the input embedding
counts one row; a head tied to it counts in full, as llama.cpp reads it for the output).

    python benchmarks/cpu_peers.py --model smollm2 --threads 1 2 --out benchmarks/cpu_peers
    python benchmarks/cpu_peers.py --model smollm2 --llama-formats Q4_0 --heads int8 --tables int8 --decoders aot \
        --rounds 7     # then 7 interleaved rounds of the llama.cpp and AOT decoders: ratios robust to a noisy host
    python benchmarks/cpu_peers.py --model qwen-coder --threads 1 2 --windows 4 --rabit-model DIR \
        --out benchmarks/cpu_peers_qwen

llama-cpp-python is an optional benchmark extra built from source (see README); without it the llama.cpp rows say
so and the rest runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from transformers import StaticCache

import rabit_compiler as rabit
from rabit_compiler.aot_decode import AOTDecoder, cache_keyword
from rabit_compiler.cache import cache_dir
from rabit_compiler.data import lee_corpus, token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.head import quantize_head_

PROMPT = "The Prime Minister said on Tuesday that the government would"
LLAMA_FORMATS = {"Q8_0": 7, "Q4_0": 2, "Q2_K": 10}  # llama_ftype values
# (runtime, variant, threads) -> one greedy decode of --new-tokens steps, its seconds per step (--rounds)
Timers = dict[tuple[str, str, int], Callable[[], list[float]]]


@dataclass
class Row:
    model: str
    runtime: str
    variant: str
    threads: int
    tokens_per_s: float | None = None
    perplexity: float | None = None
    bytes_per_token_mb: float | None = None
    note: str = ""


def median_tokens_per_s(step_seconds: list[float]) -> float:
    return 1.0 / float(np.median(step_seconds))


# ----------------------------------------------------------------------------------------------------- llama.cpp
def llama_cpp_rows(model_name: str, gguf: Path, formats: list[str], threads: list[int], prompt_ids: list[int],
                   windows: torch.Tensor, new_tokens: int, timers: Timers | None = None) -> list[Row]:
    try:
        import llama_cpp
    except ImportError:
        return [Row(model_name, "llama.cpp", "—", t, note="llama-cpp-python is not installed") for t in threads]
    rows = []
    shipped = re.search(r"(?:BF16|F16|F32|I?Q\d\w*)$", gguf.stem, re.IGNORECASE)  # the name's quant type
    files = {(shipped.group(0).upper() if shipped else gguf.stem) + " (shipped)": gguf}
    for name in formats:
        target = cache_dir("models", "llama.cpp") / f"{gguf.stem}.requant-{name}.gguf"
        if not target.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = LLAMA_FORMATS[name], True, max(threads)
            if llama_cpp.llama_model_quantize(str(gguf).encode(), str(target).encode(), params) != 0:
                rows.append(Row(model_name, "llama.cpp", name, 0, note="llama_model_quantize failed"))
                continue
        files[f"{name} (re-quantized)"] = target
    for variant, path in files.items():
        tensor_types, weight_bytes = gguf_weight_bytes(path)
        for t in threads:
            row = Row(model_name, "llama.cpp", variant, t, bytes_per_token_mb=weight_bytes / 1e6,
                      note=f"tensor types {tensor_types}")
            llm = llama_cpp.Llama(str(path), n_ctx=max(windows.shape[1], len(prompt_ids) + new_tokens + 8),
                                  n_threads=t, n_threads_batch=t, n_batch=512, logits_all=False, verbose=False)
            row.tokens_per_s = median_tokens_per_s(llama_decode_steps(llm, llama_cpp, prompt_ids, new_tokens))
            if timers is not None:  # kept for the interleaved rounds
                timers["llama.cpp", variant, t] = lambda llm=llm: llama_decode_steps(llm, llama_cpp, prompt_ids,
                                                                                     new_tokens)
            del llm
            if t == threads[-1]:
                scorer = llama_cpp.Llama(str(path), n_ctx=windows.shape[1], n_threads=t, n_threads_batch=t,
                                         n_batch=windows.shape[1], logits_all=True, verbose=False)
                row.perplexity = llama_perplexity(scorer, windows)
                del scorer
            rows.append(row)
            print(f"  llama.cpp {variant} threads={t}: {row.tokens_per_s:.1f} tok/s", flush=True)
    return rows


def llama_decode_steps(llm, llama_cpp, prompt_ids: list[int], new_tokens: int) -> list[float]:
    """Seconds of each one-token ``eval`` after the prompt (greedy; the argmax is outside the timing)."""
    llm.reset()
    llm.eval(prompt_ids)
    n_vocab = llm.n_vocab()
    steps = []
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        token = int(logits.argmax())
        started = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - started)
    return steps


def llama_perplexity(llm, windows: torch.Tensor) -> float:
    """exp(mean NLL) of each window's next tokens from llama.cpp's logits (as :func:`perplexity` scores them)."""
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
        count += len(window) - 1
    return math.exp(total / count)


def gguf_weight_bytes(path: Path) -> tuple[dict[str, int], int]:
    """(tensor type -> count, bytes read per token): every tensor, but one row of an untied token embedding."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    types: dict[str, int] = {}
    total = 0
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
        size = int(tensor.n_bytes)
        if tensor.name == "token_embd.weight" and "output.weight" in names:
            size //= int(tensor.shape[-1])  # one row per token (shape is [K, vocab] in GGUF order)
        total += size
    return types, total


# --------------------------------------------------------------------------------------------------------- torch
def torch_decode_steps(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, backend: str | None,
                       options: dict | None = None, max_cache_len: int | None = None) -> tuple[list[float], list[int]]:
    """Seconds of each decode-step forward on a static cache (``max_cache_len``, default just long enough; after two
    warm-up steps that compile), and the greedy tokens."""
    needed = prompt.shape[1] + new_tokens + 2
    if max_cache_len is not None and max_cache_len < needed:
        raise ValueError(f"max_cache_len {max_cache_len} < the {needed} positions this decode needs")
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len or needed)
    forward = model.forward if backend is None else torch.compile(model.forward, backend=backend, fullgraph=True,
                                                                  dynamic=False, options=options)
    steps, tokens = [], []
    with torch.no_grad():
        logits = model(prompt, cache_position=torch.arange(prompt.shape[1]), use_cache=True,
                       **{cache_keyword(model): cache}).logits
        for position in range(prompt.shape[1], prompt.shape[1] + new_tokens + 2):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            started = time.perf_counter()
            logits = forward(input_ids=token, cache_position=torch.tensor([position]), use_cache=True,
                             **{cache_keyword(model): cache}).logits
            steps.append(time.perf_counter() - started)
    return steps[2:], tokens


def torch_bytes_per_token(model: torch.nn.Module) -> int:
    """Every parameter and buffer once, but the input embedding as one row (unless the head reads it too)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        total += size // embedding.shape[0] if tensor is embedding and not tied else size
    return total


def decode_rows(model_name: str, runtime: str, name: str, module: torch.nn.Module, tokenizer, threads: list[int],
                prompt: torch.Tensor, new_tokens: int, backend: str | None, options: dict | None, ppl: float,
                note: str) -> list[Row]:
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        torch.compiler.reset()
        steps, tokens = torch_decode_steps(module, prompt, new_tokens, backend, options)
        rows.append(Row(model_name, runtime, name, t, median_tokens_per_s(steps), ppl,
                        torch_bytes_per_token(module) / 1e6, note + f"greedy: {tokenizer.decode(tokens[:12])!r}"))
        print(f"  {runtime} {name} threads={t}: {rows[-1].tokens_per_s:.1f} tok/s, PPL {ppl:.2f}", flush=True)
    return rows


def aot_decode_steps(decoder: AOTDecoder, prompt: torch.Tensor, new_tokens: int, threads: int
                     ) -> tuple[list[float], list[int]]:
    """Seconds of each step after two warm-up steps, and the greedy tokens."""
    torch.set_num_threads(threads)
    logits = decoder.prefill(prompt)
    steps, tokens = [], []
    for _ in range(new_tokens + 2):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
        started = time.perf_counter()
        logits = decoder.step(token)
        steps.append(time.perf_counter() - started)
    return steps[2:], tokens


def aot_rows(model_name: str, name: str, module: torch.nn.Module, tokenizer, threads: list[int],
             prompt: torch.Tensor, new_tokens: int, options: dict, ppl: float, note: str,
             timers: Timers | None = None) -> list[Row]:
    """The RaBiT rows with the decode step compiled ahead of time (:class:`rabit_compiler.aot_decode.AOTDecoder`,
    built once, then timed per thread count: its kernels take torch's thread count at run time)."""
    started = time.perf_counter()
    decoder = AOTDecoder(module, max_cache_len=prompt.shape[1] + new_tokens + 3, options=options)
    note += f"AOTInductor build {time.perf_counter() - started:.0f} s; "
    rows = []
    for t in threads:
        steps, tokens = aot_decode_steps(decoder, prompt, new_tokens, t)
        rows.append(Row(model_name, "rabit", name + ", AOTInductor", t, median_tokens_per_s(steps), ppl,
                        torch_bytes_per_token(module) / 1e6, note + f"greedy: {tokenizer.decode(tokens[:12])!r}"))
        print(f"  rabit {rows[-1].variant} threads={t}: {rows[-1].tokens_per_s:.1f} tok/s, PPL {ppl:.2f}", flush=True)
        if timers is not None:
            timers["rabit", rows[-1].variant, t] = lambda t=t: aot_decode_steps(decoder, prompt, new_tokens, t)[0]
    return rows


def fp_rows(model_name: str, model: torch.nn.Module, tokenizer, threads: list[int], prompt: torch.Tensor,
            windows: torch.Tensor, new_tokens: int) -> list[Row]:
    """fp32 eager and Inductor."""
    rows: list[Row] = []
    ppl = perplexity(model, windows, progress=False)
    for name, backend in [("fp32 eager", None), ("fp32 Inductor", "inductor")]:
        rows += decode_rows(model_name, "torch", name, model, tokenizer, threads, prompt, new_tokens, backend, None,
                            ppl, "")
    return rows


def rabit_rows(model_name: str, model: torch.nn.Module, tokenizer, threads: list[int], prompt: torch.Tensor,
               windows: torch.Tensor, calibration: torch.Tensor, heads: list[str], tables: list[str],
               new_tokens: int, decoders: list[str], timers: Timers | None = None) -> list[Row]:
    """RaBiT (k = 2, the default fit; ``model`` is quantized in place) per head scheme, CPU table precision and
    decoder. The perplexity is the eager model's (prefill windows take the reference path, not the decode tables:
    the int8 tables' cost is measured by benchmarks/lut_ppl.py)."""
    rows: list[Row] = []
    started = time.perf_counter()
    report = rabit.quantize_(model, rabit.RaBiTConfig(head="fp"), calibration=calibration)  # in place: no 2nd copy
    fit_note = (f"quantize_ {time.perf_counter() - started:.0f} s ({calibration.shape[0]} x 512 calibration), "
                f"{len(report.quantized)} linears k=2; ")
    for head in heads:
        variant = copy.deepcopy(model)
        quantize_head_(variant, head, calibration=calibration)  # as quantize_ would (int4: GPTQ)
        ppl = perplexity(variant, windows, progress=False)
        for table in tables:
            name = f"k=2, head {head}, {table} tables"
            if "compile" in decoders:
                rows += decode_rows(model_name, "rabit", name, variant, tokenizer, threads, prompt, new_tokens,
                                    "rabit", {"cpu_tables": table}, ppl, fit_note)
            if "aot" in decoders:
                rows += aot_rows(model_name, name, variant, tokenizer, threads, prompt, new_tokens,
                                 {"cpu_tables": table}, ppl, fit_note, timers)
        del variant
        gc.collect()
    return rows


def saved_rows(model_name: str, directory: Path, tokenizer, threads: list[int], prompt: torch.Tensor,
               windows: torch.Tensor, heads: list[str], tables: list[str], new_tokens: int,
               decoders: list[str], timers: Timers | None = None) -> list[Row]:
    """The rows of a model saved by ``rabit quantize --method ptq``: its packed layers as saved, bf16 tensors cast
    to fp32, per head scheme (one other than the saved one is re-quantized from the saved head's values)."""
    saved = rabit.load(directory)
    for tensor in (*saved.parameters(), *saved.buffers()):
        if tensor.dtype == torch.bfloat16:
            tensor.data = tensor.data.float()
    run_file = directory / "rabit_run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    saved_head = saved.get_output_embeddings()
    saved_scheme = f"int{saved_head.bits}" if hasattr(saved_head, "bits") else "fp"
    rows = []
    for head in heads:
        model = copy.deepcopy(saved)
        note = (f"saved by rabit quantize ({run.get('method', '?')}, quantize_ {run.get('quantize_seconds', 0):.0f} "
                f"s), head {saved_scheme}")
        if head != saved_scheme:
            dense = torch.nn.Linear(saved_head.in_features, saved_head.out_features, bias=saved_head.bias is not None)
            dense.weight.data = saved_head.dequantize() if saved_scheme != "fp" else saved_head.weight.data
            if dense.bias is not None:
                dense.bias.data = saved_head.bias.data.float()
            model.set_output_embeddings(dense)
            quantize_head_(model, head)
            note += f" re-quantized to {head}"
        ppl = perplexity(model, windows, progress=False)
        for table in tables:
            name = f"{directory.name}, head {head}, {table} tables"
            if "compile" in decoders:
                rows += decode_rows(model_name, "rabit", name, model, tokenizer, threads, prompt, new_tokens,
                                    "rabit", {"cpu_tables": table}, ppl, note + "; ")
            if "aot" in decoders:
                rows += aot_rows(model_name, name, model, tokenizer, threads, prompt, new_tokens,
                                 {"cpu_tables": table}, ppl, note + "; ", timers)
        del model
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------------------- main
def load(model_name: str):
    from rabit_compiler import models

    if model_name == "smollm2":
        model, tokenizer = models.load_smollm2(torch.float32)
        return model, tokenizer, models._smollm2_package_dir() / models.SMOLLM2_GGUF
    model, tokenizer = models.load_qwen_coder(torch.float32)
    return model, tokenizer, models.qwen_coder_gguf()


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"{cpu}, {isa}, {torch.get_num_threads()} threads available"


def interleaved_rounds(timers: Timers, rounds: int) -> list[str]:
    """Every kept llama.cpp and AOT decoder decodes once per round, one after another, so that a slow phase of a
    shared machine slows all of them alike; per decoder the median over rounds of its median step, and per round its
    speed over the fastest llama.cpp format's at the same threads (median, range). Markdown lines."""
    step_medians: dict[tuple[str, str, int], list[float]] = {key: [] for key in timers}
    for number in range(rounds):
        for key, timer in timers.items():
            time.sleep(0.2)  # the other runtime's idle threads stop spinning
            step_medians[key].append(float(np.median(timer())))
        print(f"  round {number + 1}/{rounds} done", flush=True)
    lines = [f"Interleaved: {rounds} rounds, each decoder once per round in turn (tok/s: median over rounds of each "
             "round's median step; ratio: per round, over the fastest llama.cpp format at the same threads)", "",
             "| runtime | variant | threads | tok/s | ratio, median | ratio, range |", "|---|---|---|---|---|---|"]
    for (runtime, variant, threads), medians in step_medians.items():
        peers = [m for (r, _, t), m in step_medians.items() if r == "llama.cpp" and t == threads]
        ratio = "— | —"
        if peers:
            ratios = [min(fastest) / own for own, fastest in zip(medians, zip(*peers, strict=True), strict=True)]
            ratio = f"{np.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x"
        lines.append(f"| {runtime} | {variant} | {threads} | {1 / np.median(medians):.1f} | {ratio} |")
    return lines


def print_table(rows: list[Row]) -> None:
    print("| model | runtime | variant | threads | decode tok/s | held-out PPL | MB read per token | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tps = "—" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}"
        ppl = "—" if r.perplexity is None else f"{r.perplexity:.2f}"
        mb = "—" if r.bytes_per_token_mb is None else f"{r.bytes_per_token_mb:.1f}"
        print(f"| {r.model} | {r.runtime} | {r.variant} | {r.threads} | {tps} | {ppl} | {mb} | {r.note} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "qwen-coder"], default="smollm2")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--windows", type=int, default=9, help="held-out 512-token windows for perplexity")
    parser.add_argument("--llama-formats", nargs="*", default=list(LLAMA_FORMATS), choices=list(LLAMA_FORMATS))
    parser.add_argument("--heads", nargs="*", default=["int8", "int4"], choices=["int8", "int4", "fp"])
    parser.add_argument("--tables", nargs="*", default=["fp32", "int8"], choices=["fp32", "int8"],
                        help="the CPU decode kernel's tables (backend option cpu_tables)")
    parser.add_argument("--decoders", nargs="*", default=["compile", "aot"], choices=["compile", "aot"],
                        help="RaBiT decode step: torch.compile(backend='rabit') and/or AOTDecoder (AOTInductor)")
    parser.add_argument("--calibration-windows", type=int, default=16, help="x 512 tokens for quantize_")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--rabit-model", type=Path, default=None,
                        help="a model saved by `rabit quantize --method ptq` (instead of quantize_ here)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="then this many interleaved rounds of the llama.cpp and AOT decoders (a noisy machine)")
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = (f"# CPU peers, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}; {machine()}; "
              f"torch {torch.__version__}; batch 1, greedy, {args.new_tokens} decode steps (median step time)")
    print(header, flush=True)
    model, tokenizer, gguf = load(args.model)
    train, heldout = lee_corpus()
    windows = token_windows(tokenizer, heldout, 512, max_windows=args.windows)
    calibration = token_windows(tokenizer, train, 512, max_windows=args.calibration_windows)
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    timers: Timers | None = {} if args.rounds > 0 else None
    rows = llama_cpp_rows(args.model, gguf, args.llama_formats, args.threads, prompt[0].tolist(), windows,
                          args.new_tokens, timers)
    if not args.skip_torch:
        rows += fp_rows(args.model, model, tokenizer, args.threads, prompt, windows, args.new_tokens)
        if args.rabit_model is not None:
            del model  # the fp32 model (6 GB for the 1.5 B one) is not needed by the saved model's rows
            gc.collect()
            rows += saved_rows(args.model, args.rabit_model, tokenizer, args.threads, prompt, windows, args.heads,
                               args.tables, args.new_tokens, args.decoders, timers)
        else:
            rows += rabit_rows(args.model, model, tokenizer, args.threads, prompt, windows, calibration, args.heads,
                               args.tables, args.new_tokens, args.decoders, timers)
    rounds = interleaved_rounds(timers, args.rounds) if timers else []
    print()
    print(header)
    print_table(rows)
    if rounds:
        print("\n" + "\n".join(rounds))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows],
                                                           "interleaved": rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
