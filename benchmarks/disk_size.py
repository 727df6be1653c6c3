"""Size on disk of SmolLM2-135M-Instruct: fp16 safetensors of the original vs the RaBiT-quantized model saved
by ``rabit_compiler.save`` (fp32 and fp16 for the layers left in full precision), and a load round trip.

    python benchmarks/disk_size.py [--paths 2] [--rounds 0]

The quantization is data-free (the size does not depend on the fit); ``--rounds`` only changes the time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import rabit_compiler as rabit
from rabit_compiler.models import load_smollm2
from rabit_compiler.serialization import load, save


def _bytes(directory: Path, pattern: str) -> int:
    return sum(path.stat().st_size for path in directory.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=0, help="SVID rounds (size does not depend on it)")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    ids = tokenizer("The Prime Minister said on Tuesday that", return_tensors="pt")["input_ids"]
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        model.to(torch.float16).save_pretrained(root / "fp16")
        fp16 = _bytes(root / "fp16", "*.safetensors")
        model.to(torch.float32)
        rabit.quantize_(model, rabit.RaBiTConfig(paths=args.paths, rounds=args.rounds))
        started = time.perf_counter()
        save(model, root / "rabit-fp32")
        save_seconds = time.perf_counter() - started
        quantized_fp32 = _bytes(root / "rabit-fp32", "*.safetensors")
        save(model.to(torch.float16), root / "rabit-fp16")
        quantized_fp16 = _bytes(root / "rabit-fp16", "*.safetensors")
        started = time.perf_counter()
        loaded = load(root / "rabit-fp16")
        load_seconds = time.perf_counter() - started
        with torch.no_grad():
            same = torch.equal(model.float()(ids).logits, loaded.float()(ids).logits)
        linear_bytes = sum(b.numel() * b.element_size() for m in loaded.modules() if isinstance(m, rabit.RaBiTLinear)
                           for b in m.buffers())
    print(f"SmolLM2-135M-Instruct, k={args.paths} (data-free fit, rounds={args.rounds})")
    print(f"  fp16 original (save_pretrained, safetensors):        {fp16 / 1e6:8.1f} MB")
    print(f"  RaBiT, remaining layers fp32 (rabit.save):           {quantized_fp32 / 1e6:8.1f} MB")
    print(f"  RaBiT, remaining layers fp16 (rabit.save):           {quantized_fp16 / 1e6:8.1f} MB "
          f"({fp16 / quantized_fp16:.2f}x smaller than fp16)")
    print(f"  of which packed linears (signs + scales):            {linear_bytes / 1e6:8.1f} MB")
    print(f"  save {save_seconds:.2f} s, load {load_seconds:.2f} s (sha256 checked); same logits after load: {same}")


if __name__ == "__main__":
    main()
