"""A decode step compiled ahead of time with AOTInductor: the ``backend="rabit"`` graph, called without Dynamo,
AOTAutograd or Inductor's Python wrapper between the token and the logits.

A ``torch.compile``d decode step pays, on every call, Dynamo's guards over each graph input (every parameter, the
KV cache's tensors: hundreds for a small LLM), AOTAutograd's wrapper and Inductor's Python wrapper (one Python call
per kernel). :class:`AOTDecoder` captures the decode step once through Dynamo, runs the backend's passes on it
(pack, fuse siblings, lower for the CPU, fold grouped-query attention, CPU decode attention:
:func:`~rabit_compiler.backend.prepare_graph`),
exports the result with every weight as a constant and only the tokens and the static KV cache as inputs, and
compiles it with AOTInductor into one shared library whose wrapper is C++; it calls the CPU kernels' operators
(``rabit::lut_gemv``, ``rabit::decode_attention`` and, for a weight-only LM head, ``rabit::weight_only_gemv``)
through their C shims, not through a boxed dispatcher call: no Python runs between the token and the logits.

The library reads the model's tensors in place (they are not copied) together with layouts derived from them when
it is built: do not change the model's weights afterwards (build a new decoder). The prompt is prefilled by the
model itself (uncompiled) into the same cache. Models whose static cache is made of plain ``StaticLayer``s (Llama,
Qwen2, SmolLM2, Mistral without a sliding window) are
supported; others raise ``NotImplementedError``, as does a model on a GPU (there CUDA graphs,
``mode="reduce-overhead"``, take the Python out of the step).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rabit_compiler.backend import prepare_graph
from rabit_compiler.kernels import cpu_attention, cpu_lut, weight_only

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger("rabit_compiler")


def _c_shims() -> dict[torch._ops.OpOverload, list[str]]:
    """The C shims of the CPU kernels' operators (:mod:`rabit_compiler.kernels.cpp_build`): the compiled step calls
    them directly instead of through the proxy executor's boxed call."""
    cpu_lut.load_library()
    cpu_attention.load_library()
    shims = {torch.ops.rabit.lut_gemv.default: [cpu_lut.C_SHIM],
             torch.ops.rabit.decode_attention.default: [cpu_attention.C_SHIM]}
    if hasattr(torch.ops.rabit, "weight_only_gemv"):  # loaded by the CPU lowering for a weight-only head
        shims[torch.ops.rabit.weight_only_gemv.default] = [weight_only.GEMV_C_SHIM]
    return shims


_REALIZE_OPCOUNT_THRESHOLD = 4


def compile_step(step: torch.nn.Module, example_args: tuple[torch.Tensor, ...], package_path: str | None = None
                 ) -> tuple[Any, str]:
    """``step`` (its constants as buffers, ``example_args`` its inputs) exported and compiled by AOTInductor with the
    C shims; the loaded runner and the package's path. The constants stay out of the library: it reads ``step``'s
    buffers in place (user-managed), so the weights are not held twice and ``step`` must outlive the runner."""
    with torch.no_grad():
        program = torch.export.export(step, example_args, strict=False)
    path = torch._inductor.aoti_compile_and_package(program, package_path=package_path, inductor_configs={
        "aot_inductor.package_constants_in_so": False, "aot_inductor.custom_ops_to_c_shims": _c_shims(),
        # a pointwise result of more than 4 ops with several users is computed once and stored, not recomputed in
        # every consumer (the residual stream's sums, the rotary frequencies; benchmarks/RESULTS.md)
        "realize_opcount_threshold": _REALIZE_OPCOUNT_THRESHOLD})
    runner = torch._inductor.aoti_load_package(path)
    buffers = dict(step.named_buffers())
    runner.load_constants({name: buffers[name] for name in runner.get_constant_fqns()}, check_full_update=True,
                          user_managed=True)
    return runner, path


class _DecodeStep(torch.nn.Module):
    """The captured graph as a module of (tokens, *cache tensors): every other graph input is a buffer (a constant
    of the compiled library)."""

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[Any], runtime: dict[int, int]):
        super().__init__()
        self.gm = gm
        self.arity = len(inputs)
        self.runtime = runtime  # graph input position -> position in forward's arguments
        self.constants = [i for i in range(len(inputs)) if i not in runtime]
        for i in self.constants:
            self.register_buffer(f"constant_{i}", inputs[i].detach())

    def forward(self, *runtime_inputs: torch.Tensor) -> Any:
        args: list[Any] = [None] * self.arity
        for position, argument in self.runtime.items():
            args[position] = runtime_inputs[argument]
        for i in self.constants:
            args[i] = getattr(self, f"constant_{i}")
        return self.gm(*args)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``cache`` in newer transformers (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class AOTDecoder:
    """Batch-``batch_size`` greedy decoding of ``model`` on a static KV cache of ``max_cache_len`` positions, the
    decode step compiled by AOTInductor after the ``backend="rabit"`` passes (``options``: the backend's, e.g.
    ``{"cpu_tables": "int8"}``). ``model`` is usually packed by :func:`rabit_compiler.quantize_` first; its fp
    linears are packed data-free as the backend does. ``package_path``: where the compiled package (``.pt2``: the
    code, not the weights) goes (default: a temporary file). Building it takes about a minute for a 135 M model on 2
    cores.

    ``prefill(input_ids)`` -> logits of the prompt (``[batch, T, vocab]``), ``step(tokens)`` (``[batch, 1]``) ->
    ``[batch, 1, vocab]``, ``generate(input_ids, max_new_tokens)`` -> the prompt and the greedy tokens.
    """

    def __init__(self, model: PreTrainedModel, max_cache_len: int, batch_size: int = 1,
                 options: dict[str, Any] | None = None, package_path: str | None = None):
        if max_cache_len < 2 or batch_size < 1:
            raise ValueError(f"AOTDecoder needs max_cache_len >= 2 and batch_size >= 1, got {max_cache_len}, "
                             f"{batch_size}")
        # transformers is imported here, not with the package: it probes for a "kernels" package while it loads,
        # which may find this repository's kernels/ folder and import rabit_compiler (see kernels/__init__.py)
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.model = model.eval()
        self.max_cache_len = max_cache_len
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        if self.device.type != "cpu":
            raise NotImplementedError(f"AOTDecoder builds a CPU decode step (the model is on {self.device}); on a "
                                      "GPU use torch.compile(backend='rabit', mode='reduce-overhead') (CUDA graphs)")
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        unsupported = sorted({type(layer).__name__ for layer in self.cache.layers if type(layer) is not StaticLayer})
        if unsupported:
            raise NotImplementedError(f"AOTDecoder: the static cache of {type(model).__name__} has {unsupported} "
                                      "layers (sliding-window or other); only plain StaticLayer caches are supported")
        self._cache_kwarg = cache_keyword(model)
        self.position = 0
        started = time.perf_counter()
        step, logits_index = self._capture(dict(options or {}))
        runtime_tensors = self._runtime_tensors(self._probe_tokens())
        runner, self.package_path = compile_step(step, tuple(runtime_tensors), package_path)
        self._step = step  # user-managed constants: the step's buffers must outlive the runner
        self._cache_list = self._cache_tensors()  # the same tensors for the decoder's life: reset() zeroes them
        # step() calls the library on the flat tensor lists: the runner's own __call__ parses its input and output
        # specs and flattens and unflattens them with pytree on every call (~0.4 ms a SmolLM2 step)
        in_spec, out_spec = (pytree.treespec_loads(spec) for spec in runner.loader.get_call_spec())
        if in_spec.num_leaves != len(runtime_tensors):
            raise RuntimeError(f"AOTDecoder: the compiled step takes {in_spec.num_leaves} inputs, expected "
                               f"{len(runtime_tensors)} (the tokens and the cache tensors)")
        self._run = runner.loader.boxed_run
        self._logits_index = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)[logits_index]
        self.reset()
        logger.info("rabit: decode step compiled ahead of time in %.1f s (%s)", time.perf_counter() - started,
                    self.package_path)

    def _probe_tokens(self) -> torch.Tensor:
        return torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)

    def _cache_tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)]

    def _runtime_tensors(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [tokens, *self._cache_tensors()]

    def _forward(self, input_ids: torch.Tensor, forward: Callable[..., Any] | None = None) -> Any:
        return (forward or self.model)(input_ids=input_ids, use_cache=True, **{self._cache_kwarg: self.cache})

    def _capture(self, options: dict[str, Any]) -> tuple[_DecodeStep, int]:
        """One decode step through Dynamo with the rabit passes; the passed graph, its inputs and outputs."""
        captured: dict[str, Any] = {}

        def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
            prepare_graph(gm, example_inputs, options)
            captured["gm"], captured["inputs"] = gm, list(example_inputs)

            def run(*args: Any) -> Any:
                captured["outputs"] = gm(*args)
                return captured["outputs"]

            return run

        forward = torch.compile(self.model.forward, backend=backend, fullgraph=True, dynamic=False)
        with torch.no_grad():
            self._forward(self._probe_tokens())  # the eager prefill allocates the cache
            tokens = self._probe_tokens()
            logits = self._forward(tokens, forward).logits
        gm, inputs = captured["gm"], captured["inputs"]
        logits_index = next((i for i, out in enumerate(captured["outputs"]) if out is logits), None)
        where = {id(t): n for n, t in enumerate(self._runtime_tensors(tokens))}
        runtime = {i: where[id(t)] for i, t in enumerate(inputs) if id(t) in where}
        if logits_index is None or sorted(runtime.values()) != list(range(len(where))):
            raise RuntimeError("AOTDecoder: the captured decode step's inputs or outputs are not the tokens, the "
                               "static cache and the logits (an unsupported model forward)")
        self.cache.reset()
        return _DecodeStep(gm, inputs, runtime), logits_index

    def reset(self) -> None:
        """Empties the KV cache (in place: the compiled step keeps reading the same tensors)."""
        self.cache.reset()
        self.position = 0

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Empties the cache and runs the prompt through the (uncompiled) model into it; the prompt's logits."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"AOTDecoder: input_ids must be [{self.batch_size}, T], got {tuple(input_ids.shape)}")
        if not 0 < input_ids.shape[1] < self.max_cache_len:
            raise ValueError(f"AOTDecoder: a prompt of {input_ids.shape[1]} tokens does not fit a cache of "
                             f"{self.max_cache_len} with room to decode")
        self.reset()
        with torch.no_grad():
            logits = self._forward(input_ids.to(self.device)).logits
        self.position = input_ids.shape[1]
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends ``tokens`` (``[batch, 1]``, int64) to the cache; their logits ``[batch, 1, vocab]``."""
        if tokens.shape != (self.batch_size, 1) or tokens.dtype != torch.long:
            raise ValueError(f"AOTDecoder.step: tokens must be int64 [{self.batch_size}, 1], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        if self.position >= self.max_cache_len:
            raise ValueError(f"AOTDecoder.step: the cache is full ({self.max_cache_len} positions); reset() or "
                             "build a decoder with a larger max_cache_len")
        outputs = self._run([tokens.to(self.device), *self._cache_list])
        self.position += 1
        return outputs[self._logits_index]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, streamer: BaseStreamer | None = None
                 ) -> torch.Tensor:
        """The prompt followed by ``max_new_tokens`` greedy tokens (``[batch, T + max_new_tokens]``); ``streamer``
        is handed the prompt, then each token as it is chosen, as transformers' ``generate`` does."""
        if input_ids.shape[-1] + max_new_tokens > self.max_cache_len:
            raise ValueError(f"AOTDecoder.generate: {input_ids.shape[-1]} + {max_new_tokens} tokens exceed the "
                             f"cache's {self.max_cache_len} positions")
        tokens = [input_ids.to(self.device)]
        if streamer is not None:
            streamer.put(tokens[0])
        logits = self.prefill(input_ids)
        for n in range(max_new_tokens):
            tokens.append(logits[:, -1:].argmax(-1))
            if streamer is not None:
                streamer.put(tokens[-1])
            if n + 1 < max_new_tokens:
                logits = self.step(tokens[-1])
        if streamer is not None:
            streamer.end()
        return torch.cat(tokens, dim=1)
