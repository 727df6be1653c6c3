"""Decoding with a static KV cache: the decode step compiled once (``fullgraph=True``, static shapes),
prefill run separately, and timings of what a user sees (time to first token, decode tokens/s).

Hugging Face ``generate`` compiles the model's forward itself when the cache is static
(``cache_implementation="static"``) and a :class:`transformers.CompileConfig` is given: the prefill runs
uncompiled, every decode step calls the one compiled graph. :func:`decode_compile_config` builds that config
for any backend (``"rabit"``, ``"inductor"``); on CUDA its default ``mode="reduce-overhead"`` gives CUDA graphs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CompileConfig
from transformers.generation.streamers import BaseStreamer


def decode_compile_config(
    device: torch.device | str,
    backend: str | Callable[..., Any] = "rabit",
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> CompileConfig:
    """``CompileConfig(fullgraph=True, dynamic=False, backend, mode, options)`` for static-cache decoding.

    ``mode`` defaults to ``"reduce-overhead"`` (CUDA graphs) on CUDA when no ``options`` are given
    (``torch.compile`` takes one or the other), and to none elsewhere. Compilation is enabled on every
    device type (transformers only compiles on accelerators by default)."""
    device = torch.device(device)
    if mode is None and options is None and device.type == "cuda":
        mode = "reduce-overhead"
    if mode is not None and options is not None:
        raise ValueError("torch.compile takes either mode or options, not both")
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=mode, options=options)
    config._compile_all_devices = True
    return config


class TimingStreamer(BaseStreamer):
    """Records when ``generate`` hands over each chunk of tokens (the prompt first, then one per step) and
    passes them on to ``inner`` (e.g. a ``TextStreamer``) when given."""

    def __init__(self, inner: BaseStreamer | None = None):
        self.inner = inner
        self.arrivals: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.arrivals.append(time.perf_counter())
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()

    def timing(self, max_new_tokens: int, started: float, finished: float) -> DecodeTiming:
        """The timings of a generation that began at ``started`` and returned at ``finished``."""
        tokens = self.arrivals[1:]  # the first put is the prompt
        if len(tokens) != max_new_tokens:
            raise RuntimeError(f"generate streamed {len(tokens)} tokens, expected {max_new_tokens}")
        return DecodeTiming(
            new_tokens=max_new_tokens,
            time_to_first_token_s=tokens[0] - started,
            first_decode_step_s=tokens[1] - tokens[0],
            decode_tokens_per_s=(len(tokens) - 2) / (tokens[-1] - tokens[1]),
            total_s=finished - started,
        )


@dataclass
class DecodeTiming:
    """One ``generate`` call, batch 1.

    - ``time_to_first_token_s``: from the call to the first new token (prefill + first sample).
    - ``first_decode_step_s``: from the first to the second new token (the first compiled call: includes
      the compilation when the model was not compiled yet).
    - ``decode_tokens_per_s``: new tokens after the second / the time they took (steady-state decoding).
    """

    new_tokens: int
    time_to_first_token_s: float
    first_decode_step_s: float
    decode_tokens_per_s: float
    total_s: float


def timed_generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    compile_config: CompileConfig | None,
    streamer: BaseStreamer | None = None,
    cache_implementation: str | None = "static",
    **generate_kwargs: Any,
) -> tuple[torch.Tensor, DecodeTiming]:
    """Greedy ``model.generate`` of exactly ``max_new_tokens`` (>= 3) new tokens for ``input_ids [1, T]`` with
    ``cache_implementation`` (``"static"``, or None for the model's default dynamic cache), the decode step
    compiled with ``compile_config`` (None: eager). Returns the output ids ``[1, T + max_new_tokens]`` and
    the timings."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"timed_generate measures batch 1: input_ids must be [1, T], got {tuple(input_ids.shape)}")
    _check_new_tokens(max_new_tokens)
    timer = TimingStreamer(streamer)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  streamer=timer, cache_implementation=cache_implementation, **generate_kwargs)
    if compile_config is None:
        kwargs["disable_compile"] = True
    else:
        kwargs["compile_config"] = compile_config
    eos = model.generation_config.eos_token_id
    if model.generation_config.pad_token_id is None and "pad_token_id" not in kwargs and eos is not None:
        kwargs["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    _synchronize(input_ids.device)
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids, **kwargs)
    _synchronize(input_ids.device)
    finished = time.perf_counter()
    return output, timer.timing(max_new_tokens, started, finished)


def _check_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 3:
        raise ValueError(f"max_new_tokens must be >= 3 to separate first token, first step and decoding, "
                         f"got {max_new_tokens}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_from_saved(
    directory: str,
    prompt: str,
    max_new_tokens: int,
    device: str = "cpu",
    inductor: bool = True,
    mode: str | None = None,
    stream: bool = True,
) -> tuple[str, DecodeTiming]:
    """Load a model saved by :func:`rabit_compiler.save` (with its tokenizer), decode ``prompt`` greedily with a
    static cache and the decode step compiled by ``backend="rabit"`` (``inductor=False``: the packed graph run
    without Inductor; ``mode`` as in :func:`decode_compile_config`), streaming the text to stdout (a
    ``TextStreamer``) when ``stream``. Returns the new text and the timings (the first decode step includes
    the compilation)."""
    from transformers import TextStreamer

    from rabit_compiler.serialization import load, load_tokenizer

    model = load(directory, device=device)
    tokenizer = load_tokenizer(directory)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    config = decode_compile_config(device, "rabit", mode=mode, options=None if inductor else {"inductor": False})
    streamer = TextStreamer(tokenizer, skip_prompt=True) if stream else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output, timing = timed_generate(model, input_ids, max_new_tokens, config, streamer=streamer, pad_token_id=pad)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True), timing


def aot_generate_from_saved(
    directory: str,
    prompt: str,
    max_new_tokens: int,
    options: dict[str, Any] | None = None,
    stream: bool = True,
) -> tuple[str, DecodeTiming, float]:
    """As :func:`generate_from_saved` on the CPU, the decode step built by
    :class:`~rabit_compiler.aot_decode.AOTDecoder` (``options``: the backend's) before the clock starts. Returns the
    new text, the timings (the first decode step is a plain step: nothing compiles then) and the build's seconds."""
    from transformers import TextStreamer

    from rabit_compiler.aot_decode import AOTDecoder
    from rabit_compiler.serialization import load, load_tokenizer

    _check_new_tokens(max_new_tokens)
    model = load(directory)
    tokenizer = load_tokenizer(directory)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    started = time.perf_counter()
    decoder = AOTDecoder(model, max_cache_len=input_ids.shape[1] + max_new_tokens, options=options)
    build_s = time.perf_counter() - started
    timer = TimingStreamer(TextStreamer(tokenizer, skip_prompt=True) if stream else None)
    started = time.perf_counter()
    output = decoder.generate(input_ids, max_new_tokens, streamer=timer)
    timing = timer.timing(max_new_tokens, started, time.perf_counter())
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True), timing, build_s
