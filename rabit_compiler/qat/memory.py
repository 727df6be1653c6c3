"""Per-GPU memory of RaBiT QAT, from the model's shapes alone (a meta-device model, no weights): what
``rabit quantize --dry-run`` prints.

Per rank, in bytes, for world size W, the global batch B split into ``b = B / W`` windows of T tokens, compute
(activation) dtype of ``a`` bytes, and a swapped linear ``[N, K]`` with k paths (see :mod:`rabit_compiler.qat`)::

    shard(t)          = ceil(rows(t) / W) * numel(t) / rows(t) * bytes   (FSDP2 keeps dim-0 chunks; DDP: numel * bytes)
    latents + scales  = sum shard(latent [N, K]) + shard(scales [k, N], [k, K]) + shard(bias [N])   fp32
    frozen student    = sum shard(other weights: embeddings, norms, lm_head)               in the student's dtype
    gradients         = latents + scales                                                   fp32, sharded the same
    optimizer state   = AdamW: 2 * (latents + scales); Muon: 1 * latents + 2 * (scales + biases)
    teacher           = sum shard-or-full(every weight) in the teacher's dtype             (shard: FSDP only)
    FSDP working set  = 2 * largest decoder layer (all-gathered, + the next prefetched) + root weights
                        (embeddings, final norm, lm_head stay gathered from forward to backward) + largest
                        layer's fp32 gradients before reduce-scatter; the teacher's likewise when sharded
    derived weights   = sum over the linears alive at once of N K (8 k + a)                 never sharded
                        (autograd keeps, per path, the sign plane B_i and g_i * B_i in fp32: 2 k N K * 4 bytes,
                        and the linear keeps W_hat in the compute dtype: N K * a); all linears without gradient
                        checkpointing, one decoder layer's with it
    activations       = no checkpointing: L * b T (6 h + 2 h_kv + 4 f + heads + 2) * a
                        checkpointing:    L * b T h * a + b T (6 h + 2 h_kv + 4 f + heads + 2) * a
                        + logits: b T V * 12 (student and teacher log-probabilities and the KL term, fp32)
                        + gamma > 0: the teacher's hidden states, L * b T h * a

(h hidden, f ffn, h_kv = kv heads * head dim, L layers, V vocabulary.) The per-token count of saved values of
a Llama decoder layer (6 h + 2 h_kv + 4 f + heads + 2: the two RMSNorms' inputs and outputs, q, k, v, the
attention output and log-sum-exp (SDPA, no T^2 term), gate, up, silu(gate), their product) and the 8 k + a
bytes per derived weight element were counted from the tensors autograd saves (tests/test_distributed.py
checks both on a tiny Llama). The parameter, gradient and optimizer terms are exact; the activation terms
are estimates (allocator slack, temporaries and the CUDA context are not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from rabit_compiler.config import RaBiTConfig

LLAMA2_7B_SHAPES = "llama2-7b-shapes"
GIB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def llama2_7b_config() -> LlamaConfig:
    """Llama-2-7B's shapes (hidden 4096, 32 layers, 32 heads, ffn 11008, vocab 32000, context 4096)."""
    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)


@dataclass
class TrainingShape:
    """What the estimate depends on besides the model: ``strategy`` (``"fsdp"``, ``"ddp"`` or ``"none"``),
    ``teacher`` placement (``"shard"`` / ``"replicate"``), dtypes as ``"fp32"`` / ``"bf16"`` / ``"fp16"``."""

    batch_size: int
    seq_len: int
    optimizer: str = "adamw"
    strategy: str = "fsdp"
    teacher: str = "replicate"
    gradient_checkpointing: bool = False
    student_dtype: str = "fp32"
    teacher_dtype: str = "fp32"
    compute_dtype: str = "fp32"
    gamma: float = 0.0


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The causal LM of ``config`` on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _shard_bytes(shape: torch.Size, element_bytes: int, world_size: int, sharded: bool) -> int:
    rows = shape[0] if len(shape) else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    kept_rows = math.ceil(rows / world_size) if sharded else rows
    return kept_rows * per_row * element_bytes


@dataclass
class _Linear:
    name: str
    out_features: int
    in_features: int
    paths: int
    bias: bool

    def trainable_shapes(self) -> list[tuple[torch.Size, bool]]:
        """``(shape, is_latent)`` of the latent ``[N, K]``, the row and column scales ``[k, N]``, ``[k, K]``, and
        the bias ``[N]``."""
        shapes = [(torch.Size([self.out_features, self.in_features]), True),
                  (torch.Size([self.paths, self.out_features]), False),
                  (torch.Size([self.paths, self.in_features]), False)]
        return shapes + ([(torch.Size([self.out_features]), False)] if self.bias else [])


def _swapped_linears(model: torch.nn.Module, config: RaBiTConfig) -> list[_Linear]:
    return [_Linear(name, m.out_features, m.in_features, config.paths_for(name), m.bias is not None)
            for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not config.skips(name)]


def _decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [(name, m) for name, m in model.named_modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"no decoder layers found in {type(model).__name__} (its _no_split_modules)")
    return layers


def training_memory(model: torch.nn.Module, world_size: int, shape: TrainingShape,
                    rabit_config: RaBiTConfig | None = None) -> dict[str, int]:
    """Bytes per rank of each term of the module docstring (and ``"total"``) for QAT of ``model`` (a meta
    model from :func:`meta_model` is enough) on ``world_size`` ranks."""
    rabit_config = rabit_config or RaBiTConfig()
    if shape.batch_size % world_size:
        raise ValueError(f"batch_size {shape.batch_size} does not split over {world_size} ranks")
    fsdp = shape.strategy == "fsdp" and world_size > 1
    student_bytes, teacher_bytes = DTYPE_BYTES[shape.student_dtype], DTYPE_BYTES[shape.teacher_dtype]
    a = DTYPE_BYTES[shape.compute_dtype]
    linears = _swapped_linears(model, rabit_config)
    swapped = {f"{linear.name}.weight" for linear in linears} | {f"{linear.name}.bias" for linear in linears}
    terms = dict.fromkeys(("latents + scales", "frozen student", "gradients", "optimizer state", "teacher",
                           "FSDP working set", "derived weights", "activations"), 0)
    latent_bytes = 0
    for linear in linears:
        for tensor_shape, is_latent in linear.trainable_shapes():
            local = _shard_bytes(tensor_shape, 4, world_size, fsdp)
            terms["latents + scales"] += local
            latent_bytes += local if is_latent else 0
    frozen = [(name, p.shape) for name, p in model.named_parameters() if name not in swapped]
    terms["frozen student"] = sum(_shard_bytes(s, student_bytes, world_size, fsdp) for _, s in frozen)
    terms["gradients"] = terms["latents + scales"]
    other_bytes = terms["latents + scales"] - latent_bytes
    terms["optimizer state"] = (latent_bytes + 2 * other_bytes if shape.optimizer.startswith("muon")
                                else 2 * terms["latents + scales"])
    teacher_sharded = fsdp and shape.teacher == "shard"
    terms["teacher"] = sum(_shard_bytes(p.shape, teacher_bytes, world_size, teacher_sharded)
                           for p in model.parameters())
    layers = _decoder_layers(model)
    layer_linears = [[linear for linear in linears if linear.name.startswith(name + ".")] for name, _ in layers]
    if fsdp:
        trainable_full = [sum(4 * s.numel() for linear in group for s, _ in linear.trainable_shapes())
                          for group in layer_linears]
        frozen_full = [sum(student_bytes * p.numel() for n, p in layer.named_parameters(prefix=name)
                           if n not in swapped) for name, layer in layers]
        in_layers = {id(p) for _, layer in layers for p in layer.parameters()}
        root = [p for p in model.parameters() if id(p) not in in_layers]
        largest = max(t + f for t, f in zip(trainable_full, frozen_full, strict=True))
        terms["FSDP working set"] = (2 * largest + sum(student_bytes * p.numel() for p in root)
                                     + max(trainable_full))
        if teacher_sharded:
            teacher_layer = max(sum(teacher_bytes * p.numel() for p in layer.parameters()) for _, layer in layers)
            terms["FSDP working set"] += 2 * teacher_layer + sum(teacher_bytes * p.numel() for p in root)
    derived = [sum(linear.out_features * linear.in_features * (8 * linear.paths + a) for linear in group)
               for group in layer_linears]
    terms["derived weights"] = max(derived) if shape.gradient_checkpointing else sum(derived)
    terms["activations"] = activation_bytes(model.config, shape.batch_size // world_size, shape)
    terms["total"] = sum(terms.values())
    return terms


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def measured_training_bytes(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """What this rank holds now, in bytes, for the exact terms of :func:`training_memory`: ``"latents +
    scales"`` (trainable parameters), ``"gradients"`` (their ``.grad``), ``"optimizer state"`` (state tensors
    with a dimension; per-parameter step counters are left out, as the formula leaves them out); FSDP shards
    (DTensors) count their local part."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = [t for optimizer in optimizers for entries in optimizer.state.values() for t in entries.values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"latents + scales": sum(_local(p).nbytes for p in trainable),
            "gradients": sum(_local(p.grad).nbytes for p in trainable if p.grad is not None),
            "optimizer state": sum(_local(t).nbytes for t in state)}


def activation_bytes(config: PretrainedConfig, local_batch: int, shape: TrainingShape) -> int:
    """The activation term of the module docstring for ``local_batch`` windows of ``shape.seq_len`` tokens."""
    a = DTYPE_BYTES[shape.compute_dtype]
    tokens = local_batch * shape.seq_len
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv_width = getattr(config, "num_key_value_heads", heads) * head_dim
    per_layer = tokens * (6 * h + 2 * kv_width + 4 * config.intermediate_size + heads + 2) * a
    stored = layers * tokens * h * a + per_layer if shape.gradient_checkpointing else layers * per_layer
    teacher_hidden = layers * tokens * h * a if shape.gamma > 0 else 0
    return stored + tokens * config.vocab_size * 12 + teacher_hidden


def memory_table(config: PretrainedConfig, shape: TrainingShape, world_sizes: tuple[int, ...] = (1, 2, 4, 8),
                 rabit_config: RaBiTConfig | None = None) -> str:
    """A Markdown table: one row per term (GiB per rank), one column per world size that divides the global
    batch (a line names the others); world size 1 is one process (no FSDP working set)."""
    model = meta_model(config)
    columns = {w: training_memory(model, w, shape, rabit_config) for w in world_sizes
               if shape.batch_size % w == 0}
    if not columns:
        raise ValueError(f"batch_size {shape.batch_size} splits over none of the world sizes {world_sizes}")
    header = "| per GPU (GiB) | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for term in next(iter(columns.values())):
        lines.append(f"| {term} | " + " | ".join(f"{c[term] / GIB:.2f}" for c in columns.values()) + " |")
    left_out = [w for w in world_sizes if w not in columns]
    if left_out:
        lines.append(f"(left out: {left_out} GPUs, over which the global batch of {shape.batch_size} does not split)")
    return "\n".join(lines)
