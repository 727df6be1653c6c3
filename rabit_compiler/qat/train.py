"""QAT by distillation: the residual-binary student learns to match the full-precision teacher.

Loss per batch of token windows ``ids [B, T]``::

    KL(teacher || student) = mean over the B*T positions of sum_v p_t(v) (log p_t(v) - log p_s(v))
    loss = KL + gamma * sum_l MSE(h_l^student, h_l^teacher)        (l over the decoder layers' outputs)

Optimizer: ``torch.optim.Muon`` for the 2-D latents and AdamW for the scales and biases (``"muon"``; its
orthogonalisation runs in bf16), the same with :class:`~rabit_compiler.qat.muon.Float32Muon` (``"muon-fp32"``:
fp32 orthogonalisation, for CPUs), or AdamW for everything (``"adamw"``); linear warm-up then cosine /
linear / constant decay. Checkpoints are safetensors (trainable tensors, QAT buffers, optimizer state
flattened to named tensors) plus a JSON state (step, config, history, RNG state), never pickle. Batches
are a pure function of (seed, step), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rabit_compiler.evaluate import perplexity
from rabit_compiler.qat.distributed import Parallel
from rabit_compiler.qat.layers import qat_layers
from rabit_compiler.qat.muon import Float32Muon

logger = logging.getLogger("rabit_compiler")

OPTIMIZERS = ("muon", "muon-fp32", "adamw")
SCHEDULES = ("cosine", "linear", "constant")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": None}
MUON_FSDP_ERROR = ("Muon does not orthogonalize FSDP-sharded (DTensor) latents as whole matrices "
                   "(measured: after 2 steps on 2 ranks the weights differ from one process by a third of the "
                   "update); use optimizer='adamw' with FSDP, or the 'ddp' strategy with Muon")


@dataclass
class QATConfig:
    """How to train (see the module docstring for the loss and optimizers).

    ``steps`` optimizer steps, each over ``grad_accum`` micro-batches of ``batch_size`` windows of
    ``seq_len`` tokens; ``lr_latent`` for the latents, ``lr_scale`` for scales and biases; ``warmup_steps``
    of linear warm-up, then ``schedule`` decay to 0; ``gamma`` weights the hidden-state MSE; ``autocast``:
    ``"none"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (bf16 on a GPU that supports it, none on CPU);
    ``compile``: run the student forward under ``torch.compile`` (Inductor); ``eval_every`` /
    ``checkpoint_every``: every so many steps (0: only at the end); checkpoints go to ``out_dir``.
    """

    steps: int = 200
    lr_latent: float = 2e-3
    lr_scale: float = 1e-3
    warmup_steps: int = 10
    schedule: str = "cosine"
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    gamma: float = 0.0
    optimizer: str = "muon"
    weight_decay: float = 0.0
    autocast: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 4
    checkpoint_every: int = 0
    out_dir: str | None = None

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"QATConfig.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"QATConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("lr_latent", "lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"QATConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.gamma < 0 or self.weight_decay < 0:
            raise ValueError(f"gamma and weight_decay must be >= 0, got {self.gamma}, {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"QATConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"QATConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"QATConfig.autocast must be one of {tuple(AUTOCAST)}, got {self.autocast!r}")
        if self.checkpoint_every and self.out_dir is None:
            raise ValueError("QATConfig.checkpoint_every needs out_dir")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rates at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distillation_loss(student_out: Any, teacher_out: Any, gamma: float) -> torch.Tensor:
    """``KL(teacher || student)`` of the next-token distributions (fp32, mean over positions) plus
    ``gamma * sum_l MSE`` of the decoder layers' hidden states (``hidden_states[1:]``, when gamma > 0).

    Scaling: the KL is summed over the vocabulary and averaged over the ``B*T`` positions (the per-token mean
    of distillation codebases), not summed over tokens and divided by the batch (``T`` times larger). AdamW and
    Muon are invariant to a global loss scale, so this choice only sets gamma's meaning: both terms are means
    over positions, so a gamma does not change with the window length or batch size."""
    student_logp = F.log_softmax(student_out.logits.float(), dim=-1).flatten(0, -2)
    teacher_logp = F.log_softmax(teacher_out.logits.float(), dim=-1).flatten(0, -2)
    loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")
    if gamma > 0:
        pairs = zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:], strict=True)
        loss = loss + gamma * sum(F.mse_loss(s.float(), t.float()) for s, t in pairs)
    return loss


def window_batch(windows: torch.Tensor, batch_size: int, seed: int, micro_step: int) -> torch.Tensor:
    """``[batch_size, T]`` rows of ``windows [num, T]`` for micro-batch ``micro_step``: epoch-wise permutations
    seeded by ``(seed, epoch)``, so a batch is a pure function of its arguments (resumable, comparable runs)."""
    per_epoch = max(1, windows.shape[0] // batch_size)
    epoch, index = divmod(micro_step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(windows.shape[0], generator=generator)
    return windows[order[index * batch_size:(index + 1) * batch_size]]


def _context_length(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AUTOCAST[name]


class QATTrainer:
    """Trains a student prepared by :func:`~rabit_compiler.qat.prepare_qat` against a frozen ``teacher``.

    ``train_windows [num, seq_len]`` (token ids) feed the training batches; ``eval_windows`` (optional)
    give the held-out perplexity recorded every ``config.eval_every`` steps and at the end
    (``history["eval"]``: ``[step, tokens_seen, ppl]``; ``history["loss"]``: ``[step, loss]``).
    ``parallel`` (from :func:`~rabit_compiler.qat.distributed.distributed_run`) spreads the run over ranks: the
    student and teacher are wrapped here, each rank trains on its rows of every global batch, and only rank 0
    shows progress and writes checkpoints (see :mod:`rabit_compiler.qat.distributed`).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, config: QATConfig,
                 train_windows: torch.Tensor, eval_windows: torch.Tensor | None = None, progress: bool = True,
                 parallel: Parallel | None = None):
        self.layers = qat_layers(student)
        if not self.layers:
            raise ValueError("the student has no ResidualBinaryTrainLinear layers: call prepare_qat(student) first")
        _check_windows(train_windows, config.seq_len, "train_windows")
        context = _context_length(student)
        if context is not None and config.seq_len > context:
            raise ValueError(f"seq_len {config.seq_len} exceeds the model context of {context} tokens")
        if eval_windows is not None:
            _check_windows(eval_windows, None, "eval_windows")
        self.parallel = parallel or Parallel()
        if config.batch_size % self.parallel.world_size:
            raise ValueError(f"batch_size {config.batch_size} (the global batch) must be a multiple of the "
                             f"{self.parallel.world_size} ranks")
        if config.optimizer.startswith("muon") and self.parallel.strategy == "fsdp":
            raise ValueError(MUON_FSDP_ERROR)
        self.student, self.teacher, self.config = student, teacher, config
        self.train_windows, self.eval_windows, self.progress = train_windows, eval_windows, progress
        distributed = self.parallel.strategy != "none"
        self.device = self.parallel.device if distributed else next(student.parameters()).device
        self.autocast_dtype = _autocast_dtype(config.autocast, self.device)
        self.step = 0
        self.history: dict[str, list] = {"loss": [], "eval": []}
        torch.manual_seed(config.seed)
        teacher.eval().requires_grad_(False)
        if config.gradient_checkpointing:
            if not hasattr(student, "gradient_checkpointing_enable"):
                raise ValueError("gradient_checkpointing needs a transformers model (gradient_checkpointing_enable)")
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.parallel.place_teacher(teacher)
        wrapped = self.parallel.wrap_student(student)
        self.forward = torch.compile(wrapped) if config.compile else wrapped
        self.optimizers = self._make_optimizers()

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.student.named_parameters() if p.requires_grad}

    def _make_optimizers(self) -> list[torch.optim.Optimizer]:
        config = self.config
        latents, others = [], []
        for name, p in self._trainable().items():
            is_latent = name.rsplit(".", 1)[-1] == "latent" or ".latents." in name
            (latents if is_latent and p.dim() == 2 else others).append(p)
        if config.optimizer == "adamw":
            optimizers = [torch.optim.AdamW([{"params": latents, "lr": config.lr_latent,
                                              "weight_decay": config.weight_decay},
                                             {"params": others, "lr": config.lr_scale, "weight_decay": 0.0}],
                                            fused=True)]
        else:
            if config.optimizer == "muon-fp32":
                muon = Float32Muon(latents, lr=config.lr_latent, weight_decay=config.weight_decay)
            else:
                if self.device.type == "cpu":
                    logger.warning("rabit: torch.optim.Muon orthogonalises in bf16, which CPUs without bf16 "
                                   "matrix units emulate slowly (measured on a 2-core EPYC: 4.2-4.4 s per step of "
                                   "one 1536x576 latent, 0.09 s in fp32); use optimizer='muon-fp32' on CPU")
                muon = torch.optim.Muon(latents, lr=config.lr_latent, weight_decay=config.weight_decay,
                                        adjust_lr_fn="match_rms_adamw")
            optimizers = [muon, torch.optim.AdamW(others, lr=config.lr_scale, weight_decay=0.0, fused=True)]
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["base_lr"] = group["lr"]
        return optimizers

    def batch(self, micro_step: int) -> torch.Tensor:
        """Windows for micro-batch ``micro_step`` (:func:`window_batch`), on the training device."""
        return window_batch(self.train_windows, self.config.batch_size, self.config.seed, micro_step).to(self.device)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """The distillation loss of the student on ``ids [B, T]`` (with gradients)."""
        hidden = self.config.gamma > 0
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            with torch.no_grad():
                teacher_out = self.teacher(ids, output_hidden_states=hidden)
            student_out = self.forward(ids, output_hidden_states=hidden)
        return distillation_loss(student_out, teacher_out, self.config.gamma)

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches); returns the mean loss."""
        config = self.config
        factor = config.lr_factor(self.step)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
        self.student.train(config.gradient_checkpointing)
        total = 0.0
        for micro in range(config.grad_accum):
            loss = self.loss(self.parallel.local_rows(self.batch(self.step * config.grad_accum + micro)))
            (loss / config.grad_accum).backward()
            total += loss.item()
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean = self.parallel.mean_over_ranks(total / config.grad_accum)
        self.history["loss"].append([self.step, mean])
        return mean

    def tokens_seen(self) -> int:
        return self.step * self.config.grad_accum * self.config.batch_size * self.config.seq_len

    def evaluate(self) -> float:
        """Held-out perplexity of the student now (recorded in ``history["eval"]``)."""
        if self.eval_windows is None:
            raise ValueError("no eval_windows were given")
        self.student.eval()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            ppl = perplexity(self.student, self.eval_windows, self.config.eval_batch_size, progress=False)
        self.history["eval"].append([self.step, self.tokens_seen(), ppl])
        return ppl

    def train(self) -> dict[str, list]:
        """Train up to ``config.steps``, evaluating and checkpointing on schedule; returns the history."""
        config = self.config
        if self.eval_windows is not None and not self.history["eval"]:
            self.evaluate()
        bar = tqdm(range(self.step, config.steps), desc=f"rabit: QAT ({config.optimizer})",
                   disable=not (self.progress and self.parallel.is_main), initial=self.step, total=config.steps)
        for _ in bar:
            loss = self.train_step()
            postfix = {"loss": f"{loss:.4g}"}
            last = self.step == config.steps
            if self.eval_windows is not None and (last or (config.eval_every and self.step % config.eval_every == 0)):
                postfix["ppl"] = f"{self.evaluate():.4g}"
            bar.set_postfix(postfix)
            if config.out_dir is not None and (last or (config.checkpoint_every
                                                        and self.step % config.checkpoint_every == 0)):
                self.save_checkpoint(Path(config.out_dir) / "checkpoint")
        return self.history

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors``, ``optimizer.safetensors`` and ``state.json`` into ``directory``
        (replaced atomically). Distributed: every rank calls it, full tensors are gathered to rank 0, which
        writes the same files as one process."""
        model_tensors = self.parallel.full_tensors(self.student, list(self._model_tensors()))
        optimizer_states = [self.parallel.full_optimizer_state(self.student, o) for o in self.optimizers]
        if self.parallel.is_main:
            self._write_checkpoint(Path(directory), model_tensors, optimizer_states)
        self.parallel.barrier()

    def _write_checkpoint(self, directory: Path, model_tensors: dict[str, torch.Tensor],
                          optimizer_states: list[dict]) -> None:
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(_contiguous(model_tensors), staging / "model.safetensors")
        optimizer_tensors, optimizer_json = {}, []
        for i, optimizer_state in enumerate(optimizer_states):
            tensors, rest = _flatten_optimizer(optimizer_state, f"{i}.")
            optimizer_tensors.update(tensors)
            optimizer_json.append(rest)
        save_file(_contiguous(optimizer_tensors), staging / "optimizer.safetensors")
        state = {"step": self.step, "config": asdict(self.config), "history": self.history,
                 "optimizers": optimizer_json, "torch_rng_state": _encode(torch.get_rng_state())}
        (staging / "state.json").write_text(json.dumps(state, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore the student's trainable tensors and QAT buffers, the optimizers, step, history and RNG.
        Distributed: every rank calls it; rank 0 reads the tensors and broadcasts them into the shards."""
        directory = Path(directory)
        for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"not a QAT checkpoint: {directory / name} is missing")
        state = json.loads((directory / "state.json").read_text())
        with safe_open(directory / "model.safetensors", framework="pt") as handle:
            stored = set(handle.keys())
        targets = self._model_tensors()
        if stored != set(targets):
            missing, unexpected = sorted(set(targets) - stored), sorted(stored - set(targets))
            raise ValueError(f"checkpoint tensors do not match the student: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        read = self.parallel.is_main
        tensors = load_file(directory / "model.safetensors", device=str(self.device)) if read else {}
        self.parallel.load_full_tensors(self.student, tensors)
        optimizer_tensors = load_file(directory / "optimizer.safetensors", device=str(self.device)) if read else {}
        for i, (optimizer, rest) in enumerate(zip(self.optimizers, state["optimizers"], strict=True)):
            self.parallel.load_optimizer_state(self.student, optimizer,
                                               _unflatten_optimizer(optimizer_tensors, f"{i}.", rest))
        self.step, self.history = state["step"], state["history"]
        torch.set_rng_state(_decode(state["torch_rng_state"]))

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """Trainable parameters and the QAT layers' buffers, by name."""
        tensors = dict(self._trainable())
        for layer_name, layer in self.layers.items():
            for name, buffer in layer.named_buffers():
                tensors[f"{layer_name}.{name}"] = buffer
        return tensors


def _check_windows(windows: torch.Tensor, seq_len: int | None, name: str) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor [num_windows, seq_len]")
    if windows.shape[0] == 0:
        raise ValueError(f"{name} is empty (no token windows)")
    if seq_len is not None and windows.shape[1] != seq_len:
        raise ValueError(f"{name} has windows of {windows.shape[1]} tokens but seq_len is {seq_len}")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous() for name, t in tensors.items()}


def _flatten_optimizer(state_dict: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into named tensors ``{prefix}{param}.{key}`` and a JSON-able rest."""
    tensors, scalars = {}, {}
    for param, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{param}.{key}"] = value
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], prefix: str, rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            param, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(param), {})[key] = value
    for name, value in rest["scalars"].items():
        param, key = name.split(".", 1)
        state.setdefault(int(param), {})[key] = value
    groups = [{k: tuple(v) if k in ("betas", "ns_coefficients") else v for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
