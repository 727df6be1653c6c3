"""The ``rabit quantize`` and ``rabit eval`` workflows: load a model and text, run one method, save, compare.

Methods: ``rabit`` / ``standard`` / ``frozen`` (QAT by distillation from the fp model, see
:mod:`rabit_compiler.qat.train`), ``ptq`` (:func:`~rabit_compiler.quantize.quantize_` with the default
``RaBiTConfig`` and the calibration windows; it packs layer by layer, so a model loaded in bf16 is quantized in
little more than its own memory; ``--tune-steps`` then tunes the scales end to end, ``--init`` starts from a saved
``ptq`` model instead of fitting), ``ptq-greedy`` (greedy residual SVID, data-free) and ``rtn``
(2-bit per-channel min/max, dense weights).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.data import token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.qat import METHODS as QAT_METHODS
from rabit_compiler.qat import LinearFits, convert, fit_linears, fits_settings, load_fits, prepare_qat, rtn_, save_fits
from rabit_compiler.qat.diagnostics import path_diagnostics
from rabit_compiler.qat.distributed import STRATEGIES, TEACHER_PLACEMENTS, DistributedConfig, Parallel, distributed_run
from rabit_compiler.qat.memory import DTYPE_BYTES, LLAMA2_7B_SHAPES, TrainingShape, llama2_7b_config, memory_table
from rabit_compiler.qat.train import OPTIMIZERS, QATConfig, QATTrainer
from rabit_compiler.quantize import quantize_

logger = logging.getLogger("rabit_compiler")

METHODS = (*QAT_METHODS, "ptq", "ptq-greedy", "rtn")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --dtype / --teacher-dtype values
RUN_FILE = "rabit_run.json"


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """``"smollm2"`` (see :func:`rabit_compiler.models.load_smollm2`), a directory written by
    :func:`rabit_compiler.serialization.save` (in the dtypes it was saved in), or a Hugging Face checkpoint
    directory; the reference models load in ``dtype``. Returns (model, tokenizer)."""
    if name == "smollm2":
        from rabit_compiler.models import load_smollm2

        return load_smollm2(dtype)
    directory = Path(name)
    if not directory.is_dir():
        raise FileNotFoundError(f"--model must be 'smollm2' or a model directory; {directory} does not exist")
    from rabit_compiler.serialization import is_saved_model, load, load_tokenizer

    if is_saved_model(directory):
        return load(directory), load_tokenizer(directory)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
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


def quantize_model(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run ``args.method`` on ``args.model`` with the text in ``args.text``; save to ``args.out``. Under torchrun
    the QAT methods train on every rank (``args.distributed``); rank 0 saves and returns the run record, the
    other ranks return None."""
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {args.method!r}")
    if not args.text or not args.out:
        raise ValueError("rabit quantize needs --text and --out (only --dry-run does without)")
    if (args.init or args.tune_steps) and args.method != "ptq":
        raise ValueError(f"--init and --tune-steps belong to --method ptq, not {args.method!r}")
    if args.init:
        from rabit_compiler.serialization import is_saved_model

        if not Path(args.init).is_dir():
            raise FileNotFoundError(f"--init {args.init}: no such directory (a model saved by rabit quantize)")
        if not is_saved_model(args.init):
            raise ValueError(f"--init {args.init} is not a model saved by rabit quantize (no RaBiT "
                             "quantization_config in its config.json)")
    if args.tune_steps < 0:
        raise ValueError(f"--tune-steps must be >= 0, got {args.tune_steps}")
    if args.dtype != "fp32" and args.method in QAT_METHODS:
        raise ValueError(f"--dtype {args.dtype} is for the methods that do not train ({METHODS[len(QAT_METHODS):]}); "
                         "QAT keeps fp32 latent weights")
    distributed = DistributedConfig(args.distributed, args.teacher_placement, args.dist_timeout)
    with distributed_run(distributed) as parallel:
        if parallel.strategy != "none" and args.method not in QAT_METHODS:
            raise ValueError(f"--method {args.method} runs in one process; only QAT ({QAT_METHODS}) is distributed")
        return _quantize(args, parallel)


def _quantize(args: argparse.Namespace, parallel: Parallel) -> dict[str, Any] | None:
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = load_model(args.init or args.model, DTYPES[args.dtype])  # --init: the saved model, as saved
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
    elif args.method == "ptq":
        if args.init:
            config = getattr(model, "rabit_config", None) or config
            run["init"] = args.init
        else:
            fit_started = time.perf_counter()
            quantize_(model, config, calibration=calibration)
            run["quantize_seconds"] = time.perf_counter() - fit_started
        if args.tune_steps:
            _tune(model, args, train, run)
    elif args.method == "ptq-greedy":
        fits = fit_linears(model, RaBiTConfig(paths=args.paths, rounds=0, fit="svid"))
        prepare_qat(model, config, "rabit", fits=fits)
        convert(model, config)
    else:
        teacher = copy.deepcopy(model).to(DTYPES[args.teacher_dtype])
        fits = _shared_fits(model, config, calibration, parallel, Path(args.out), args.resume)
        prepare_qat(model, config, args.method, fits=fits)
        qat_config = QATConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               grad_accum=args.grad_accum, lr_latent=args.lr_latent, lr_scale=args.lr_scale,
                               optimizer=args.optimizer, gamma=args.gamma, seed=args.seed,
                               eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                               gradient_checkpointing=args.gradient_checkpointing, compile=args.compile,
                               out_dir=str(args.out))
        trainer = QATTrainer(model, teacher, qat_config, train, heldout, parallel=parallel)
        checkpoint = Path(args.out) / "checkpoint"
        if args.resume and checkpoint.is_dir():
            trainer.load_checkpoint(checkpoint)
        run.update(history=trainer.train(), steps=trainer.step, tokens=trainer.tokens_seen())
        if parallel.strategy != "none":
            if not parallel.is_main:
                return None
            model, teacher = _gathered_models(args, config, fits, checkpoint)
        if args.diagnostics:
            layers = sorted(trainer.layers)[: args.diagnostics]
            run["diagnostics"] = [vars(d) for d in path_diagnostics(model, teacher, calibration[:2], layers=layers)]
        convert(model, config)
    run["heldout_ppl"] = perplexity(model, heldout)
    run["seconds"] = time.perf_counter() - started
    run["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    _save(model, tokenizer, config, Path(args.out), run)
    return run


def _tune(model: torch.nn.Module, args: argparse.Namespace, train: torch.Tensor, run: dict[str, Any]) -> None:
    """End-to-end scale tuning (:func:`~rabit_compiler.qat.tune.tune_scales_`) of the packed ``model`` against the
    reference ``args.model`` (loaded now, in ``--teacher-dtype``, so the fit never holds two models)."""
    from rabit_compiler.qat.tune import tune_config, tune_scales_

    teacher, _ = load_model(args.model, DTYPES[args.teacher_dtype])
    config = tune_config(args.tune_steps, args.batch_size, args.seq_len, args.tune_lr, gamma=args.gamma,
                         seed=args.seed, gradient_checkpointing=args.gradient_checkpointing)
    started = time.perf_counter()
    history = tune_scales_(model, teacher, train, config)
    run.update(steps=args.tune_steps, tokens=args.tune_steps * args.batch_size * args.seq_len,
               tune_seconds=time.perf_counter() - started, tune_loss=history["loss"])


def _shared_fits(model: torch.nn.Module, config: RaBiTConfig, calibration: torch.Tensor, parallel: Parallel,
                 out: Path, reuse: bool) -> LinearFits:
    """The initial fits, written to ``out/fits.safetensors`` by rank 0 (the one process when not distributed)
    and read back by every rank, so all start from the same bits. With ``reuse`` (``--resume``), a file there
    from the same config and calibration tokens is read instead of fitting again (the fit is the slow part of
    a CPU run)."""
    path = out / "fits.safetensors"
    settings = {"config": config.to_json_dict(),
                "calibration_sha256": hashlib.sha256(calibration.cpu().numpy().tobytes()).hexdigest()}
    if reuse and path.is_file() and fits_settings(path) == settings:
        logger.info("rabit: reusing the initial fits in %s", path)
        return load_fits(path)
    if parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_fits(fit_linears(model, config, calibration), path, settings)
    parallel.barrier()
    return load_fits(path)


def _gathered_models(args: argparse.Namespace, config: RaBiTConfig, fits: LinearFits,
                     checkpoint: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Rank 0, after distributed QAT: a fresh (unsharded) student with the trained tensors of the final
    ``checkpoint``, and a fresh teacher, for the diagnostics, conversion and evaluation."""
    from safetensors.torch import load_file

    teacher, _ = load_model(args.model)
    student = copy.deepcopy(teacher)
    prepare_qat(student, config, args.method, fits=fits, progress=False)
    unexpected = student.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the checkpoint {checkpoint} holds tensors the student lacks: {unexpected[:5]}")
    return student, teacher


def print_memory_plan(args: argparse.Namespace) -> None:
    """``--dry-run``: the per-GPU memory table of :mod:`rabit_compiler.qat.memory` for 1, 2, 4 and 8 GPUs, from the
    model's config alone (``llama2-7b-shapes``, a model directory's config.json, or SmolLM2's)."""
    if args.model == LLAMA2_7B_SHAPES:
        config = llama2_7b_config()
    elif args.model == "smollm2":
        config = load_model(args.model)[0].config
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    strategy = "fsdp" if args.distributed in ("auto", "none") else args.distributed
    compute = args.compute_dtype
    shape = TrainingShape(batch_size=args.batch_size, seq_len=args.seq_len, optimizer=args.optimizer,
                          strategy=strategy, teacher=args.teacher_placement,
                          gradient_checkpointing=args.gradient_checkpointing, teacher_dtype=args.teacher_dtype,
                          compute_dtype=compute, gamma=args.gamma)
    print(f"per-GPU memory estimate ({strategy}, teacher {args.teacher_placement} in {args.teacher_dtype}, "
          f"{args.optimizer}, global batch {args.batch_size} x {args.seq_len} tokens, compute {compute}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; formula: "
          "rabit_compiler/memory.py)")
    print(memory_table(config, shape, rabit_config=RaBiTConfig(paths=args.paths)))


def _save(model: torch.nn.Module, tokenizer: Any, config: RaBiTConfig, out: Path, run: dict[str, Any]) -> None:
    from rabit_compiler.serialization import save

    save(model, out, tokenizer=tokenizer, config=config)
    (out / RUN_FILE).write_text(json.dumps(run, indent=1))


def evaluate_models(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Held-out perplexity of the reference ``args.model`` and of every saved model in ``args.quantized``,
    on the windows of ``args.text``; one row per model."""
    reference, tokenizer = load_model(args.model, DTYPES[args.dtype])
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
    parser.add_argument("--model", default="smollm2",
                        help=f"'smollm2', a model directory, or (with --dry-run) '{LLAMA2_7B_SHAPES}'")
    parser.add_argument("--text", nargs="+", help="training / calibration text files (not needed by --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the per-GPU memory estimate for 1/2/4/8 GPUs from the model config; no training")
    parser.add_argument("--distributed", choices=STRATEGIES, default="auto",
                        help="auto: fsdp under torchrun with several processes, else one process")
    parser.add_argument("--teacher-placement", choices=TEACHER_PLACEMENTS, default="replicate",
                        help="the frozen teacher on every GPU, or sharded with FSDP")
    parser.add_argument("--teacher-dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="dtype the model is loaded in (bf16: ptq / rtn / ptq-greedy of a large model in half "
                             "the memory)")
    parser.add_argument("--compute-dtype", choices=tuple(DTYPE_BYTES), default="fp32",
                        help="activation dtype assumed by --dry-run (training uses autocast bf16 on a bf16 GPU)")
    parser.add_argument("--dist-timeout", type=float, default=DistributedConfig.timeout_s,
                        help="seconds a collective waits for the other ranks before failing")
    parser.add_argument("--heldout", nargs="*", default=None, help="held-out text files (default: split --text)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--method", choices=METHODS, default="rabit")
    parser.add_argument("--out", help="output directory (saved model, checkpoints, run record)")
    parser.add_argument("--init", help="ptq: start from this model saved by rabit quantize (skip the fit)")
    parser.add_argument("--tune-steps", type=int, default=0,
                        help="ptq: then tune the scales end to end (signs fixed) for this many distillation steps of "
                             "--batch-size x --seq-len tokens of --text")
    parser.add_argument("--tune-lr", type=float, default=1e-3, help="learning rate of the scale tuning (AdamW)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--paths", type=int, default=RaBiTConfig.paths)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
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
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the reference model")
    parser.add_argument("--text", nargs="+", required=True, help="held-out text files")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)


def print_run(run: dict[str, Any]) -> None:
    fit = f" (quantize_ {run['quantize_seconds']:.0f} s)" if "quantize_seconds" in run else ""
    print(f"{run['method']}: {run['steps']} steps, {run['tokens']} tokens, held-out PPL {run['heldout_ppl']:.2f}, "
          f"{run['seconds']:.0f} s{fit}, peak RSS {run['peak_rss_gb']:.1f} GB")
    for d in run.get("diagnostics", []):
        print(f"  {d['layer']}: Corr(y1, y2) = {d['path_correlation']:.3f}, "
              f"Corr(R1 x, y2) = {d['residual_alignment']:.3f}")
