"""Accuracy benchmark: every method at the same token budget and seed on SmolLM2-135M, held-out perplexity.

Methods: fp32 (reference), ``rtn`` (2-bit per-channel min/max), ``ptq-greedy`` (greedy residual SVID,
data-free), ``ptq`` (``quantize_``'s default fit with calibration: GPTQ-style error feedback under X^T X,
sequential), and QAT by distillation from that same ``ptq`` init: ``scales`` (signs fixed, only the scales and
biases train: the end-to-end scale tuning of ``rabit demo --tune-steps``), ``frozen`` (path freezing),
``standard`` (k independent latents) and ``rabit`` (coupled residual paths from one latent).

Text: ``lee_background.cor`` for calibration (the first windows) and training, ``lee.cor`` held out (DATA.md).
The initial fit (minutes on a CPU) is cached under the user cache dir, keyed by its settings.

    python benchmarks/accuracy.py --steps 100 --eval-every 25 --lr-latent 3e-3 --out benchmarks/accuracy_cpu

(the CPU budget: 100 steps x 512 tokens per QAT method, ~6 s per step on 2 cores with AdamW; on a quiet
machine one QAT method with its 4 evaluations took 561-689 s, so every method ~35 min; 3e-3 was the best
latent lr measured for both coupled and standard QAT at this budget; ``--optimizer muon-fp32`` for Muon adds
~8-9 s per step per set of latents on this CPU) writes ``results.json`` and ``ppl_vs_steps.png`` (if matplotlib is
installed) into ``--out`` and prints a Markdown table for RESULTS.md. The larger GPU budget:

    python benchmarks/accuracy.py --steps 1000 --batch-size 8 --seq-len 512 --eval-every 100 --optimizer muon \
        --lr-latent 2e-3 --lr-scale 1e-4 --warmup-steps 50 --out benchmarks/accuracy_gpu

(sweep the Muon lr there: on the CPU budget, seed 0, Muon's best of 3e-3 / 5e-3 / 1e-2 was 5e-3 for both
coupled (232.2) and standard QAT (242.8), far behind AdamW at 3e-3 (170.2 / 172.3); ``benchmarks/lr_sweep.py``
plots PPL against the lr over many runs).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from rabit_compiler.cache import cache_dir
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.data import lee_corpus, token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.models import load_smollm2
from rabit_compiler.qat import LinearFits, convert, fit_linears, load_fits, prepare_qat, rtn_, save_fits
from rabit_compiler.qat.diagnostics import path_diagnostics, sign_changes
from rabit_compiler.qat.layers import COUPLED_METHODS, LATENT_INITS
from rabit_compiler.qat.train import OPTIMIZERS, QATConfig, QATTrainer

QAT_METHODS = ("scales", "frozen", "standard", "rabit")
ALL_METHODS = ("fp32", "rtn", "ptq-greedy", "ptq", *QAT_METHODS)
DIAGNOSED = "model.layers.15."  # the diagnostics' layers: one decoder block in the middle of SmolLM2


def cached_fits(model: torch.nn.Module, config: RaBiTConfig, calibration: torch.Tensor | None) -> LinearFits:
    """:func:`fit_linears`, cached on disk by (config, calibration tokens)."""
    key = json.dumps([config.to_json_dict(), None if calibration is None else calibration.tolist()])
    path = cache_dir("fits") / f"smollm2-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        print(f"fits: cached {path}")
        return load_fits(path)
    started = time.perf_counter()
    fits = fit_linears(model, config, calibration)
    save_fits(fits, path)
    print(f"fits: {len(fits.fits)} linears in {time.perf_counter() - started:.0f} s (cached to {path})")
    return fits


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    figure, (axis, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, row in results["methods"].items():
        color = f"C{ALL_METHODS.index(method)}"
        if row.get("history"):
            points = [(e[0], e[2]) for e in row["history"]["eval"] if e[2] is not None]
            label = f"{method} (lr {row['lr_latent']:g})" if "lr_latent" in row else method
            for target in (axis, zoom):
                target.plot(*zip(*points, strict=True), marker="o", label=label, color=color)
        elif method != "fp32":
            axis.axhline(row["ppl"], linestyle="--", linewidth=1, label=f"{method} (no training)", color=color)
    axis.axhline(results["methods"]["fp32"]["ppl"], color="black", linewidth=1, label="fp32")
    axis.set_yscale("log")
    axis.set_title(f"SmolLM2-135M, 2-bit, {results['tokens_per_step']} tokens/step")
    zoom.set_title("QAT methods only (linear scale)")
    for target in (axis, zoom):
        target.set_xlabel("optimizer step")
        target.set_ylabel("held-out perplexity (lee.cor)")
        target.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def latent_learning_rate(text: str) -> tuple[str | None, float]:
    """``"3e-3"`` -> ``(None, 0.003)`` (every QAT method), ``"standard=5e-3"`` -> ``("standard", 0.005)``."""
    method, _, value = text.rpartition("=")
    if method and method not in QAT_METHODS:
        raise argparse.ArgumentTypeError(f"{method!r} is not a QAT method ({', '.join(QAT_METHODS)})")
    try:
        return method or None, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a learning rate") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                        help="default adamw (fused); on a CPU use muon-fp32 for Muon (bf16 is emulated there)")
    parser.add_argument("--lr-latent", nargs="+", type=latent_learning_rate, default=[(None, QATConfig.lr_latent)],
                        metavar="[METHOD=]LR", help="one lr for every QAT method, and/or METHOD=LR for one of them "
                                                    "(e.g. 3e-3 standard=5e-3)")
    parser.add_argument("--lr-scale", type=float, default=QATConfig.lr_scale)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--gamma", type=float, default=0.0)
    parser.add_argument("--anchor-margin", type=float, default=RaBiTConfig.anchor_margin)
    parser.add_argument("--latent-init", default="reanchor", choices=LATENT_INITS,
                        help="rabit / frozen: the latent re-anchored in the init's sign intervals, or the original "
                             "weight with the 'coupled' fit as the init (standard keeps the default init)")
    parser.add_argument("--calibration-windows", type=int, default=16, help="x 512 tokens of lee_background")
    parser.add_argument("--eval-windows", type=int, default=None, help="x 512 tokens of lee.cor (default: all)")
    parser.add_argument("--compile", action="store_true", help="student forward under torch.compile (Inductor)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diagnostics", type=int, default=7, help="path diagnostics of this many layers (0: none)")
    parser.add_argument("--no-init-eval", dest="init_eval", action="store_false",
                        help="skip the step-0 evaluation (it equals the ptq row up to fp16 scale rounding)")
    parser.add_argument("--packed-eval", action="store_true", help="also evaluate each trained model after convert")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="results.json of an earlier run (same settings) whose other methods' rows to include")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/accuracy_cpu"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the teacher and every student run (default: cuda if available)")
    args = parser.parse_args()
    learning_rates = dict(args.lr_latent)
    default_lr = learning_rates.pop(None, QATConfig.lr_latent)

    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2()
    model.to(args.device)
    train_text, heldout_text = lee_corpus()
    heldout = token_windows(tokenizer, heldout_text, 512, max_windows=args.eval_windows)
    calibration = token_windows(tokenizer, train_text, 512, max_windows=args.calibration_windows)
    train_windows = token_windows(tokenizer, train_text, args.seq_len)
    config = RaBiTConfig(anchor_margin=args.anchor_margin)
    qat_config = QATConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           eval_every=args.eval_every, optimizer=args.optimizer, lr_latent=default_lr,
                           lr_scale=args.lr_scale, warmup_steps=args.warmup_steps, gamma=args.gamma,
                           compile=args.compile, seed=args.seed, eval_batch_size=heldout.shape[0])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "commit": commit,
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                          + (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"),
               "tokens_per_step": args.batch_size * args.seq_len, "train_windows": train_windows.shape[0],
               "heldout_tokens": heldout.numel(), "qat_config": asdict(qat_config), "latent_init": args.latent_init,
               "methods": {}}
    print(f"held-out {tuple(heldout.shape)}, train windows {tuple(train_windows.shape)}, "
          f"calibration {tuple(calibration.shape)}")
    fits = None
    init_ppl = None
    if any(m in args.methods for m in ("ptq", *QAT_METHODS)):
        fits = cached_fits(model, config, calibration)
    args.out.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        started = time.perf_counter()
        row: dict = {"steps": 0, "tokens": 0}
        student = copy.deepcopy(model)
        if method == "fp32":
            row["ppl"] = perplexity(student, heldout)
        elif method == "rtn":
            rtn_(student, config)
            row["ppl"] = perplexity(student, heldout)
        elif method in ("ptq-greedy", "ptq"):
            greedy = RaBiTConfig(rounds=0, fit="svid")
            method_fits = cached_fits(model, greedy, None) if method == "ptq-greedy" else fits
            prepare_qat(student, config, "rabit", fits=method_fits)
            convert(student, config)
            row["ppl"] = perplexity(student, heldout)
        else:
            latent_init = args.latent_init if method in COUPLED_METHODS else "reanchor"
            method_fits = cached_fits(model, replace(config, fit="coupled"), calibration) \
                if latent_init == "weight" else fits
            prepare_qat(student, config, method, fits=method_fits, latent_init=latent_init)
            method_config = replace(qat_config, lr_latent=learning_rates.get(method, default_lr))
            trainer = QATTrainer(student, model, method_config, train_windows, heldout)
            if args.init_eval and init_ppl is None:  # every method starts from the same function: eval once
                init_ppl = trainer.evaluate()
            trainer.history["eval"] = [[0, 0, init_ppl]] if args.init_eval else [[0, 0, None]]
            history = trainer.train()
            trained_seconds = time.perf_counter() - started
            if args.diagnostics:
                layers = [n for n in trainer.layers if n.startswith(DIAGNOSED)][: args.diagnostics]
                row["diagnostics"] = [vars(d) for d in path_diagnostics(student, model, calibration[:1], layers=layers)]
                for d in row["diagnostics"]:
                    print(f"  {d['layer']}: Corr(y1, y2) = {d['path_correlation']:.3f}, "
                          f"Corr(R1 x, y2) = {d['residual_alignment']:.3f}")
            row["sign_changes"] = sign_changes(student, method_fits)
            print(f"  signs flipped since the init, per path: {', '.join(f'{c:.4%}' for c in row['sign_changes'])}")
            convert(student, config)
            row.update(steps=trainer.step, tokens=trainer.tokens_seen(), ppl=history["eval"][-1][2],
                       lr_latent=None if method == "scales" else method_config.lr_latent,
                       lr_scale=method_config.lr_scale,
                       history=history, train_seconds=trained_seconds)
            if args.packed_eval:
                row["packed_ppl"] = perplexity(student, heldout)
        row["seconds"] = time.perf_counter() - started
        results["methods"][method] = row
        print(f"{method}: PPL {row['ppl']:.2f} ({row['seconds']:.0f} s)", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        del student
    if args.reuse is not None:  # read at the end: the earlier run may still have been going at the start
        earlier = json.loads(args.reuse.read_text())["methods"]
        reused = {m: row | {"reused_from": str(args.reuse)} for m, row in earlier.items() if m not in args.methods}
        results["methods"] = reused | results["methods"]
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| method | latent lr | steps | tokens | held-out PPL | packed PPL | wall |\n|---|---|---|---|---|---|---|")
    for method, row in results["methods"].items():
        packed = f"{row['packed_ppl']:.2f}" if "packed_ppl" in row else "—"
        lr = f"{row['lr_latent']:g}" if row.get("lr_latent") is not None else "—"
        print(f"| {method} | {lr} | {row['steps']} | {row['tokens']} | {row['ppl']:.2f} | {packed} | "
              f"{row['seconds']:.0f} s |")
    if "fp32" in results["methods"]:
        plot(results, args.out / "ppl_vs_steps.png")


if __name__ == "__main__":
    main()
