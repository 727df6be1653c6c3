"""``rabit_compiler.save`` / ``load``: bit-identical round trips (HF Llama with tied lm_head and mixed k, GPT-2
Conv1D, hand-written models of random shapes), per-layer k, and clear failures on damaged files. The HF
``save_pretrained`` / ``from_pretrained`` side of the same format is in test_hf_checkpoints.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rabit_compiler.kernels import pack_paths
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import rabit_compiler as rabit
from rabit_compiler.serialization import (
    CONFIG_FILE,
    DIGESTS_KEY,
    WEIGHTS_FILE,
    RaBiTFormatError,
    digest_metadata,
    load,
    save,
)

MIXED = rabit.RaBiTConfig(paths=2, layer_paths={"*.down_proj": 3, "*.q_proj": 1}, rounds=2, head="fp")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    model = tiny_llama()
    rabit.quantize_(model, MIXED, progress=False)
    directory = tmp_path_factory.mktemp("llama")
    save(model, directory)
    return directory, model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_llama_round_trip_is_bit_identical_with_mixed_paths_and_tied_head(saved_llama):
    directory, model = saved_llama
    loaded = load(directory)
    assert type(loaded) is LlamaForCausalLM and not loaded.training
    ids = torch.randint(0, 101, (2, 9))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    paths = {name: m.num_paths for name, m in loaded.named_modules() if isinstance(m, rabit.RaBiTLinear)}
    assert len(paths) == 14
    assert all(k == MIXED.paths_for(name) for name, k in paths.items())
    assert sorted(set(paths.values())) == [1, 2, 3]
    assert loaded.rabit_config == MIXED
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_quantization_config_records_versions_layers_and_checksums(saved_llama):
    directory, model = saved_llama
    document = json.loads((directory / CONFIG_FILE).read_text())
    record = document["quantization_config"]
    assert record["quant_method"] == "rabit" and document["architectures"] == ["LlamaForCausalLM"]
    assert record["packed_format_version"] == rabit.kernels.FORMAT_VERSION
    down = record["layers"]["model.layers.1.mlp.down_proj"]
    assert down == {"module": "rabit_linear", "paths": 3, "out_features": 64, "in_features": 88,
                    "scale_dtype": "float16", "bias_dtype": None}
    assert record["modules_to_not_convert"] == ["lm_head"]
    assert rabit.RaBiTConfig.from_options(record["rabit_config"]) == MIXED
    with safe_open(directory / WEIGHTS_FILE, "pt") as handle:
        digests = json.loads(handle.metadata()[DIGESTS_KEY])
        names = set(handle.keys())
    assert "lm_head.weight" not in names, "the tied head is stored once"
    assert names <= set(digests)
    expected = json.loads(digest_metadata({"x": model.model.layers[1].mlp.down_proj.weight})[DIGESTS_KEY])["x"]
    assert digests["model.layers.1.mlp.down_proj.weight"] == expected


def test_compiled_model_saves_like_the_model(saved_llama, tmp_path):
    directory, model = saved_llama
    save(torch.compile(model, backend="rabit"), tmp_path)
    for name, tensor in load_file(directory / WEIGHTS_FILE).items():
        assert torch.equal(load_file(tmp_path / WEIGHTS_FILE)[name], tensor), name
    with safe_open(directory / WEIGHTS_FILE, "pt") as first, safe_open(tmp_path / WEIGHTS_FILE, "pt") as second:
        assert first.metadata()[DIGESTS_KEY] == second.metadata()[DIGESTS_KEY]


def test_gpt2_conv1d_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    rabit.quantize_(model, rabit.RaBiTConfig(rounds=2, layer_paths={"*.c_fc": 3}), progress=False)
    save(model, tmp_path)
    loaded = load(tmp_path)
    ids = torch.randint(0, 97, (2, 8))
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.transformer.h[0].mlp.c_fc.num_paths == 3
    assert loaded.transformer.h[0].attn.c_attn.bias is not None


class Stack(torch.nn.Module):
    def __init__(self, sizes: list[int], bias: bool):
        super().__init__()
        pairs = zip(sizes, sizes[1:], strict=False)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=bias) for a, b in pairs)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@given(
    sizes=st.lists(st.integers(1, 80), min_size=2, max_size=4),
    paths=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_random_packed_models_round_trip_into_a_given_model(tmp_path_factory, sizes, paths, bias, dtype, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    model = Stack(sizes, bias).to(dtype)
    for index, (k_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        k = paths[index]
        signs = torch.randn(k, n_out, k_in, generator=generator)
        packed = pack_paths(signs, torch.rand(k, n_out, generator=generator), torch.rand(k, k_in, generator=generator))
        layer_bias = torch.randn(n_out, generator=generator).to(dtype) if bias else None
        model.layers[index] = rabit.RaBiTLinear(packed, layer_bias)
    directory = tmp_path_factory.mktemp("stack")
    save(model, directory)
    loaded = load(directory, model=Stack(sizes, bias).to(dtype))
    x = torch.randn(batch, sizes[0], generator=generator).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [layer.num_paths for layer in loaded.layers] == paths[: len(sizes) - 1]


def test_layer_paths_config_is_validated_and_serialized():
    config = rabit.RaBiTConfig(paths=2, layer_paths={"*.down_proj": 3, "*": 1})
    assert config.paths_for("model.layers.0.mlp.down_proj") == 3
    assert config.paths_for("model.layers.0.mlp.up_proj") == 1
    assert rabit.RaBiTConfig(layer_paths={"*.q_proj": 4}).paths_for("x.k_proj") == 2
    assert rabit.RaBiTConfig.from_options(json.loads(json.dumps(config.to_json_dict()))) == config
    for bad in ({"*.down_proj": 0}, {"*.down_proj": 2.0}, {"*.down_proj": True}, {3: 2}):
        with pytest.raises(ValueError, match="layer_paths"):
            rabit.RaBiTConfig(layer_paths=bad)


def test_backend_data_free_fit_uses_per_layer_paths():
    model = tiny_llama(2)
    seen = {}

    def recording(gm, example_inputs):
        compiled = rabit.rabit_backend(gm, example_inputs, options={"inductor": False, "rounds": 1,
                                                                    "layer_paths": {"*.down_proj": 3}})
        seen.update({name: m.packed_signs.shape[0] for name, m in gm.named_modules() if hasattr(m, "packed_signs")})
        return compiled

    torch.compile(model, backend=recording)(torch.randint(0, 101, (1, 5)))
    down = [k for name, k in seen.items() if "down_proj" in name]
    other = [k for name, k in seen.items() if "down_proj" not in name]
    assert down and set(down) == {3}
    assert other and set(other) == {2}


# --- damaged files ---------------------------------------------------------------------------------------------


@pytest.fixture
def copy_of_saved(saved_llama, tmp_path) -> Path:
    directory, _ = saved_llama
    for name in (CONFIG_FILE, WEIGHTS_FILE, "generation_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    return tmp_path


def edit_config(directory: Path, edit) -> None:
    document = json.loads((directory / CONFIG_FILE).read_text())
    edit(document["quantization_config"])
    (directory / CONFIG_FILE).write_text(json.dumps(document))


def rewrite_tensors(directory: Path, edit) -> None:
    """Rewrite the tensor file through ``edit(tensors)`` with checksums of the new tensors, so only the edit
    itself is wrong."""
    tensors = load_file(directory / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt", **digest_metadata(tensors)})


def test_flipped_byte_fails_the_checksum_naming_the_tensor(copy_of_saved):
    data = bytearray((copy_of_saved / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0x40
    (copy_of_saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(RaBiTFormatError, match=r"tensor \S+ in .* is corrupted: sha256"):
        load(copy_of_saved)


def test_truncated_file_is_named(copy_of_saved):
    data = (copy_of_saved / WEIGHTS_FILE).read_bytes()
    (copy_of_saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RaBiTFormatError, match="model.safetensors is truncated"):
        load(copy_of_saved)


@pytest.mark.parametrize("key", ["file_format_version", "packed_format_version"])
def test_wrong_version_is_refused(copy_of_saved, key):
    edit_config(copy_of_saved, lambda record: record.update({key: 99}))
    with pytest.raises(RaBiTFormatError, match=f"{key} is 99.*reads version"):
        load(copy_of_saved)


def test_missing_and_unexpected_tensors_are_named(copy_of_saved):
    rewrite_tensors(copy_of_saved, lambda tensors: tensors.pop("model.layers.0.mlp.down_proj.col_scale"))
    with pytest.raises(RaBiTFormatError, match=r"lacks the packed tensors \['model.layers.0.mlp.down_proj.col_scale"):
        load(copy_of_saved)
    rewrite_tensors(copy_of_saved, lambda tensors: tensors.update({
        "model.layers.0.mlp.down_proj.col_scale": torch.zeros(3, 88, dtype=torch.float16),
        "stray": torch.zeros(2)}))
    with pytest.raises(RaBiTFormatError, match=r"unexpected_keys.*stray"):
        load(copy_of_saved)
    rewrite_tensors(copy_of_saved, lambda tensors: tensors.pop("model.norm.weight"))
    with pytest.raises(RaBiTFormatError, match=r"missing_keys.*model.norm.weight"):
        load(copy_of_saved)


def test_wrong_shape_or_dtype_is_named(copy_of_saved):
    rewrite_tensors(copy_of_saved, lambda tensors: tensors.update({
        "model.layers.0.mlp.up_proj.row_scale": torch.zeros(2, 88, dtype=torch.float32)}))
    with pytest.raises(RaBiTFormatError, match=r"up_proj.row_scale .* is float32 \[2, 88\].*needs float16 \[2, 88\]"):
        load(copy_of_saved)


def test_packed_layer_inconsistent_with_its_recorded_k_is_named(copy_of_saved):
    edit_config(copy_of_saved, lambda record: record["layers"]["model.layers.0.mlp.up_proj"].update(paths=3))
    with pytest.raises(RaBiTFormatError, match=r"up_proj.weight .* is int32 \[2, 88, 2\].*needs int32 \[3, 88, 2\]"):
        load(copy_of_saved)


def test_invalid_layer_record_is_named(copy_of_saved):
    edit_config(copy_of_saved, lambda record: record["layers"]["model.layers.0.mlp.up_proj"].update(paths="two"))
    with pytest.raises(RaBiTFormatError, match=r"layer model.layers.0.mlp.up_proj .* is not a valid rabit_linear"):
        load(copy_of_saved)


def test_not_a_saved_model_and_model_without_a_place(tmp_path, copy_of_saved):
    with pytest.raises(RaBiTFormatError, match="not a model saved by rabit_compiler.save"):
        load(tmp_path / "nothing")
    with pytest.raises(RaBiTFormatError, match="has no place"):
        load(copy_of_saved, model=Stack([4, 4], bias=False))
