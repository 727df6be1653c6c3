"""LoRA on the packed model vs QAT at the same token budget, on SmolLM2-135M: held-out perplexity and trainable
parameters.

Both start from the default PTQ: the fit ``quantize_`` makes (iterative residual SVID + calibration preconditioning
on 16 x 512 tokens of ``lee_background.cor``), shared with ``benchmarks/accuracy.py`` through its fit cache, packed
by ``prepare_qat`` + ``convert`` (the same packed layers as ``quantize_``, without fitting twice). Then, on the same
batches (``window_batch``: seed, 4 x 128 tokens a step) with the same warm-up + cosine schedule and AdamW:

* ``lora``: PEFT LoRA adapters (rank ``--rank``, alpha ``--alpha``, no dropout) on every packed linear, the packed
  signs and scales frozen; trained by distillation from the fp32 teacher (KL of the next-token distributions, the
  QAT loss) or, with ``--lora-loss ce``, by next-token cross-entropy on the text;
* ``qat``: coupled RaBiT QAT (``prepare_qat(method="rabit")`` + ``QATTrainer``), latent lr ``--qat-lr``.

Held-out perplexity on ``lee.cor`` (all 9 windows of 512 tokens, as ``benchmarks/accuracy.py``). CPU budget:

    python benchmarks/lora.py --lora-lr 1e-3 3e-3 --out benchmarks/lora_cpu

writes ``results.json`` into ``--out`` (one row per run, written after each) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from accuracy import cached_fits
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.data import lee_corpus, token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.models import load_smollm2
from rabit_compiler.qat import convert, prepare_qat
from rabit_compiler.qat.train import QATConfig, QATTrainer, distillation_loss, window_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_loss(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor, kind: str) -> torch.Tensor:
    """``kind="kl"``: the QAT distillation loss; ``"ce"``: next-token cross-entropy on ``ids`` (mean, fp32)."""
    student_out = student(ids)
    if kind == "ce":
        return F.cross_entropy(student_out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    with torch.no_grad():
        teacher_out = teacher(ids)
    return distillation_loss(student_out, teacher_out, gamma=0.0)


def train_lora(student: torch.nn.Module, teacher: torch.nn.Module, config: QATConfig, lr: float, kind: str,
               train_windows: torch.Tensor, heldout: torch.Tensor, eval_every: int) -> dict:
    """AdamW on the adapters with ``config``'s batches and schedule; returns the loss and held-out PPL history."""
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                                  fused=True)
    history: dict[str, list] = {"loss": [], "eval": []}
    train_seconds = 0.0
    for step in tqdm(range(config.steps), desc=f"LoRA ({kind}, lr {lr:g})"):
        started = time.perf_counter()
        optimizer.param_groups[0]["lr"] = lr * config.lr_factor(step)
        student.train()
        loss = lora_loss(student, teacher, window_batch(train_windows, config.batch_size, config.seed, step), kind)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - started
        history["loss"].append([step + 1, loss.item()])
        if (step + 1) % eval_every == 0 or step + 1 == config.steps:
            student.eval()
            ppl = perplexity(student, heldout, heldout.shape[0], progress=False)
            history["eval"].append([step + 1, (step + 1) * config.batch_size * config.seq_len, ppl])
            print(f"  step {step + 1}: loss {loss.item():.4g}, held-out PPL {ppl:.2f}", flush=True)
    return {"history": history, "train_seconds": train_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["ptq", "lora", "qat"], choices=["ptq", "lora", "qat"])
    parser.add_argument("--lora-lr", nargs="+", type=float, default=[1e-3])
    parser.add_argument("--lora-loss", default="kl", choices=["kl", "ce"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--qat-lr", type=float, default=3e-3, help="QAT latent lr (the best measured at this budget)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/lora_cpu"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    teacher, tokenizer = load_smollm2()
    teacher.requires_grad_(False)
    train_text, heldout_text = lee_corpus()
    heldout = token_windows(tokenizer, heldout_text, 512)
    calibration = token_windows(tokenizer, train_text, 512, max_windows=16)
    train_windows = token_windows(tokenizer, train_text, args.seq_len)
    config = RaBiTConfig()
    fits = cached_fits(teacher, config, calibration)
    qat_config = QATConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, optimizer="adamw",
                           lr_latent=args.qat_lr, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                           seed=args.seed, eval_batch_size=heldout.shape[0])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    results.update({"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "commit": commit,
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                    "heldout": list(heldout.shape), "tokens_per_step": args.batch_size * args.seq_len})
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [("ptq", None)] if "ptq" in args.methods else []
    runs += [("lora", lr) for lr in args.lora_lr] if "lora" in args.methods else []
    runs += [("qat", args.qat_lr)] if "qat" in args.methods else []
    for method, lr in runs:
        started = time.perf_counter()
        student = copy.deepcopy(teacher)
        prepare_qat(student, config, "rabit", fits=fits)
        row = {"method": method, "lr": lr, "steps": 0, "tokens": 0, "commit": commit}
        if method == "ptq":
            convert(student, config)
            row.update(trainable=0, ppl=perplexity(student.eval(), heldout, heldout.shape[0]))
        elif method == "lora":
            convert(student, config)
            student = get_peft_model(student, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                         target_modules=TARGETS))
            row.update(rank=args.rank, alpha=args.alpha, loss=args.lora_loss, trainable=trainable_parameters(student))
            row.update(train_lora(student, teacher, qat_config, lr, args.lora_loss, train_windows, heldout,
                                  args.eval_every))
        else:
            row.update(trainable=trainable_parameters(student), loss="kl")
            trainer = QATTrainer(student, teacher, qat_config, train_windows, heldout)
            history = trainer.train()
            row.update(history=history)
        if method != "ptq":
            row.update(steps=args.steps, tokens=args.steps * args.batch_size * args.seq_len,
                       ppl=row["history"]["eval"][-1][2])
        row["seconds"] = time.perf_counter() - started
        results["runs"].append(row)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{method} (lr {lr}): PPL {row['ppl']:.2f}, {row['trainable']:,} trainable, {row['seconds']:.0f} s",
              flush=True)
        del student
    print("\n| method | loss | lr | trainable parameters | tokens | held-out PPL | wall |")
    print("|---|---|---|---|---|---|---|")
    for row in results["runs"]:
        print(f"| {row['method']} | {row.get('loss', '—')} | {row['lr'] or '—'} | {row['trainable']:,} | "
              f"{row['tokens']:,} | {row['ppl']:.2f} | {row['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
