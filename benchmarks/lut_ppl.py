"""Perplexity cost of the CPU kernels' int8 arithmetic: SmolLM2-135M packed once, evaluated four ways.

    python benchmarks/lut_ppl.py                     # ~10 min on 2 cores

``quantize_`` (default RaBiTConfig: k = 2, 10 SVID rounds) with the first 16 x 512-token windows of
lee_background.cor as calibration; held-out perplexity on lee.cor (9 x 512 tokens) of the same packed model with
every packed linear computed by

* ``reference``: the op's float reference (unpack + one matmul per path, fp32 accumulation);
* ``lut-fp32``: ``rabit::lut_gemv`` with fp32 tables (exact mode);
* ``lut-int8``: ``rabit::lut_gemv`` with int8 tables (one scale per 32 columns);
* ``lut-int8+head-int8x``: that, and the weight-only int8 head's kernel with int8 activations (one scale per 32
  columns), what ``backend="rabit"`` with ``options={"cpu_tables": "int8"}`` decodes with.

The kernels run on every row of every window here (the backend uses it for at most 32 rows: decode): a token's
result does not depend on the other rows, so this is the PPL that decoding with the kernel gives. Also printed: the
fp32 model's PPL, and the largest relative difference of each mode's logits from the reference's on one window.
"""

from __future__ import annotations

import argparse

import torch
from rabit_compiler.kernels.cpu_lut import lut_linear_siblings
from rabit_compiler.kernels.weight_only import KERNEL_MAX_ROWS, weight_only_linear_kernel

import rabit_compiler as rabit
from rabit_compiler.data import lee_corpus, token_windows
from rabit_compiler.evaluate import perplexity
from rabit_compiler.head import WeightOnlyLinear
from rabit_compiler.models import load_smollm2

MODES = ("reference", "lut-fp32", "lut-int8", "lut-int8+head-int8x")


def use_mode(mode: str) -> None:
    """Route every ``RaBiTLinear`` through ``mode`` (the class's own forward for ``reference``)."""
    WeightOnlyLinear.forward = head_int8x_forward if mode.endswith("head-int8x") else HEAD_REFERENCE_FORWARD
    if mode == "reference":
        rabit.RaBiTLinear.forward = REFERENCE_FORWARD
        return
    tables = mode.removeprefix("lut-").removesuffix("+head-int8x")

    def forward(self: rabit.RaBiTLinear, x: torch.Tensor) -> torch.Tensor:
        return lut_linear_siblings(x, self.packed_signs, self.row_scale, self.col_scale.unsqueeze(0), self.bias,
                                   self.in_features, [self.out_features], tables)

    rabit.RaBiTLinear.forward = forward


REFERENCE_FORWARD = rabit.RaBiTLinear.forward
HEAD_REFERENCE_FORWARD = WeightOnlyLinear.forward


def head_int8x_forward(self: WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """The head's decode kernel with int8 activations on every row (in chunks of the rows it takes)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.cat([weight_only_linear_kernel(chunk, self.qweight, self.scale, self.bias, self.bits, self.group_size,
                                               self.in_features, int8_activations=True)
                     for chunk in rows.split(KERNEL_MAX_ROWS)])
    return out.reshape(*x.shape[:-1], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--heldout-windows", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    train_text, heldout_text = lee_corpus()
    heldout = token_windows(tokenizer, heldout_text, 512, max_windows=args.heldout_windows)
    calibration = token_windows(tokenizer, train_text, 512, max_windows=args.calibration_windows)
    print(f"fp32 model: held-out PPL {perplexity(model, heldout, progress=False):.4f} "
          f"({heldout.shape[0]} x {heldout.shape[1]} tokens)", flush=True)
    report = rabit.quantize_(model, rabit.RaBiTConfig(), calibration=calibration)
    print(f"packed {len(report.quantized)} linears (k=2, calibration {calibration.shape[0]} x 512)", flush=True)
    logits = {}
    for mode in MODES:
        use_mode(mode)
        with torch.no_grad():
            logits[mode] = model(heldout[:1]).logits
        ppl = perplexity(model, heldout, batch_size=1, progress=False)
        difference = ((logits[mode] - logits["reference"]).abs().max() / logits["reference"].abs().max()).item()
        print(f"{mode}: held-out PPL {ppl:.4f}; max |logits - reference| / max |reference| on window 0: "
              f"{difference:.3g}", flush=True)
    use_mode("reference")


if __name__ == "__main__":
    main()
