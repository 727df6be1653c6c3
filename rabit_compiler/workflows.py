"""The ``rabit quantize`` and ``rabit eval`` workflows: load a model and text, run one method, save, compare.

Methods: ``rabit`` / ``standard`` / ``frozen`` (QAT by distillation from the fp model, see
:mod:`rabit_compiler.train`), ``ptq`` (iterative residual SVID + calibration preconditioning, no training),
``ptq-greedy`` (greedy residual SVID, data-free) and ``rtn`` (2-bit per-channel min/max, dense weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.data import token_windows
from rabit_compiler.diagnostics import path_diagnostics
from rabit_compiler.evaluate import perplexity
from rabit_compiler.qat import METHODS as QAT_METHODS
from rabit_compiler.qat import convert, fit_linears, prepare_qat, rtn_
from rabit_compiler.train import QATConfig, QATTrainer

METHODS = (*QAT_METHODS, "ptq", "ptq-greedy", "rtn")
RUN_FILE = "rabit_run.json"


def load_model(name: str) -> tuple[torch.nn.Module, Any]:
    """``"smollm2"`` (see :func:`rabit_compiler.models.load_smollm2`), a directory written by
    :func:`rabit_compiler.serialization.save`, or a Hugging Face checkpoint directory; returns (model, tokenizer)."""
    if name == "smollm2":
        from rabit_compiler.models import load_smollm2

        return load_smollm2()
    directory = Path(name)
    if not directory.is_dir():
        raise FileNotFoundError(f"--model must be 'smollm2' or a model directory; {directory} does not exist")
    from rabit_compiler.serialization import MANIFEST_FILE, load, load_tokenizer

    if (directory / MANIFEST_FILE).is_file():
        return load(directory), load_tokenizer(directory)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(directory, local_files_only=True)


def text_windows(tokenizer: Any, files: list[str], seq_len: int, model: torch.nn.Module) -> torch.Tensor:
    """Token windows ``[num, seq_len]`` of the given text files (each must exist and be non-empty)."""
    if not files:
        raise ValueError("no text files given")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return token_windows(tokenizer, [Path(f) for f in files], seq_len, max_context=context)


def split_heldout(windows: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, heldout)``: the last ``fraction`` of the windows (at least one) held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    held = max(1, round(windows.shape[0] * fraction))
    if held >= windows.shape[0]:
        raise ValueError(f"{windows.shape[0]} windows are too few to hold out {fraction:.0%} and train on the rest")
    return windows[:-held], windows[-held:]


def quantize_model(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``args.method`` on ``args.model`` with the text in ``args.text``; save to ``args.out``."""
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {args.method!r}")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    windows = text_windows(tokenizer, args.text, args.seq_len, model)
    if args.heldout:
        train, heldout = windows, text_windows(tokenizer, args.heldout, args.seq_len, model)
    else:
        train, heldout = split_heldout(windows, args.heldout_fraction)
    calibration = train[: args.calibration_windows]
    config = RaBiTConfig(paths=args.paths, anchor_margin=args.anchor_margin)
    run: dict[str, Any] = {"method": args.method, "model": args.model, "text": args.text, "steps": 0, "tokens": 0}
    if args.method == "rtn":
        rtn_(model, config)
    elif args.method in ("ptq", "ptq-greedy"):
        greedy = args.method == "ptq-greedy"
        fits = fit_linears(model, RaBiTConfig(paths=args.paths, rounds=0) if greedy else config,
                           None if greedy else calibration)
        prepare_qat(model, config, "rabit", fits=fits)
        convert(model, config)
    else:
        teacher = copy.deepcopy(model)
        prepare_qat(model, config, args.method, calibration=calibration)
        qat_config = QATConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               grad_accum=args.grad_accum, lr_latent=args.lr_latent, lr_scale=args.lr_scale,
                               optimizer=args.optimizer, gamma=args.gamma, seed=args.seed,
                               eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                               gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                               out_dir=str(args.out))
        trainer = QATTrainer(model, teacher, qat_config, train, heldout)
        checkpoint = Path(args.out) / "checkpoint"
        if args.resume and checkpoint.is_dir():
            trainer.load_checkpoint(checkpoint)
        run.update(history=trainer.train(), steps=trainer.step, tokens=trainer.tokens_seen())
        if args.diagnostics:
            layers = sorted(trainer.layers)[: args.diagnostics]
            run["diagnostics"] = [vars(d) for d in path_diagnostics(model, teacher, calibration[:2], layers=layers)]
        convert(model, config)
    run["heldout_ppl"] = perplexity(model, heldout)
    run["seconds"] = time.perf_counter() - started
    _save(model, tokenizer, config, Path(args.out), run)
    return run


def _save(model: torch.nn.Module, tokenizer: Any, config: RaBiTConfig, out: Path, run: dict[str, Any]) -> None:
    from rabit_compiler.serialization import save

    save(model, out, tokenizer=tokenizer, config=config)
    (out / RUN_FILE).write_text(json.dumps(run, indent=1))


def evaluate_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Held-out perplexity of the reference ``args.model`` and of every saved model in ``args.quantized``,
    on the windows of ``args.text``; one row per model."""
    reference, tokenizer = load_model(args.model)
    heldout = text_windows(tokenizer, args.text, args.seq_len, reference)
    rows = [{"model": args.model, "method": "reference", "steps": 0, "tokens": 0,
             "ppl": perplexity(reference, heldout, args.batch_size)}]
    del reference
    for directory in args.quantized:
        model, _ = load_model(directory)
        run_file = Path(directory) / RUN_FILE
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
        rows.append({"model": directory, "method": run.get("method", "?"), "steps": run.get("steps", "?"),
                     "tokens": run.get("tokens", "?"), "ppl": perplexity(model, heldout, args.batch_size)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`evaluate_models` rows."""
    lines = ["| model | method | steps | tokens | held-out PPL |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['steps']} | {r['tokens']} | {r['ppl']:.2f} |" for r in rows]
    return "\n".join(lines)


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = QATConfig()
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a model directory")
    parser.add_argument("--text", nargs="+", required=True, help="training / calibration text files")
    parser.add_argument("--heldout", nargs="*", default=None, help="held-out text files (default: split --text)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--method", choices=METHODS, default="rabit")
    parser.add_argument("--out", required=True, help="output directory (saved model, checkpoints, run record)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--paths", type=int, default=RaBiTConfig.paths)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--optimizer", choices=("muon", "adamw"), default=defaults.optimizer)
    parser.add_argument("--lr-latent", type=float, default=defaults.lr_latent)
    parser.add_argument("--lr-scale", type=float, default=defaults.lr_scale)
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help="weight of the hidden-state MSE")
    parser.add_argument("--anchor-margin", type=float, default=RaBiTConfig.anchor_margin)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="student forward under torch.compile (Inductor)")
    parser.add_argument("--diagnostics", type=int, default=4, help="print path diagnostics for this many layers")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="the reference model: 'smollm2' or a directory")
    parser.add_argument("--quantized", nargs="*", default=[], help="directories written by rabit quantize")
    parser.add_argument("--text", nargs="+", required=True, help="held-out text files")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)


def print_run(run: dict[str, Any]) -> None:
    print(f"{run['method']}: {run['steps']} steps, {run['tokens']} tokens, held-out PPL {run['heldout_ppl']:.2f}, "
          f"{run['seconds']:.0f} s")
    for d in run.get("diagnostics", []):
        print(f"  {d['layer']}: Corr(y1, y2) = {d['path_correlation']:.3f}, "
              f"Corr(R1 x, y2) = {d['residual_alignment']:.3f}")
