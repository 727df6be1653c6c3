"""One rank of the distributed QAT tests (tests/test_distributed.py), launched by
``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py SCENARIO WORKDIR``.

WORKDIR holds what the test wrote: ``model.json`` (LlamaConfig), ``teacher.safetensors``, ``fits.safetensors``,
``windows.safetensors`` and ``trainer.json`` (QATConfig overrides); rank 0 writes ``results.json``.

Scenarios:
- ``equivalence``: FSDP2 (teacher sharded) and DDP (teacher replicated) runs of ``steps`` steps recording the
  losses, an FSDP checkpoint after 2 steps (``WORKDIR/fsdp_checkpoint``), the next loss after loading the
  single-process checkpoint ``WORKDIR/single_checkpoint``, DDP + Muon losses, and the error of Muon + FSDP.
- ``fail``: an FSDP run in which rank 1 raises during step 2; ``stall``: rank 1 sleeps there instead, and the
  collective timeout is 5 s (both injected here, by wrapping the trainer's loss; no production code knows).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.qat import load_fits, prepare_qat
from rabit_compiler.qat.distributed import DistributedConfig, Parallel, distributed_run
from rabit_compiler.qat.memory import measured_training_bytes
from rabit_compiler.qat.train import QATConfig, QATTrainer


def load_inputs(workdir: Path) -> tuple[LlamaForCausalLM, object, torch.Tensor, dict]:
    """The teacher, fits, training windows and trainer options the test wrote."""
    config = LlamaConfig.from_dict(json.loads((workdir / "model.json").read_text()))
    teacher = LlamaForCausalLM(config)
    teacher.load_state_dict(load_file(workdir / "teacher.safetensors"))
    fits = load_fits(workdir / "fits.safetensors")
    windows = load_file(workdir / "windows.safetensors")["windows"]
    options = json.loads((workdir / "trainer.json").read_text())
    return teacher.eval(), fits, windows, options


def make_trainer(teacher: LlamaForCausalLM, fits, windows: torch.Tensor, options: dict,
                 parallel: Parallel | None = None, **overrides) -> QATTrainer:
    """A fresh student and trainer (same construction in the test process and on every rank)."""
    student = copy.deepcopy(teacher)
    prepare_qat(student, RaBiTConfig(), "rabit", fits=fits)
    return QATTrainer(student, copy.deepcopy(teacher), QATConfig(**(options | overrides)), windows,
                      progress=False, parallel=parallel)


def resident_bytes(run: QATTrainer) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes with the gradients of one more batch."""
    run.loss(run.parallel.local_rows(run.batch(0))).backward()
    held = measured_training_bytes(run.student, run.optimizers)
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)
    return held


def equivalence(parallel: Parallel, workdir: Path) -> dict:
    teacher, fits, windows, options = load_inputs(workdir)
    sharded = dataclasses.replace(parallel, strategy="fsdp", teacher="shard")
    ddp = dataclasses.replace(parallel, strategy="ddp", teacher="replicate")
    results: dict = {}
    fsdp_run = make_trainer(teacher, fits, windows, options, sharded)
    results["fsdp"] = [fsdp_run.train_step() for _ in range(2)]
    fsdp_run.save_checkpoint(workdir / "fsdp_checkpoint")
    results["fsdp"] += [fsdp_run.train_step() for _ in range(options["steps"] - 2)]
    results["fsdp_bytes"] = resident_bytes(fsdp_run)
    ddp_run = make_trainer(teacher, fits, windows, options, ddp)
    results["ddp"] = [ddp_run.train_step() for _ in range(options["steps"])]
    muon_run = make_trainer(teacher, fits, windows, options, ddp, optimizer="muon", lr_latent=1e-2)
    results["ddp_muon"] = [muon_run.train_step() for _ in range(options["steps"])]
    resumed = make_trainer(teacher, fits, windows, options, sharded)
    resumed.load_checkpoint(workdir / "single_checkpoint")
    results["fsdp_resumed_step"] = resumed.step
    results["fsdp_resumed_loss"] = resumed.train_step()
    try:
        make_trainer(teacher, fits, windows, options, sharded, optimizer="muon")
    except ValueError as error:
        results["muon_fsdp_error"] = str(error)
    return results


def faulty_run(parallel: Parallel, workdir: Path, fault: Callable[[], None]) -> dict:
    """An FSDP run in which rank 1 calls ``fault()`` in the loss of step 2."""
    teacher, fits, windows, options = load_inputs(workdir)
    run = make_trainer(teacher, fits, windows, options, parallel)
    loss = run.loss

    def faulty_loss(ids: torch.Tensor) -> torch.Tensor:
        if parallel.rank == 1 and run.step == 1:
            fault()
        return loss(ids)

    run.loss = faulty_loss
    return {"losses": [run.train_step() for _ in range(options["steps"])]}


def raise_error() -> None:
    raise RuntimeError("injected failure in the loss of step 2")


SCENARIOS = {"equivalence": equivalence, "fail": functools.partial(faulty_run, fault=raise_error),
             "stall": functools.partial(faulty_run, fault=lambda: time.sleep(600))}


def main() -> None:
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    timeout = 5 if scenario == "stall" else 60
    with distributed_run(DistributedConfig(strategy="fsdp", timeout_s=timeout)) as parallel:
        results = SCENARIOS[scenario](parallel, workdir)
        if parallel.is_main:
            (workdir / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
