"""The ``rabit`` command line. ``rabit demo``: the main job on the real model (see the README)."""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch

from rabit_compiler.config import RaBiTConfig


def _demo(args: argparse.Namespace) -> None:
    from rabit_compiler.data import lee_corpus, token_windows
    from rabit_compiler.evaluate import generate_text, perplexity
    from rabit_compiler.models import load_smollm2
    from rabit_compiler.quantize import quantize_

    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    train_text, heldout_text = lee_corpus()
    heldout = token_windows(tokenizer, heldout_text, args.seq_len)
    calibration = token_windows(tokenizer, train_text, args.seq_len, max_windows=args.calibration_windows)
    print(f"model: SmolLM2-135M-Instruct, loaded in {time.perf_counter() - started:.1f} s; held-out "
          f"{heldout.numel()} tokens ({heldout.shape[0]} x {args.seq_len}), calibration {calibration.numel()} tokens")

    fp_ppl = perplexity(model, heldout, batch_size=args.batch_size)
    print(f"fp32 perplexity (held-out lee.cor): {fp_ppl:.2f}")

    config = RaBiTConfig(paths=args.paths, rounds=args.rounds)
    teacher = copy.deepcopy(model) if args.tune_steps else None
    started = time.perf_counter()
    report = quantize_(model, config, calibration=None if args.data_free else calibration)
    init_seconds = time.perf_counter() - started
    print(f"quantize_ (fit {config.fit!r}, objective {config.objective!r}, sequential {config.sequential}): "
          f"{len(report.quantized)} linears packed to {args.paths} paths, {len(report.skipped)} kept fp "
          f"({', '.join(sorted(report.skipped))}); parameters+buffers {report.bytes_before / 1e6:.1f} MB -> "
          f"{report.bytes_after / 1e6:.1f} MB; {init_seconds:.1f} s")

    started = time.perf_counter()
    model.compile(backend="rabit", options={"inductor": not args.no_inductor})
    quant_ppl = perplexity(model, heldout, batch_size=args.batch_size)
    print(f"2-bit RaBiT perplexity (PTQ, no training; compiled with backend='rabit'): {quant_ppl:.1f} "
          f"[compile + eval {time.perf_counter() - started:.1f} s]")
    if teacher is not None:
        from rabit_compiler.qat.tune import tune_config, tune_scales_

        tune_windows = token_windows(tokenizer, train_text, args.tune_seq_len)
        started = time.perf_counter()
        tune_scales_(model, teacher, tune_windows, tune_config(args.tune_steps, 4, args.tune_seq_len, args.tune_lr))
        tune_seconds = time.perf_counter() - started
        del teacher
        model.compile(backend="rabit", options={"inductor": not args.no_inductor})
        tuned_ppl = perplexity(model, heldout, batch_size=args.batch_size)
        print(f"2-bit RaBiT perplexity after end-to-end scale tuning (signs fixed; {args.tune_steps} steps x 4 x "
              f"{args.tune_seq_len} tokens of lee_background, {tune_seconds:.0f} s): {tuned_ppl:.1f}")

    # generate() changes shapes (prefill, first step, later steps): three graphs. Inductor spends ~40 s on
    # each on 2 CPU cores, so the demo runs the packed graphs eagerly here; --generate-with-inductor to not.
    model.compile(backend="rabit", options={"inductor": args.generate_with_inductor})
    started = time.perf_counter()
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.new_tokens)
    print(f"generation, greedy (backend='rabit', inductor={args.generate_with_inductor}; {args.new_tokens} tokens "
          f"in {time.perf_counter() - started:.1f} s incl. compile): {args.prompt!r} -> {text!r}")


def _generate(args: argparse.Namespace) -> None:
    from rabit_compiler.generation import aot_generate_from_saved, generate_from_saved

    if args.aot:
        if args.device != "cpu" or args.mode or args.no_inductor:
            raise SystemExit("rabit generate: --aot builds a CPU decode step; it takes no --device other than cpu, "
                             "--mode or --no-inductor")
        tables = args.cpu_tables or "int8"
        _, timing, build_s = aot_generate_from_saved(args.model, args.prompt, args.max_new_tokens,
                                                     options={"cpu_tables": tables})
        print(f"\n{timing.new_tokens} tokens (greedy, static cache, decode step built ahead of time in "
              f"{build_s:.1f} s, {tables} tables): time to first token {timing.time_to_first_token_s:.3f} "
              f"s; first decode step {timing.first_decode_step_s * 1e3:.1f} ms; decode "
              f"{timing.decode_tokens_per_s:.2f} tokens/s")
        return
    if args.cpu_tables is not None:
        raise SystemExit("rabit generate: --cpu-tables is an option of --aot")
    _, timing = generate_from_saved(args.model, args.prompt, args.max_new_tokens, device=args.device,
                                    inductor=not args.no_inductor, mode=args.mode)
    print(f"\n{timing.new_tokens} tokens (greedy, static cache, decode compiled with backend='rabit'): time to first "
          f"token {timing.time_to_first_token_s:.3f} s; first decode step (incl. compile) "
          f"{timing.first_decode_step_s:.1f} s; decode {timing.decode_tokens_per_s:.2f} tokens/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rabit", description="RaBiT 2-bit residual-binary LLM compiler")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every layer decision")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="SmolLM2-135M: fp32 vs 2-bit perplexity and a short generation")
    demo.add_argument("--paths", type=int, default=2)
    demo.add_argument("--rounds", type=int, default=RaBiTConfig.rounds, help="iterative SVID rounds (0: greedy)")
    demo.add_argument("--data-free", action="store_true", help="no calibration (no preconditioning)")
    demo.add_argument("--seq-len", type=int, default=512)
    demo.add_argument("--calibration-windows", type=int, default=16)
    demo.add_argument("--batch-size", type=int, default=4)
    demo.add_argument("--no-inductor", action="store_true", help="run the rewritten graph eagerly")
    demo.add_argument("--prompt", default="The Prime Minister said on Tuesday that")
    demo.add_argument("--new-tokens", type=int, default=12)
    demo.add_argument("--generate-with-inductor", action="store_true", help="Inductor for generate() too (slow)")
    demo.add_argument("--tune-steps", type=int, default=0,
                      help="then tune the scales end to end (signs fixed) for this many distillation steps")
    demo.add_argument("--tune-seq-len", type=int, default=256)
    demo.add_argument("--tune-lr", type=float, default=1e-3)
    generate = commands.add_parser("generate", help="stream a greedy continuation from a model saved by rabit.save")
    generate.add_argument("--model", required=True, help="directory written by rabit_compiler.save (with tokenizer)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    generate.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    generate.add_argument("--no-inductor", action="store_true", help="run the packed decode graph without Inductor")
    generate.add_argument("--aot", action="store_true",
                          help="CPU: the decode step compiled ahead of time (rabit.AOTDecoder; fastest, ~40 s build)")
    generate.add_argument("--cpu-tables", choices=["fp32", "int8"], default=None,
                          help="with --aot: the CPU decode kernel's tables (backend option cpu_tables; default int8)")
    from rabit_compiler import workflows

    workflows.add_quantize_arguments(commands.add_parser(
        "quantize", help="2-bit quantize a model: QAT (rabit|standard|frozen) or a baseline (ptq|ptq-greedy|rtn)"))
    workflows.add_eval_arguments(commands.add_parser(
        "eval", help="held-out perplexity of a reference model and saved quantized models, as a table"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "demo":
        _demo(args)
    elif args.command == "quantize" and args.dry_run:
        workflows.print_memory_plan(args)
    elif args.command == "quantize":
        run = workflows.quantize_model(args)
        if run is not None:
            workflows.print_run(run)
    elif args.command == "eval":
        print(workflows.format_table(workflows.evaluate_models(args)))
    elif args.command == "generate":
        _generate(args)


if __name__ == "__main__":
    main()
