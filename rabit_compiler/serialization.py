"""Save and load RaBiT-quantized models: safetensors for every tensor, JSON for everything else; never unpickled.

A saved directory holds:

- ``rabit_model.safetensors``: every parameter and buffer of the model (non-persistent buffers included, so
  nothing has to be recomputed) under its dotted name. A packed layer ``L`` contributes ``L.packed_signs``
  int32 ``[k, N, ceil(K/32)]``, ``L.row_scale [k, N]``, ``L.col_scale [k, K]`` and ``L.bias [N]`` if it has
  one. A tensor reachable under several names (a tied lm_head) is stored once, under its first name.
- ``rabit.json``: the file-format version and the packed-format version
  (:data:`rabit_compiler.kernels.FORMAT_VERSION`), the :class:`RaBiTConfig` used, every packed layer's k, N, K
  and dtypes, every stored tensor's dtype, shape and kind, the tied names, the sha256 and size of the tensor
  file, and for a Hugging Face model its class, config and generation config.
- the tokenizer's files, when one was given to :func:`save`.

:func:`load` rebuilds a Hugging Face model from the saved config on the meta device (no weight
initialisation), swaps the packed layers for :class:`RaBiTLinear` of the recorded shapes and assigns every
tensor from the file; or fills a model the caller passes. Anything that does not match raises
:class:`RaBiTFormatError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.kernels import FORMAT_VERSION, PackedResidualBinary, words_per_row
from rabit_compiler.passes import PackedLinearWeights
from rabit_compiler.quantize import RaBiTLinear, set_submodule

FILE_FORMAT_VERSION = 1
MANIFEST_FILE = "rabit.json"
TENSOR_FILE = "rabit_model.safetensors"
_PACKED_TENSORS = ("packed_signs", "row_scale", "col_scale")
_HASH_CHUNK = 1 << 24


class RaBiTFormatError(ValueError):
    """A saved RaBiT model cannot be loaded: wrong version, missing or unexpected tensor, wrong shape or
    dtype, truncated or corrupted file. The message names the file and what is wrong."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise RaBiTFormatError(f"{where}: unknown dtype {name!r}")
    return dtype


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s ``OptimizedModule`` wrapper (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, is_parameter)`` for every parameter and buffer, duplicates (ties) included."""
    tensors = [(name, p, True) for name, p in model.named_parameters(remove_duplicate=False)]
    tensors += [(name, b, False) for name, b in model.named_buffers(remove_duplicate=False) if b is not None]
    return tensors


def _tensor_identity(tensor: torch.Tensor) -> tuple:
    """Two names hold the same tensor when they view the same memory the same way."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def _layers(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Each :class:`RaBiTLinear`'s name -> its k, N, K and dtypes. Raises for packed weights held in
    other modules (generic owners frozen as FX graphs by ``quantize_``), which cannot be rebuilt."""
    layers = {}
    frozen = []
    for name, module in model.named_modules():
        if isinstance(module, RaBiTLinear):
            layers[name] = {
                "paths": module.num_paths,
                "out_features": module.out_features,
                "in_features": module.in_features,
                "scale_dtype": _dtype_name(module.row_scale.dtype),
                "bias_dtype": None if module.bias is None else _dtype_name(module.bias.dtype),
            }
        elif isinstance(module, PackedLinearWeights):
            frozen.append(name.rpartition(".")[0] or "<root>")
    if frozen:
        raise ValueError(
            f"cannot save packed weights held by symbolically traced modules {sorted(set(frozen))}: only layers "
            "swapped for RaBiTLinear (nn.Linear, Conv1D) can be rebuilt on load"
        )
    return layers


def _hf_metadata(model: torch.nn.Module) -> dict[str, Any] | None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    generation = getattr(model, "generation_config", None)
    return {
        "class": type(model).__name__,
        "config": json.loads(model.config.to_json_string(use_diff=False)),
        "generation_config": None if generation is None else json.loads(generation.to_json_string(use_diff=True)),
    }


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def save(model: torch.nn.Module, directory: str | os.PathLike, tokenizer: Any = None,
         config: RaBiTConfig | None = None) -> Path:
    """Write ``model`` (quantized by :func:`rabit_compiler.quantize_`; a ``torch.compile`` wrapper is
    unwrapped) to ``directory``: ``rabit_model.safetensors`` + ``rabit.json`` (see the module docstring),
    and ``tokenizer.save_pretrained(directory)`` when a tokenizer is given. ``config`` defaults to the one
    ``quantize_`` recorded on the model. Returns the directory."""
    model = _unwrap(model)
    config = config or getattr(model, "rabit_config", None)
    layers = _layers(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored: dict[str, torch.Tensor] = {}
    manifest: dict[str, dict[str, Any]] = {}
    ties: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, tensor, is_parameter in _named_tensors(model):
        if tensor.is_meta:
            raise ValueError(f"cannot save {name}: it is on the meta device (never filled)")
        identity = _tensor_identity(tensor)
        if identity in first_name:
            ties[name] = first_name[identity]
            continue
        first_name[identity] = name
        stored[name] = tensor.detach().to("cpu").contiguous()
        manifest[name] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape),
                          "kind": "parameter" if is_parameter else "buffer"}
        if is_parameter:
            manifest[name]["requires_grad"] = tensor.requires_grad
    tensor_path = directory / TENSOR_FILE
    with tempfile.NamedTemporaryFile(dir=directory, prefix=TENSOR_FILE, suffix=".partial", delete=False) as handle:
        partial = Path(handle.name)
    try:
        save_file(stored, str(partial), metadata={"format": "pt"})
        os.replace(partial, tensor_path)
    finally:
        partial.unlink(missing_ok=True)
    document = {
        "file_format_version": FILE_FORMAT_VERSION,
        "packed_format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "rabit_config": None if config is None else config.to_json_dict(),
        "tensor_file": {"name": TENSOR_FILE, "sha256": file_sha256(tensor_path), "bytes": tensor_path.stat().st_size},
        "layers": layers,
        "tensors": manifest,
        "ties": ties,
        "huggingface": _hf_metadata(model),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _library_version() -> str:
    try:
        return version("rabit-compiler")
    except PackageNotFoundError:
        return "unknown"


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """``rabit.json`` of a saved model, with its versions checked; raises :class:`RaBiTFormatError`."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise RaBiTFormatError(f"{path} not found: {directory} is not a model saved by rabit_compiler.save")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RaBiTFormatError(f"{path} is not valid JSON ({error})") from error
    required = ("file_format_version", "packed_format_version", "tensor_file", "layers", "tensors", "ties")
    missing = [key for key in required if key not in document]
    if missing:
        raise RaBiTFormatError(f"{path} lacks the entries {missing}")
    for key, expected in (("file_format_version", FILE_FORMAT_VERSION), ("packed_format_version", FORMAT_VERSION)):
        if document[key] != expected:
            raise RaBiTFormatError(
                f"{path}: {key} is {document[key]!r}, but this rabit_compiler ({_library_version()}) reads "
                f"version {expected}; the file was written by rabit_compiler {document.get('library_version')}"
            )
    return document


def _check_tensor_file(directory: Path, document: dict[str, Any], verify_checksum: bool) -> Path:
    entry = document["tensor_file"]
    path = directory / entry["name"]
    if not path.is_file():
        raise RaBiTFormatError(f"tensor file {path} not found")
    size = path.stat().st_size
    if size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "longer than written"
        raise RaBiTFormatError(f"tensor file {path} is {kind}: {size} bytes, {MANIFEST_FILE} records {entry['bytes']}")
    if verify_checksum:
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise RaBiTFormatError(f"tensor file {path} is corrupted: sha256 {digest} does not match the "
                                   f"{entry['sha256']} recorded in {MANIFEST_FILE}")
    return path


def _read_tensors(path: Path, manifest: dict[str, dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the file, after checking its names, dtypes and shapes against the manifest."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            names = set(handle.keys())
            missing, unexpected = sorted(set(manifest) - names), sorted(names - set(manifest))
            if missing:
                raise RaBiTFormatError(f"{path} lacks the tensors {missing} listed in {MANIFEST_FILE}")
            if unexpected:
                raise RaBiTFormatError(f"{path} holds tensors {unexpected} that {MANIFEST_FILE} does not list")
            tensors = {name: handle.get_tensor(name) for name in manifest}
    except SafetensorError as error:
        raise RaBiTFormatError(f"{path} is not a readable safetensors file ({error})") from error
    for name, entry in manifest.items():
        tensor = tensors[name]
        expected_dtype = _dtype(entry["dtype"], f"{MANIFEST_FILE} entry {name}")
        if tensor.dtype != expected_dtype or list(tensor.shape) != entry["shape"]:
            raise RaBiTFormatError(f"tensor {name} in {path} is {_dtype_name(tensor.dtype)} {list(tensor.shape)}, "
                                   f"{MANIFEST_FILE} records {entry['dtype']} {entry['shape']}")
    return tensors


def _packed_layer(name: str, layer: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RaBiTLinear:
    """A :class:`RaBiTLinear` from the file's tensors, checked against the layer's recorded k, N, K, dtypes."""
    k, n, kk = layer["paths"], layer["out_features"], layer["in_features"]
    scale_dtype = _dtype(layer["scale_dtype"], f"layer {name}")
    expected = {
        "packed_signs": (torch.int32, [k, n, words_per_row(kk)]),
        "row_scale": (scale_dtype, [k, n]),
        "col_scale": (scale_dtype, [k, kk]),
    }
    if layer["bias_dtype"] is not None:
        expected["bias"] = (_dtype(layer["bias_dtype"], f"layer {name}"), [n])
    for attr, (dtype, shape) in expected.items():
        tensor = tensors.get(f"{name}.{attr}")
        if tensor is None:
            raise RaBiTFormatError(f"packed layer {name} (k={k}, N={n}, K={kk}) has no tensor {name}.{attr}")
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise RaBiTFormatError(f"{name}.{attr} is {_dtype_name(tensor.dtype)} {list(tensor.shape)}; layer {name} "
                                   f"(k={k}, N={n}, K={kk}) needs {_dtype_name(dtype)} {shape}")
    bias = tensors.get(f"{name}.bias") if layer["bias_dtype"] is not None else None
    try:
        packed = PackedResidualBinary(*(tensors[f"{name}.{attr}"] for attr in _PACKED_TENSORS), None, kk)
    except ValueError as error:
        raise RaBiTFormatError(f"packed layer {name}: {error}") from error
    return RaBiTLinear(packed, bias)


def _build_hf_model(document: dict[str, Any]) -> torch.nn.Module:
    """The recorded Hugging Face model class built from its config on the meta device (no weight init)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    metadata = document.get("huggingface")
    if metadata is None:
        raise RaBiTFormatError("the saved model is not a Hugging Face model: pass model= (an instance of the "
                               "original architecture) to rabit_compiler.load")
    model_class = getattr(transformers, metadata["class"], None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise RaBiTFormatError(f"model class {metadata['class']!r} is not in this transformers "
                               f"({transformers.__version__})")
    config_dict = dict(metadata["config"])
    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise RaBiTFormatError(f"model type {model_type!r} is not in this transformers ({transformers.__version__})")
    config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    with torch.device("meta"):
        model = model_class(config)
    if metadata.get("generation_config") is not None:
        model.generation_config = transformers.GenerationConfig.from_dict(metadata["generation_config"])
    return model


def _place_layer(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    try:
        set_submodule(model, name, module)
    except AttributeError as error:
        raise RaBiTFormatError(f"packed layer {name} has no place in the {type(model).__name__} model") from error


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor, entry: dict[str, Any]) -> None:
    """Put ``tensor`` at ``name`` as the parameter or buffer the manifest says it is (a Parameter as it is,
    so that tied names share one)."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError as error:
        raise RaBiTFormatError(f"tensor {name} in the file has no place in the model (no module "
                               f"{owner_name!r})") from error
    if entry["kind"] == "parameter":
        if attr not in owner._parameters:
            raise RaBiTFormatError(f"tensor {name} in the file is not a parameter of the model")
        if not isinstance(tensor, torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=entry.get("requires_grad", True))
        owner._parameters[attr] = tensor
    else:
        if attr not in owner._buffers:
            raise RaBiTFormatError(f"tensor {name} in the file is not a buffer of the model")
        owner._buffers[attr] = tensor


def load(
    directory: str | os.PathLike,
    model: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
    verify_checksum: bool = True,
) -> torch.nn.Module:
    """Load a model written by :func:`save`, in eval mode, on ``device``.

    Without ``model``: rebuild the recorded Hugging Face class from its saved config on the meta device
    (no weight initialisation), swap each packed layer for a :class:`RaBiTLinear` of the recorded k, N, K, and
    assign every tensor from the file (ties restored as shared parameters). With ``model`` (an instance of
    the original architecture, e.g. for a non-Hugging-Face model): do the same into it, in place.

    Checks, in order, raising :class:`RaBiTFormatError`: versions; tensor file size (truncation) and sha256
    (``verify_checksum``); tensor names against the manifest (missing / unexpected); dtypes and shapes;
    every packed layer's tensors against its k, N, K; and that every parameter and buffer of the model was
    filled.
    """
    directory = Path(directory)
    device = torch.device(device)
    document = read_manifest(directory)
    path = _check_tensor_file(directory, document, verify_checksum)
    manifest = document["tensors"]
    tensors = _read_tensors(path, manifest, device)
    unknown_ties = {alias: target for alias, target in document["ties"].items() if target not in manifest}
    if unknown_ties:
        raise RaBiTFormatError(f"{MANIFEST_FILE} ties {unknown_ties} point at tensors the file does not hold")
    model = _build_hf_model(document) if model is None else _unwrap(model)
    for name, layer in document["layers"].items():
        _place_layer(model, name, _packed_layer(name, layer, tensors))
    for name, tensor in tensors.items():
        _assign(model, name, tensor, manifest[name])
    for alias, target in document["ties"].items():
        _assign(model, alias, _lookup(model, target), manifest[target])
    filled = set(manifest) | set(document["ties"])
    unfilled = sorted(name for name, _, _ in _named_tensors(model) if name not in filled)
    if unfilled:
        raise RaBiTFormatError(f"the file has no tensors for {unfilled} of the {type(model).__name__} model")
    if document.get("rabit_config") is not None:
        try:
            model.rabit_config = RaBiTConfig.from_options(document["rabit_config"])
        except (ValueError, TypeError) as error:
            raise RaBiTFormatError(f"{MANIFEST_FILE}: invalid rabit_config ({error})") from error
    return model.eval()


def _lookup(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return getattr(owner, attr)


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved next to the model by :func:`save`; raises FileNotFoundError if none was."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer saved in {directory} (pass tokenizer= to rabit_compiler.save)")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
