"""Distributed QAT on PyTorch's own engine: the process group, the wrapping, each rank's rows of the batch,
and full (gathered) state dicts for checkpoints.

Launch with ``torchrun --nproc_per_node=W ...``; without torchrun (no ``WORLD_SIZE`` in the environment) the
same code runs in one process with no process group. Strategies:

- ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder layer, then on the root. Each
  rank holds rows ``[r * ceil(N / W), (r + 1) * ceil(N / W))`` (dim 0) of every latent ``[N, K]``, scale and
  frozen weight, and the optimizer state of those rows; a layer's full tensors exist only while it runs.
- ``"ddp"``: ``DistributedDataParallel``: every rank holds everything, gradients are all-reduced.
- ``"none"``: one process.

The teacher is replicated (``teacher="replicate"``) or sharded the same way with no gradients
(``teacher="shard"``).

Data: the global batch ``ids [B, T]`` is a pure function of (seed, step) (``QATTrainer.batch``); rank r trains
on its contiguous rows ``ids[r * B / W : (r + 1) * B / W]``. Each rank's loss is a mean over its ``B / W * T``
positions, so the mean of the rank losses (all-reduced) is the single-process loss of the global batch, and
the rank-averaged gradients (FSDP reduce-scatter and DDP all-reduce both divide by W) are its gradient.

Checkpoints stay the single-process format (safetensors + JSON, no pickle): ``torch.distributed.checkpoint
.state_dict`` gathers full tensors on rank 0 (CPU) to save, and broadcasts them from rank 0 to load.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

STRATEGIES = ("auto", "none", "fsdp", "ddp")
TEACHER_PLACEMENTS = ("replicate", "shard")
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


@dataclass
class DistributedConfig:
    """How to spread QAT over processes.

    ``strategy``: ``"auto"`` (``"fsdp"`` when launched by torchrun with more than one process, else
    ``"none"``), ``"fsdp"``, ``"ddp"`` or ``"none"``; ``teacher``: ``"replicate"`` or ``"shard"`` (FSDP only);
    ``timeout_s``: how long a collective waits for the other ranks before it raises.
    """

    strategy: str = "auto"
    teacher: str = "replicate"
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"DistributedConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.teacher not in TEACHER_PLACEMENTS:
            raise ValueError(f"DistributedConfig.teacher must be one of {TEACHER_PLACEMENTS}, got {self.teacher!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"DistributedConfig.timeout_s must be positive, got {self.timeout_s!r}")


def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Parallel:
    """This process's place in the run: ``strategy`` (resolved, never ``"auto"``), ``rank`` of
    ``world_size``, the ``device`` it trains on and where the ``teacher`` lives."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    teacher: str = "replicate"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, shows progress and writes files."""
        return self.rank == 0

    def wrap_student(self, student: torch.nn.Module) -> torch.nn.Module:
        """Shard (FSDP2, in place) or wrap (DDP) ``student``; returns the module to call for the forward.
        Parameter names are unchanged under FSDP2; under DDP they stay those of ``student``."""
        if self.strategy == "fsdp":
            _shard(student)
            return student
        if self.strategy == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(student.to(self.device), device_ids=device_ids,
                                                             gradient_as_bucket_view=True)
        return student

    def place_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """The frozen teacher, sharded (FSDP2, no gradients) when ``teacher == "shard"``, else as given."""
        if self.teacher == "shard":
            if self.strategy != "fsdp":
                raise ValueError(f"teacher='shard' needs strategy 'fsdp', not {self.strategy!r}")
            _shard(teacher)
        return teacher.to(self.device) if self.strategy != "none" else teacher

    def local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows ``[B / W, T]`` of the global batch ``ids [B, T]``."""
        rows = ids.shape[0]
        if rows % self.world_size:
            raise ValueError(f"the global batch of {rows} windows does not split over {self.world_size} ranks")
        per_rank = rows // self.world_size
        return ids[self.rank * per_rank:(self.rank + 1) * per_rank]

    def mean_over_ranks(self, value: float) -> float:
        """The mean of ``value`` over the ranks (all-reduce; ``value`` itself in one process)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def barrier(self) -> None:
        """Wait for every rank (nothing in one process)."""
        if self.world_size > 1:
            dist.barrier()

    def full_tensors(self, model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """The full (unsharded, CPU) tensors ``names`` (trainable parameters and buffers) of ``model`` on
        rank 0, ``{}`` on the other ranks. Every rank must call it (it gathers)."""
        if self.strategy == "none":
            state = model.state_dict(keep_vars=True)
            return {name: state[name] for name in names}
        state = get_model_state_dict(model, options=GATHER)
        return {name: state[name] for name in names} if self.is_main else {}

    def load_full_tensors(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors (read on rank 0; ignored elsewhere) into ``model``'s shards on every rank."""
        if self.strategy == "none":
            state = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, value in tensors.items():
                    state[name].copy_(value)
            return
        set_model_state_dict(model, tensors if self.is_main else {}, options=SCATTER)

    def full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with full (gathered, CPU) tensors, keyed by parameter index as in one
        process, on rank 0; ``{}`` on the other ranks. Every rank must call it."""
        if self.strategy == "none":
            return optimizer.state_dict()
        by_name = get_optimizer_state_dict(model, optimizer, options=GATHER)
        if not self.is_main:
            return {}
        index = {name: i for i, name in enumerate(_optimizer_parameter_names(model, optimizer))}
        return {"state": {index[name]: value for name, value in by_name["state"].items()},
                "param_groups": [group | {"params": [index[name] for name in group["params"]]}
                                 for group in by_name["param_groups"]]}

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             state_dict: dict[str, Any]) -> None:
        """Load an index-keyed full ``state_dict`` (as :meth:`full_optimizer_state` returns; read on rank 0)
        into ``optimizer``'s shards on every rank."""
        if self.strategy == "none":
            optimizer.load_state_dict(state_dict)
            return
        by_name = {}
        if self.is_main:
            names = _optimizer_parameter_names(model, optimizer)
            by_name = {"state": {names[i]: value for i, value in state_dict["state"].items()},
                       "param_groups": [group | {"params": [names[i] for i in group["params"]]}
                                        for group in state_dict["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=SCATTER)


def _optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its index order (groups in order, params in order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _shard(model: torch.nn.Module) -> None:
    """FSDP2 ``fully_shard`` on each decoder layer (the model's ``_no_split_modules`` classes), then the root."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"FSDP needs the decoder layer classes in {type(model).__name__}._no_split_modules "
                         "(a transformers model); found none")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def resolve_strategy(strategy: str, world_size: int) -> str:
    """``strategy`` with ``"auto"`` resolved; several processes need ``"fsdp"`` or ``"ddp"``."""
    if strategy == "auto":
        return "fsdp" if world_size > 1 else "none"
    if strategy == "none" and world_size > 1:
        raise ValueError(f"{world_size} processes were launched but the strategy is 'none': every rank would "
                         "train the whole model on the same data; use 'fsdp' or 'ddp'")
    return strategy


@contextmanager
def distributed_run(config: DistributedConfig | None = None) -> Iterator[Parallel]:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA, ``config.timeout_s`` per
    collective), yield this process's :class:`Parallel`, and destroy the group at the end. A rank that
    raises writes ``rabit: rank r/W failed: <cause>`` to stderr before the error propagates (torchrun then
    stops the other ranks; a rank left waiting raises after the timeout). With no torchrun and strategy
    ``"none"``/``"auto"`` it yields a one-process :class:`Parallel` and creates no group."""
    config = config or DistributedConfig()
    world_size = launched_world_size()
    strategy = resolve_strategy(config.strategy, world_size)
    if strategy == "none":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        yield Parallel(device=device, teacher=config.teacher)
        return
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise RuntimeError(f"strategy {strategy!r} needs the environment torchrun sets (RANK, WORLD_SIZE, "
                           "MASTER_ADDR, ...): launch with torchrun --nproc_per_node=N")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    parallel = Parallel(strategy, dist.get_rank(), dist.get_world_size(), device, config.teacher)
    try:
        yield parallel
    except BaseException as error:
        print(f"rabit: rank {parallel.rank}/{parallel.world_size} failed: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()
