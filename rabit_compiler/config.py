"""``RaBiTConfig``: what to binarize and how to initialise it."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

DEFAULT_SKIP = ("lm_head", "*.lm_head", "*embed*", "*wte", "*wpe")
STATISTICS = ("rms", "mean_abs")
HEAD_SCHEMES: dict[str, tuple[int, int | None] | None] = {"fp": None, "int8": (8, None), "int4": (4, 32)}
"""``RaBiTConfig.head`` -> ``(bits, group_size)`` of the weight-only LM head (None: full precision)."""
FITS = ("svid", "als", "coupled", "gptq")
OBJECTIVES = ("diag", "hessian")


@dataclass
class RaBiTConfig:
    """Configuration of the residual-binary quantization.

    - ``paths``: k binary paths per weight (k = 2 is 2 bits per weight); an int >= 1.
    - ``layer_paths``: per-layer k by glob pattern over dotted layer names, e.g. ``{"*.down_proj": 3}``;
      the first matching pattern (in insertion order) wins, other layers get ``paths``.
    - ``skip``: glob patterns over dotted layer names (``model.layers.0.mlp.up_proj``) left in full
      precision; by default the embeddings and the LM head.
    - ``rounds``: Gauss-Seidel rounds of iterative residual SVID after the greedy pass (0: greedy only).
    - ``alpha_in`` / ``alpha_out``: exponents of the input-activation and output-gradient channel
      importance used to precondition the fit (only with calibration data).
    - ``statistic``: ``"rms"`` or ``"mean_abs"``, how channel magnitudes are summarised.
    - ``scale_dtype``: dtype of the stored row/column scales (fp16: 2.016 bits/weight at k=2, 4096^2).
    - ``anchor_margin``: where in its feasible interval the re-anchored latent sits, in (0, 1).
    - ``head``: the LM head (never binarized) in weight-only ``"int8"`` (a scale per row), ``"int4"`` (a scale
      per 32 columns; with calibration, rounded by GPTQ under its inputs), ``"auto"`` (the default: int4 with
      calibration, int8 without, where int4's rounding to nearest costs perplexity) or ``"fp"`` (as it was); a
      head tied to the embedding is untied, the embedding stays exact.
    - ``fit``: how the paths are fitted (:mod:`rabit_compiler.fit`): ``"svid"`` (iterative residual SVID of
      the preconditioned weight), ``"als"`` (from that, alternating least-squares scales and nearest signs),
      ``"coupled"`` (from greedy SVID, scales only, signs by the coupled rule: a latent equal to the weight
      reproduces it), ``"gptq"`` (the default: error feedback through ``H^-1`` in column blocks, then scale
      refits; without ``H``, as ``"als"``). The defaults (``gptq``, ``hessian``, 1 round, sequential) were
      chosen by held-out perplexity on SmolLM2 (``benchmarks/RESULTS.md``, "PTQ fits (issue 14)").
    - ``objective``: the error the fit lowers with calibration data: ``"diag"`` (the preconditioned weight
      error: row weights ``s_out^(2 alpha_out)``, column weights ``s_in^(2 alpha_in)``) or ``"hessian"`` (the
      layer's output error with the full input second moment ``H = X^T X``, rows weighted by
      ``s_out^(2 alpha_out)``). Without calibration every fit is data-free (the Frobenius error).
    - ``fit_rounds``: alternations of the ``als`` / ``coupled`` / ``gptq`` fits.
    - ``damp``: the dampening ``damp * mean(diag H)`` added to ``H``'s diagonal.
    - ``block_size``: columns per lazy update of the ``gptq`` fit.
    - ``sequential``: with calibration data, quantize the decoder blocks in order, each block's input
      statistics taken on the model whose earlier blocks are already quantized (:mod:`rabit_compiler.sequential`).
    """

    paths: int = 2
    layer_paths: Mapping[str, int] = field(default_factory=dict)
    skip: tuple[str, ...] = DEFAULT_SKIP
    rounds: int = 10
    alpha_in: float = 1.0
    alpha_out: float = 1.0
    statistic: str = "mean_abs"
    scale_dtype: torch.dtype = torch.float16
    anchor_margin: float = 0.5
    head: str = "auto"
    fit: str = "gptq"
    objective: str = "hessian"
    fit_rounds: int = 1
    damp: float = 0.01
    block_size: int = 128
    sequential: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(self.skip)
        if isinstance(self.scale_dtype, str):
            self.scale_dtype = getattr(torch, self.scale_dtype)
        if isinstance(self.paths, bool) or not isinstance(self.paths, int) or self.paths < 1:
            raise ValueError(f"RaBiTConfig.paths must be an integer >= 1, got {self.paths!r}")
        self.layer_paths = dict(self.layer_paths)
        for pattern, paths in self.layer_paths.items():
            if not isinstance(pattern, str) or isinstance(paths, bool) or not isinstance(paths, int) or paths < 1:
                raise ValueError(f"RaBiTConfig.layer_paths maps name patterns to integers >= 1, got "
                                 f"{pattern!r}: {paths!r}")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"RaBiTConfig.rounds must be an integer >= 0, got {self.rounds!r}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"RaBiTConfig.statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"RaBiTConfig.scale_dtype must be fp16, bf16 or fp32, got {self.scale_dtype}")
        if self.head not in (*HEAD_SCHEMES, "auto"):
            raise ValueError(f"RaBiTConfig.head must be one of {sorted((*HEAD_SCHEMES, 'auto'))}, got {self.head!r}")
        if not 0.0 < self.anchor_margin < 1.0:
            raise ValueError(f"RaBiTConfig.anchor_margin must lie in (0, 1), got {self.anchor_margin}")
        if self.fit not in FITS:
            raise ValueError(f"RaBiTConfig.fit must be one of {FITS}, got {self.fit!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"RaBiTConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("fit_rounds", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "block_size" else 0):
                raise ValueError(f"RaBiTConfig.{name} must be an integer >= {int(name == 'block_size')}, got {value!r}")
        if not self.damp > 0:
            raise ValueError(f"RaBiTConfig.damp must be positive, got {self.damp!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | RaBiTConfig | None) -> RaBiTConfig:
        """Build from ``torch.compile(..., options={...})``; unknown keys raise with the valid ones."""
        if isinstance(options, RaBiTConfig):
            return options
        options = dict(options or {})
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid - BACKEND_ONLY_OPTIONS)
        if unknown:
            raise ValueError(f"unknown rabit options {unknown}; valid: {sorted(valid | BACKEND_ONLY_OPTIONS)}")
        return cls(**{k: v for k, v in options.items() if k in valid})

    def skips(self, layer_name: str) -> bool:
        """Whether ``layer_name`` matches one of the ``skip`` patterns."""
        return any(fnmatch.fnmatchcase(layer_name, pattern) for pattern in self.skip)

    def paths_for(self, layer_name: str) -> int:
        """k for ``layer_name``: the value of the first ``layer_paths`` pattern it matches, else ``paths``."""
        for pattern, paths in self.layer_paths.items():
            if fnmatch.fnmatchcase(layer_name, pattern):
                return paths
        return self.paths

    def for_layer(self, layer_name: str) -> RaBiTConfig:
        """This config with ``paths = paths_for(layer_name)`` and no per-layer patterns: what fits that layer."""
        return replace(self, paths=self.paths_for(layer_name), layer_paths={})

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skip"] = list(self.skip)
        data["scale_dtype"] = str(self.scale_dtype).removeprefix("torch.")
        return data

    def fit_key(self) -> tuple:
        """What a data-free fit of one weight depends on (cache key)."""
        return (self.paths, self.rounds, self.scale_dtype, self.fit, self.fit_rounds)

    @property
    def needs_input_gram(self) -> bool:
        """Whether the fit reads the full input second moment ``X^T X`` of the calibration activations."""
        return self.fit != "svid" and self.objective == "hessian"


BACKEND_ONLY_OPTIONS = {"inductor", "fuse_siblings", "cpu_tables", "cpp_wrapper", "fold_gqa",
                        "cpu_attention"}
