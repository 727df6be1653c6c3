"""Save and load RaBiT-quantized models in one on-disk format: the one Hugging Face transformers reads and writes.

A saved directory holds:

- ``model.safetensors`` (or the shards ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``
  that ``save_pretrained`` writes for big models): every parameter and persistent buffer under its dotted name,
  tied duplicates once. A packed layer ``L`` contributes ``L.weight``, its packed sign words int32
  ``[k, N, ceil(K/32)]`` (a plain load of the fp architecture fails on that shape instead of keeping random
  weights), ``L.row_scale [k, N]``, ``L.col_scale [k, K]`` and ``L.bias [N]`` if it has one. The header
  metadata ``rabit_sha256`` holds the sha256 of every tensor's bytes.
- ``config.json``: for a Hugging Face model its config, whose ``quantization_config`` (``quant_method:
  "rabit"``, see :func:`quantization_record`) records the format versions, the :class:`RaBiTConfig`, every
  packed layer's module type and shapes (k, N, K, dtypes) and the linears left in full precision; for any
  other model a ``config.json`` holding only that ``quantization_config``.
- ``generation_config.json`` and the tokenizer's files, when there are any.

Packed module types are registered in :data:`PACKED_MODULES` (name -> class); a class provides
``metadata() -> dict`` (JSON) and ``from_metadata(dict)`` (an uninitialised module of those shapes), which is
all saving and loading need of it. Every check raises :class:`RaBiTFormatError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rabit_compiler.config import RaBiTConfig
from rabit_compiler.experts import RaBiTExperts
from rabit_compiler.head import WeightOnlyLinear
from rabit_compiler.kernels import FORMAT_VERSION
from rabit_compiler.passes import PackedLinearWeights
from rabit_compiler.quantize import RaBiTLinear, dtype_name, set_submodule

FILE_FORMAT_VERSION = 2
QUANT_METHOD = "rabit"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
DIGESTS_KEY = "rabit_sha256"
_CHUNK = 1 << 24
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_RECORD_KEYS = ("quant_method", "file_format_version", "packed_format_version", "library_version", "rabit_config",
                "layers", "modules_to_not_convert")

PACKED_MODULES: dict[str, type[torch.nn.Module]] = {"rabit_linear": RaBiTLinear, "weight_only_linear": WeightOnlyLinear,
                                                     "rabit_experts": RaBiTExperts}


class RaBiTFormatError(ValueError):
    """A saved RaBiT model cannot be loaded: wrong version, invalid quantization_config, missing or unexpected
    tensor, wrong shape or dtype, truncated or corrupted file. The message names the file and what is wrong."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s ``OptimizedModule`` wrapper (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def _library_version() -> str:
    try:
        return version("rabit-compiler")
    except PackageNotFoundError:
        return "unknown"


def packed_layers(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Each packed module's name -> ``{"module": its registered type, **module.metadata()}``. Raises for packed
    weights held in other modules (generic owners frozen as FX graphs by ``quantize_``): they cannot be rebuilt."""
    kinds = {cls: kind for kind, cls in PACKED_MODULES.items()}
    layers, frozen = {}, []
    for name, module in model.named_modules():
        if type(module) in kinds:
            layers[name] = {"module": kinds[type(module)], **module.metadata()}
        elif isinstance(module, PackedLinearWeights):
            frozen.append(name.rpartition(".")[0] or "<root>")
    if frozen:
        raise ValueError(
            f"cannot save packed weights held by symbolically traced modules {sorted(set(frozen))}: only layers "
            "swapped for RaBiTLinear (nn.Linear, Conv1D) can be rebuilt on load"
        )
    return layers


def _full_precision_linears(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"]


def quantization_record(model: torch.nn.Module, config: RaBiTConfig | None) -> dict[str, Any]:
    """The ``quantization_config`` of ``model`` as saved: ``quant_method`` ``"rabit"``, ``file_format_version``,
    ``packed_format_version`` (:data:`rabit_compiler.kernels.FORMAT_VERSION`), ``library_version``,
    ``rabit_config`` (the :class:`RaBiTConfig` used, or None), ``layers`` (:func:`packed_layers`) and
    ``modules_to_not_convert`` (the linears left in full precision)."""
    model = _unwrap(model)
    return {
        "quant_method": QUANT_METHOD,
        "file_format_version": FILE_FORMAT_VERSION,
        "packed_format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "rabit_config": None if config is None else config.to_json_dict(),
        "layers": packed_layers(model),
        "modules_to_not_convert": _full_precision_linears(model),
    }


def check_record(record: dict[str, Any], where: str) -> None:
    """Raise :class:`RaBiTFormatError` unless ``record`` is a quantization_config this version can load
    (``where`` names it in the message): known keys only, the versions it reads, a valid RaBiTConfig and
    layers that rebuild."""
    unknown = sorted(set(record) - set(_RECORD_KEYS))
    missing = [key for key in _RECORD_KEYS if key not in record]
    if unknown or missing:
        raise RaBiTFormatError(f"{where}: unknown entries {unknown}, missing entries {missing}")
    for key, expected in (("file_format_version", FILE_FORMAT_VERSION), ("packed_format_version", FORMAT_VERSION)):
        if record[key] != expected:
            raise RaBiTFormatError(
                f"{where}: {key} is {record[key]!r}, but this rabit_compiler ({_library_version()}) reads version "
                f"{expected}; the file was written by rabit_compiler {record['library_version']}"
            )
    rabit_config(record, where)
    if not isinstance(record["layers"], dict):
        raise RaBiTFormatError(f"{where}: layers must map layer names to their records, got {record['layers']!r}")
    with torch.device("meta"):
        build_packed_layers(record["layers"], where)


def rabit_config(record: dict[str, Any], where: str) -> RaBiTConfig | None:
    """The :class:`RaBiTConfig` a quantization_config records (None if none was)."""
    if record["rabit_config"] is None:
        return None
    try:
        return RaBiTConfig.from_options(record["rabit_config"])
    except (ValueError, TypeError, AttributeError) as error:
        raise RaBiTFormatError(f"{where}: invalid rabit_config ({error})") from error


def build_packed_layers(layers: dict[str, dict[str, Any]], where: str) -> dict[str, torch.nn.Module]:
    """Uninitialised packed modules of the recorded types and shapes, on the current default device."""
    built = {}
    for name, layer in layers.items():
        kind = layer.get("module") if isinstance(layer, dict) else None
        if kind not in PACKED_MODULES:
            raise RaBiTFormatError(f"{where}: layer {name} has module type {kind!r}, not one of "
                                   f"{sorted(PACKED_MODULES)}")
        metadata = {key: value for key, value in layer.items() if key != "module"}
        try:
            built[name] = PACKED_MODULES[kind].from_metadata(metadata)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise RaBiTFormatError(f"{where}: layer {name} {metadata} is not a valid {kind} "
                                   f"({type(error).__name__}: {error})") from error
    return built


def place_packed_layers(model: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> None:
    """Put each packed module at its name in ``model`` (replacing the fp linear there)."""
    for name, module in layers.items():
        try:
            set_submodule(model, name, module)
        except AttributeError as error:
            raise RaBiTFormatError(f"packed layer {name} has no place in the {type(model).__name__} model") from error


def expected_tensors(layers: dict[str, torch.nn.Module]) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Every tensor the packed modules need from a checkpoint -> its dtype and shape."""
    return {f"{name}.{key}": (tensor.dtype, list(tensor.shape))
            for name, module in layers.items() for key, tensor in module.state_dict().items()}


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hex sha256 of the tensor's bytes as safetensors stores them (C order, little endian)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def digest_metadata(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors header metadata that lets :func:`verify_checkpoint` check every tensor."""
    return {DIGESTS_KEY: json.dumps({name: tensor_digest(tensor) for name, tensor in state_dict.items()})}


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a saved model: ``model.safetensors`` or the shards its index names."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    index = directory / WEIGHTS_INDEX_FILE
    if not index.is_file():
        raise RaBiTFormatError(f"{directory} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise RaBiTFormatError(f"{index} is not a valid safetensors index ({error})") from error
    return [directory / name for name in sorted(set(weight_map.values()))]


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path`` and where its data starts; checks the file holds all the data."""
    if not path.is_file():
        raise RaBiTFormatError(f"tensor file {path} not found")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        raw = handle.read(length) if length is not None and length <= size else b""
    if length is None or len(raw) != length:
        raise RaBiTFormatError(f"tensor file {path} is truncated: {size} bytes, shorter than its header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RaBiTFormatError(f"tensor file {path} is not a safetensors file: its header is not JSON") from error
    start = 8 + length
    try:
        end = start + max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                          default=0)
    except (AttributeError, KeyError, TypeError, IndexError) as error:
        raise RaBiTFormatError(f"tensor file {path} has a malformed safetensors header ({error!r})") from error
    if size != end:
        kind = "truncated" if size < end else "longer than its header says"
        raise RaBiTFormatError(f"tensor file {path} is {kind}: {size} bytes, its header needs {end}")
    return header, start


def _file_digests(path: Path, entries: dict[str, dict[str, Any]], start: int) -> dict[str, str]:
    digests = {}
    with open(path, "rb") as handle:
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            handle.seek(start + begin)
            digest = hashlib.sha256()
            while begin < end:
                chunk = handle.read(min(_CHUNK, end - begin))
                digest.update(chunk)
                begin += len(chunk)
            digests[name] = digest.hexdigest()
    return digests


def verify_checkpoint(files: list[Path], expected: dict[str, tuple[torch.dtype, list[int]]]) -> None:
    """Check the tensor files of a checkpoint before anything is loaded from them: each is complete (not
    truncated) and every tensor's bytes match the sha256 recorded in its header; every tensor in ``expected``
    (see :func:`expected_tensors`) is present with its dtype and shape. Raises :class:`RaBiTFormatError`."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in files:
        header, start = _read_header(Path(path))
        metadata = header.pop("__metadata__", None) or {}
        try:
            recorded = json.loads(metadata[DIGESTS_KEY])
        except (KeyError, json.JSONDecodeError) as error:
            raise RaBiTFormatError(f"tensor file {path} has no valid {DIGESTS_KEY} checksums in its header: it was "
                                   "not written by rabit_compiler (or the header was edited)") from error
        unrecorded = sorted(set(header) - set(recorded))
        if unrecorded:
            raise RaBiTFormatError(f"tensor file {path} holds tensors {unrecorded} that its checksums do not cover")
        for name, digest in _file_digests(Path(path), header, start).items():
            if digest != recorded[name]:
                raise RaBiTFormatError(f"tensor {name} in {path} is corrupted: sha256 {digest} does not match the "
                                       f"{recorded[name]} recorded when it was saved")
        found.update({name: (Path(path), entry) for name, entry in header.items()})
    missing = sorted(set(expected) - set(found))
    if missing:
        raise RaBiTFormatError(f"the checkpoint {[str(f) for f in files]} lacks the packed tensors {missing}")
    for name, (dtype, shape) in expected.items():
        path, entry = found[name]
        stored = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if stored != dtype or entry["shape"] != shape:
            stored_name = entry["dtype"] if stored is None else dtype_name(stored)
            raise RaBiTFormatError(f"tensor {name} in {path} is {stored_name} {entry['shape']}; its packed layer "
                                   f"needs {dtype_name(dtype)} {shape}")


def read_quantization_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The RaBiT ``quantization_config`` in ``directory/config.json``, checked (:func:`check_record`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise RaBiTFormatError(f"{path} not found: {directory} is not a model saved by rabit_compiler.save")
    try:
        record = json.loads(path.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise RaBiTFormatError(f"{path} is not a valid JSON object ({error})") from error
    if not isinstance(record, dict) or record.get("quant_method") != QUANT_METHOD:
        raise RaBiTFormatError(f"{path} has no quantization_config with quant_method {QUANT_METHOD!r}: {directory} "
                               "is not a model saved by rabit_compiler.save")
    check_record(record, f"{path} quantization_config")
    return record


def is_saved_model(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model saved with a RaBiT quantization_config (not checked further)."""
    path = Path(directory) / CONFIG_FILE
    try:
        record = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(record, dict) and record.get("quant_method") == QUANT_METHOD


def save(model: torch.nn.Module, directory: str | os.PathLike, tokenizer: Any = None,
         config: RaBiTConfig | None = None) -> Path:
    """Write ``model`` (quantized by :func:`rabit_compiler.quantize_`; a ``torch.compile`` wrapper is
    unwrapped) to ``directory`` in the format of the module docstring, and ``tokenizer.save_pretrained(directory)``
    when a tokenizer is given. ``config`` defaults to the one ``quantize_`` recorded on the model. A Hugging Face
    model is marked quantized (as ``quantize_`` does) and written by its own ``save_pretrained``. Returns the
    directory."""
    from transformers import PreTrainedModel

    from rabit_compiler.integrations.transformers import mark_quantized

    model = _unwrap(model)
    config = config or getattr(model, "rabit_config", None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PreTrainedModel):
        quantization_record(model, config)  # raises for packed weights that cannot be rebuilt on load
        mark_quantized(model, config)
        model.save_pretrained(directory)
    else:
        _save_module(model, directory, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _save_module(model: torch.nn.Module, directory: Path, config: RaBiTConfig | None) -> None:
    """A model that is not a Hugging Face one: ``model.safetensors`` (tied tensors once, under their first
    name) and a ``config.json`` holding only the quantization_config."""
    record = quantization_record(model, config)
    stored: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            raise ValueError(f"cannot save {name}: it is on the meta device (never filled)")
        if id(tensor) not in seen:
            seen.add(id(tensor))
            stored[name] = tensor.detach().to("cpu").contiguous()
    partial = directory / (WEIGHTS_FILE + ".partial")
    try:
        save_file(stored, str(partial), metadata={"format": "pt", **digest_metadata(stored)})
        os.replace(partial, directory / WEIGHTS_FILE)
    finally:
        partial.unlink(missing_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps({"quantization_config": record}, indent=1) + "\n")


def load(directory: str | os.PathLike, model: torch.nn.Module | None = None,
         device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model written by :func:`save` (or by ``save_pretrained`` of a RaBiT model), in eval mode, on
    ``device``.

    Without ``model``: the Hugging Face class recorded in ``config.json`` through its ``from_pretrained`` (the
    ``"rabit"`` quantizer swaps the packed layers in on the meta device and checks the files), and any missing,
    unexpected or mismatched tensor raises. With ``model`` (an instance of the original architecture, e.g. a
    model that is not a Hugging Face one): the packed layers are swapped in and every parameter and persistent
    buffer is filled from the file, in place; names that share one tensor in ``model`` (ties) are filled from
    whichever of them the file holds.

    Raises :class:`RaBiTFormatError` for: versions; an invalid quantization_config; truncated files, tensors whose
    sha256 does not match; packed tensors missing or of the wrong dtype or shape; tensors the model lacks or has
    no value for.
    """
    directory = Path(directory)
    device = torch.device(device)
    record = read_quantization_config(directory)
    if model is None:
        return _load_pretrained(directory).to(device).eval()
    model = _unwrap(model)
    where = f"{directory / CONFIG_FILE} quantization_config"
    with torch.device("meta"):
        layers = build_packed_layers(record["layers"], where)
    files = checkpoint_files(directory)
    verify_checkpoint(files, expected_tensors(layers))
    place_packed_layers(model, layers)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
        except SafetensorError as error:
            raise RaBiTFormatError(f"{path} is not a readable safetensors file ({error})") from error
    _fill(model, tensors, directory)
    config = rabit_config(record, where)
    if config is not None:
        model.rabit_config = config
    return model.eval()


def _load_pretrained(directory: Path) -> torch.nn.Module:
    import transformers

    architectures = json.loads((directory / CONFIG_FILE).read_text()).get("architectures") or [None]
    model_class = getattr(transformers, str(architectures[0]), None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise RaBiTFormatError(f"{directory / CONFIG_FILE} names no model class of this transformers "
                               f"({transformers.__version__}) in 'architectures' ({architectures[0]!r}): pass "
                               "model= (an instance of the original architecture) to rabit_compiler.load")
    model, info = model_class.from_pretrained(directory, output_loading_info=True, local_files_only=True)
    problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {kind: names for kind, names in problems.items() if names}
    if problems:
        raise RaBiTFormatError(f"loading {directory} into {model_class.__name__}: {problems}")
    return model


def _fill(model: torch.nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Set every parameter and persistent buffer of ``model`` from ``tensors`` (as parameters where the model
    has parameters, one shared parameter per group of tied names)."""
    groups: dict[int, list[str]] = {}
    current = model.state_dict(keep_vars=True)
    for name, tensor in current.items():
        groups.setdefault(id(tensor), []).append(name)
    unexpected = sorted(set(tensors) - set(current))
    if unexpected:
        raise RaBiTFormatError(f"{directory} holds tensors {unexpected} that the {type(model).__name__} model lacks")
    unfilled = sorted(names[0] for names in groups.values() if not any(name in tensors for name in names))
    if unfilled:
        raise RaBiTFormatError(f"{directory} has no tensors for {unfilled} of the {type(model).__name__} model")
    for names in groups.values():
        value = tensors[next(name for name in names if name in tensors)]
        if isinstance(current[names[0]], torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=value.is_floating_point())
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = value


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved next to the model by :func:`save`; raises FileNotFoundError if none was."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer saved in {directory} (pass tokenizer= to rabit_compiler.save)")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
