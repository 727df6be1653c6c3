"""Distributed QAT on the CPU (gloo, 2 processes launched by torch.distributed.run) against one process, on a
tiny random Llama whose sizes (vocab 97, ffn 91) do not split evenly over 2 ranks; and the dry-run memory
formula against a hand count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.qat import fit_linears, qat_layers, save_fits
from rabit_compiler.qat.memory import TrainingShape, meta_model, training_memory

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import make_trainer, resident_bytes  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
VOCAB, SEQ, STEPS = 97, 16, 4
OPTIONS = dict(steps=STEPS, seq_len=SEQ, batch_size=4, warmup_steps=1, lr_latent=2e-3, lr_scale=2e-3,
               optimizer="adamw", gamma=0.5)
# Muon's Newton-Schulz runs in bf16, where the rounding of the gradient's last fp32 bits moves whole bf16 steps
# and, through sign flips, the loss (measured: 1.4% at step 4 between batch 4 and 2 x 2 accumulated); so the one
# process accumulates the two half batches as the two DDP ranks do, and must then agree to fp32 rounding.
MUON = dict(optimizer="muon", lr_latent=1e-2, batch_size=2, grad_accum=2)
LOSS_TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # fp32 losses; the ranks sum gradients in another order


def launch(scenario: str, workdir: Path, timeout: float) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(WORKER), scenario, str(workdir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The teacher, fits, windows and options, in memory and written for the workers."""
    workdir = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=91, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    teacher = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, VOCAB, (12, SEQ), generator=torch.Generator().manual_seed(1))
    fits = fit_linears(teacher, RaBiTConfig(), windows[:4], progress=False)
    (workdir / "model.json").write_text(json.dumps(config.to_dict()))
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, workdir / "teacher.safetensors")
    save_fits(fits, workdir / "fits.safetensors")
    save_file({"windows": windows}, workdir / "windows.safetensors")
    (workdir / "trainer.json").write_text(json.dumps(OPTIONS))
    return workdir, teacher, fits, windows


@pytest.fixture(scope="module")
def single(inputs):
    """One-process losses (AdamW and Muon), with a checkpoint after 2 AdamW steps."""
    workdir, teacher, fits, windows = inputs
    run = make_trainer(teacher, fits, windows, OPTIONS)
    losses = [run.train_step() for _ in range(2)]
    run.save_checkpoint(workdir / "single_checkpoint")
    losses += [run.train_step() for _ in range(STEPS - 2)]
    held = resident_bytes(run)
    flips = sum(int((layer.current_paths().signs != fits.fits[name].signs).sum())
                for name, layer in qat_layers(run.student).items())
    muon = make_trainer(teacher, fits, windows, OPTIONS, **MUON)
    return {"adamw": losses, "flips": flips, "bytes": held, "muon": [muon.train_step() for _ in range(STEPS)]}


@pytest.fixture(scope="module")
def distributed(inputs, single):
    workdir = inputs[0]
    result = launch("equivalence", workdir, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((workdir / "results.json").read_text())


def test_two_ranks_give_the_single_process_losses(single, distributed):
    print(f"\nlosses, 1 process (AdamW): {single['adamw']}\n        2 ranks FSDP2:     {distributed['fsdp']}"
          f"\n        2 ranks DDP:       {distributed['ddp']}\n1 process (Muon): {single['muon']}"
          f"\n        2 ranks DDP + Muon: {distributed['ddp_muon']}")
    # not vacuous: the steps change the loss, move latents across sign boundaries, and Muon differs from AdamW
    assert len(set(single["adamw"])) == STEPS and single["flips"] > 0 and single["muon"] != single["adamw"]
    for strategy in ("fsdp", "ddp"):
        torch.testing.assert_close(torch.tensor(distributed[strategy]), torch.tensor(single["adamw"]),
                                   **LOSS_TOLERANCE, msg=strategy)
    torch.testing.assert_close(torch.tensor(distributed["ddp_muon"]), torch.tensor(single["muon"]),
                               **LOSS_TOLERANCE)


def test_muon_is_refused_under_fsdp(distributed):
    assert "Muon" in distributed["muon_fsdp_error"] and "adamw" in distributed["muon_fsdp_error"]


def test_checkpoints_cross_between_distributed_and_single_process(inputs, single, distributed):
    workdir, teacher, fits, windows = inputs
    assert distributed["fsdp_resumed_step"] == 2
    torch.testing.assert_close(distributed["fsdp_resumed_loss"], single["adamw"][2], **LOSS_TOLERANCE)
    resumed = make_trainer(teacher, fits, windows, OPTIONS)
    resumed.load_checkpoint(workdir / "fsdp_checkpoint")
    assert resumed.step == 2
    torch.testing.assert_close(resumed.history["loss"], [[1, single["adamw"][0]], [2, single["adamw"][1]]],
                               **LOSS_TOLERANCE)
    next_loss = resumed.train_step()
    print(f"\nstep 3 after loading: FSDP2 checkpoint in 1 process {next_loss}, 1-process checkpoint in FSDP2 "
          f"{distributed['fsdp_resumed_loss']}, uninterrupted 1 process {single['adamw'][2]}")
    torch.testing.assert_close(next_loss, single["adamw"][2], **LOSS_TOLERANCE)


@pytest.mark.parametrize(("scenario", "report"), [
    ("fail", "rabit: rank 1/2 failed: RuntimeError: injected failure in the loss of step 2"),  # rank 1 raises
    ("stall", "rabit: rank 0/2 failed: RuntimeError:"),  # rank 1 hangs: rank 0's collective times out (5 s)
])
def test_a_failing_rank_is_reported_not_hung(inputs, scenario, report):
    workdir = inputs[0]
    (workdir / "results.json").unlink(missing_ok=True)
    started = time.perf_counter()
    result = launch(scenario, workdir, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert report in result.stderr
    assert scenario == "fail" or "Timed out" in result.stderr.split(report, 1)[1].splitlines()[0]
    assert not (workdir / "results.json").exists()
    print(f"\n{scenario}: reported after {elapsed:.1f} s (exit code {result.returncode})")


def saved_tensor_bytes(compute, model: torch.nn.Module) -> int:
    """Bytes of the distinct storages, other than ``model``'s parameters, that autograd still holds for
    backward after ``compute()``."""
    saved = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        result = compute()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive = [t for ref in saved if (t := ref()) is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
    assert result.requires_grad
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def test_dry_run_formula_matches_hand_count_and_measurements(inputs, single, distributed):
    workdir, teacher, fits, windows = inputs
    model = meta_model(teacher.config)
    shape = TrainingShape(batch_size=4, seq_len=SEQ, optimizer="adamw", strategy="fsdp", teacher="shard")
    one, two, four = (training_memory(model, w, shape) for w in (1, 2, 4))
    # hand count: per layer q [64, 64], k [32, 64], v [32, 64], o [64, 64], gate/up [91, 64], down [64, 91];
    # 2 paths: 2 row scales [N] and 2 column scales [K] each; fp32; 2 layers
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (91, 64), (91, 64), (64, 91)]
    per_layer = sum(n * k + 2 * (n + k) for n, k in shapes)
    assert one["latents + scales"] == 2 * per_layer * 4 == single["bytes"]["latents + scales"]
    # 2 ranks keep ceil(rows / 2) of every tensor (latent [N, K], scales [2, N], [2, K]): rank 0's shards as
    # measured in the FSDP run
    rank0 = sum(-(-n // 2) * k + n + k for n, k in shapes) * 2 * 4
    assert two["latents + scales"] == rank0 == distributed["fsdp_bytes"]["latents + scales"]
    for term in ("gradients", "optimizer state"):
        assert one[term] == single["bytes"][term] and two[term] == distributed["fsdp_bytes"][term], term
    assert one["optimizer state"] == 2 * one["latents + scales"]  # AdamW: two moments
    for term in ("latents + scales", "frozen student", "teacher", "activations", "total"):
        assert one[term] > two[term] > four[term], term
    assert one["derived weights"] == two["derived weights"] == four["derived weights"] > 0  # never sharded
    # the estimated saved tensors (derived weights + activations) against what autograd really keeps
    run = make_trainer(teacher, fits, windows, OPTIONS)
    run.student.train(False)
    measured = saved_tensor_bytes(lambda: run.loss(run.batch(0)), run.student)
    estimated = one["derived weights"] + one["activations"]
    print(f"\nsaved for backward, 1 process: measured {measured} B, formula {estimated} B")
    assert abs(estimated - measured) < 0.1 * measured
