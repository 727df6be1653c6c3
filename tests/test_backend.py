"""``torch.compile(model, backend="rabit")``: equivalence, options, stale weights, recompiles, bad input."""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from rabit_compiler.backend import rabit_backend
from rabit_compiler.config import RaBiTConfig
from rabit_compiler.quantizer import fit_weight, pack_fit


class MLP(torch.nn.Module):
    """Two nn.Linear layers and a raw-parameter F.linear; K and N not multiples of 32."""

    def __init__(self, k=37, hidden=70, n=45, bias=True):
        super().__init__()
        self.up = torch.nn.Linear(k, hidden, bias=bias)
        self.down = torch.nn.Linear(hidden, n, bias=bias)
        self.proj = torch.nn.Parameter(torch.randn(n, n) / n**0.5)

    def forward(self, x):
        return F.linear(self.down(torch.relu(self.up(x))), self.proj)


def dequantized_reference(model: MLP, config: RaBiTConfig) -> MLP:
    """A float64 copy of ``model`` with every weight replaced by its packed W_hat (same data-free fit)."""
    reference = MLP(model.up.in_features, model.up.out_features, model.down.out_features,
                    bias=model.up.bias is not None).double()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in (reference.up.weight, reference.down.weight, reference.proj):
            p.copy_(pack_fit(fit_weight(p.float(), config), config).dequantize(torch.float64))
    return reference


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def test_backend_is_registered_and_declared_as_entry_point():
    assert "rabit" in torch._dynamo.list_backends(exclude_tags=())
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("rabit") == "rabit_compiler.backend:rabit_backend"


def test_backend_works_without_importing_the_package():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(40, 8)\n"
        "y = torch.compile(m, backend='rabit', options={'inductor': False})(torch.randn(2, 40))\n"
        "assert 'rabit_compiler' in sys.modules and y.shape == (2, 8)\n"
        "assert not torch.allclose(y, m(torch.randn(2, 40)))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_compiled_with_inductor_matches_dequantized_eager():
    torch.manual_seed(0)
    model = MLP().eval()
    config = RaBiTConfig()
    x = torch.randn(3, 5, 37)
    compiled = torch.compile(model, backend="rabit")
    out = compiled(x)
    expected = dequantized_reference(model, config)(x.double())
    # fp32 activations through 3 layers (K <= 70) with fp32 accumulation: ~1e-6 relative per layer
    assert relative_error(out, expected) < 1e-5
    assert relative_error(model(x), expected) > 1e-2, "the compiled model must not be the fp model"


@given(seed=st.integers(0, 2**31), bias=st.booleans(), batch=st.sampled_from([(1, 37), (4, 37), (2, 3, 37)]),
       paths=st.integers(1, 3))
def test_eager_backend_matches_dequantized_reference(seed, bias, batch, paths):
    torch.manual_seed(seed)
    model = MLP(bias=bias).eval()
    config = RaBiTConfig(paths=paths, rounds=2)
    compiled = torch.compile(model, backend="rabit", options={"inductor": False, "paths": paths, "rounds": 2})
    x = torch.randn(*batch)
    assert relative_error(compiled(x), dequantized_reference(model, config)(x.double())) < 1e-5


def test_options_reach_the_fit():
    model = MLP().eval()
    captured = {}

    def spy(gm, example_inputs):
        captured["fn"] = rabit_backend(gm, example_inputs, options={"inductor": False, "paths": 3,
                                                                    "skip": ["down"]})
        return captured["fn"]

    torch.compile(model, backend=spy)(torch.randn(2, 37))
    gm = captured["fn"].gm
    shapes = {name: buf.shape for name, buf in gm.named_buffers() if name.endswith("packed_signs")}
    assert len(shapes) == 2 and all(s[0] == 3 for s in shapes.values()), shapes
    assert "torch._C._nn.linear(" in gm.code  # the skipped layer stays fp


def test_unknown_options_and_modes_are_errors():
    with pytest.raises(Exception, match="unknown rabit options"):
        torch.compile(MLP(), backend="rabit", options={"pathz": 3})(torch.randn(2, 37))
    torch.compiler.reset()
    with pytest.raises(Exception, match="paths must be an integer >= 1"):
        torch.compile(MLP(), backend="rabit", options={"paths": 0})(torch.randn(2, 37))


def test_in_place_weight_update_is_repacked_not_served_stale():
    torch.manual_seed(1)
    model = MLP().eval()
    config = RaBiTConfig()
    compiled = torch.compile(model, backend="rabit", options={"inductor": False})
    x = torch.randn(4, 37)
    compiled(x)
    with torch.no_grad():
        model.up.weight.mul_(-2.0)
    out = compiled(x)
    assert relative_error(out, dequantized_reference(model, config)(x.double())) < 1e-5


def test_another_module_instance_gets_its_own_weights():
    torch.manual_seed(2)
    first, second = MLP().eval(), MLP().eval()
    config = RaBiTConfig()
    run = torch.compile(lambda module, x: module(x), backend="rabit", options={"inductor": False})
    x = torch.randn(4, 37)
    run(first, x)
    out = run(second, x)
    assert relative_error(out, dequantized_reference(second, config)(x.double())) < 1e-5
    out = run(first, x)
    assert relative_error(out, dequantized_reference(first, config)(x.double())) < 1e-5


def test_dynamic_shapes_do_not_recompile_per_length():
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return rabit_backend(gm, example_inputs, options={"inductor": False})

    model = MLP().eval()
    compiled = torch.compile(model, backend=counting, dynamic=True)
    for length in range(2, 12):  # Dynamo specialises sizes 0 and 1, so start at 2
        compiled(torch.randn(1, length, 37))
    assert len(compiles) == 1
    torch.compiler.reset()
    compiles.clear()
    automatic = torch.compile(model, backend=counting)  # Dynamo's automatic dynamic shapes
    for length in range(1, 12):
        automatic(torch.randn(1, length, 37))
    assert len(compiles) <= 2


def test_non_finite_and_empty_layers_are_skipped_with_a_logged_reason(caplog):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.nan = torch.nn.Linear(40, 40)
            self.empty = torch.nn.Linear(0, 40)
            with torch.no_grad():
                self.nan.weight[3, 4] = float("nan")

        def forward(self, x):
            return self.nan(x) + self.empty(x[..., :0])

    model = Odd().eval()
    x = torch.randn(2, 40)
    with caplog.at_level(logging.INFO, logger="rabit_compiler"):
        out = torch.compile(model, backend="rabit", options={"inductor": False})(x)
    text = caplog.text
    assert "NaN/Inf" in text and "empty" in text
    torch.testing.assert_close(out, model(x), equal_nan=True)


def test_dtype_mismatch_raises_like_the_original():
    model = MLP().eval()
    with pytest.raises(Exception, match="dtype|Half|Float"):
        torch.compile(model, backend="rabit", options={"inductor": False})(torch.randn(2, 37, dtype=torch.float16))
