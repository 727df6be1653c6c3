"""Memory per rank of distributed QAT on a small random Llama, measured, next to the dry-run formula.

    python benchmarks/distributed_memory.py                                               # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/distributed_memory.py   # FSDP2

Each rank trains a few AdamW steps, runs one more forward/backward, and reports the bytes it holds for the
trainable parameters, their gradients and the optimizer state (local shards), its peak resident set
(``ru_maxrss``, the whole process: Python, torch, the teacher, activations), and the formula's figures for
the same terms (:func:`rabit_compiler.qat.memory.training_memory`). Rank 0 prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import resource

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.qat import fit_linears, prepare_qat
from rabit_compiler.qat.distributed import DistributedConfig, distributed_run
from rabit_compiler.qat.memory import TrainingShape, measured_training_bytes, meta_model, training_memory
from rabit_compiler.qat.train import QATConfig, QATTrainer

TERMS = ("latents + scales", "gradients", "optimizer state")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=args.seq_len)
    teacher = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, args.vocab, (4 * args.batch_size, args.seq_len),
                            generator=torch.Generator().manual_seed(1))
    fits = fit_linears(teacher, RaBiTConfig(), None, example_input=windows[:1], progress=False)
    teacher_placement = "shard" if dist.is_torchelastic_launched() else "replicate"
    with distributed_run(DistributedConfig(teacher=teacher_placement)) as parallel:
        student = copy.deepcopy(teacher)
        prepare_qat(student, RaBiTConfig(), "rabit", fits=fits, progress=False)
        qat = QATConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, optimizer="adamw")
        run = QATTrainer(student, teacher, qat, windows, progress=False, parallel=parallel)
        for _ in range(args.steps):
            run.train_step()
        run.loss(parallel.local_rows(run.batch(0))).backward()
        held = measured_training_bytes(run.student, run.optimizers)
        held["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        shape = TrainingShape(batch_size=args.batch_size, seq_len=args.seq_len, strategy=parallel.strategy,
                              teacher=parallel.teacher)
        formula = training_memory(meta_model(config), parallel.world_size, shape)
        rows = [held]
        if parallel.world_size > 1:
            rows = [None] * parallel.world_size
            dist.all_gather_object(rows, held)
        if parallel.is_main:
            print(f"{parallel.world_size} rank(s), strategy {parallel.strategy}, teacher {parallel.teacher}; "
                  f"Llama hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, vocab {args.vocab}; "
                  f"global batch {args.batch_size} x {args.seq_len}")
            print("| rank | " + " | ".join(f"{t} (measured / formula, MB)" for t in TERMS) + " | ru_maxrss (MB) |")
            print("|---|" + "---:|" * (len(TERMS) + 1))
            for rank, row in enumerate(rows):
                cells = [f"{row[t] / 1e6:.3f} / {formula[t] / 1e6:.3f}" for t in TERMS]
                print(f"| {rank} | " + " | ".join(cells) + f" | {row['ru_maxrss'] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
