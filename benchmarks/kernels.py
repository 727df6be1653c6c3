"""GPU timings of the packed residual-binary kernels against fp16 ``F.linear`` (cuBLAS), in one run.

    python benchmarks/kernels.py [--paths 2] [--prefill 128] [--lut-bits 0|4] [--json out.json]

Needs a CUDA device (exits with status 2 and a message otherwise; ``benchmarks/kernel_report.py`` is the static
report that runs anywhere). Every time is the median of ``triton.testing.do_bench``. It measures

* the device copy bandwidth: ``dst.copy_(src)`` of a 1 GiB tensor (2 GiB moved), the ceiling for the GB/s below;
* batch-1 GEMV and a ``--prefill``-row GEMM per layer shape ``W [N, K]`` (4096x4096, 4096x11008, 11008x4096,
  14336x4096): the Triton launcher and fp16 ``F.linear`` on the same x, with achieved GB/s on the bytes each
  actually moves (packed signs + scales + x + y for RaBiT; the fp16 weight + x + y for ``F.linear``);
* siblings: q/k/v (Llama-2-7B: 3 x 4096; Llama-3-8B: 4096 + 2 x 1024) and gate/up (2 x 11008, 2 x 14336) of
  K = 4096 at batch 1, one fused launch against one launch per sibling;
* the GPU pack kernel: seconds to pack a 4096 x 11008 x k sign source.

Each RaBiT result is checked against the dequantized fp32 weight before it is timed. ``--lut-bits`` forces the
batch-1 GEMV's inner loop (0: a select per sign bit, 4: nibble lookup tables, timed with their table kernel);
default: the launcher's choice. Run both to compare them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

LAYER_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (14336, 4096)]  # W [N, K]
SIBLING_GROUPS = {
    "q/k/v Llama-2-7B": [4096, 4096, 4096],
    "q/k/v Llama-3-8B": [4096, 1024, 1024],
    "gate/up Llama-2-7B": [11008, 11008],
    "gate/up Llama-3-8B": [14336, 14336],
}
SIBLING_K = 4096


def _median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth_gbs(device: torch.device) -> float:
    """GB/s of ``dst.copy_(src)`` on 1 GiB (read + write counted)."""
    src = torch.empty(2**29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def random_packed(num_paths: int, out_features: int, in_features: int, device: torch.device):
    """Packed signs (packed on the GPU), fp16 scales: ``(packed_signs, row_scale, col_scale)``."""
    from rabit_compiler.kernels import pack_signs

    signs = torch.randn(num_paths, out_features, in_features, device=device, dtype=torch.float16)
    packed_signs = pack_signs(signs)
    row_scale = (torch.rand(num_paths, out_features, device=device) * 0.02).half()
    col_scale = (torch.rand(num_paths, in_features, device=device) + 0.5).half()
    return packed_signs, row_scale, col_scale


def dequantized(packed_signs, row_scale, col_scale, in_features: int) -> torch.Tensor:
    from rabit_compiler.kernels import unpack_signs

    signs = unpack_signs(packed_signs, in_features, torch.float32)
    return (row_scale.float()[:, :, None] * signs * col_scale.float()[:, None, :]).sum(0)


def _check(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    expected = x.float() @ weight.T
    error = (out.float() - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    if error > 2e-2:
        raise AssertionError(f"kernel result off by {error:.3g} (relative to max |y|)")
    return error


def bench_layer(num_rows: int, out_features: int, in_features: int, num_paths: int, device,
                lut_bits: int | None = None) -> dict:
    from rabit_compiler.kernels.triton_gemv import GEMV_MAX_ROWS, choose_config, residual_binary_linear_triton

    lut_bits = lut_bits if num_rows <= GEMV_MAX_ROWS else None  # an option of the GEMV only

    packed_signs, row_scale, col_scale = random_packed(num_paths, out_features, in_features, device)
    x = torch.randn(num_rows, in_features, device=device, dtype=torch.float16)
    out = torch.empty(num_rows, out_features, device=device, dtype=torch.float16)
    weight = dequantized(packed_signs, row_scale, col_scale, in_features)
    weight_fp16 = weight.half()
    error = _check(residual_binary_linear_triton(x, packed_signs, row_scale, col_scale, None, in_features,
                                                 lut_bits=lut_bits), x, weight)
    rabit_ms = _median_ms(lambda: residual_binary_linear_triton(x, packed_signs, row_scale, col_scale, None,
                                                                in_features, out=out, lut_bits=lut_bits))
    fp16_ms = _median_ms(lambda: F.linear(x, weight_fp16))
    io_bytes = 2 * num_rows * (in_features + out_features)
    rabit_bytes = (packed_signs.numel() * 4 + (row_scale.numel() + col_scale.numel()) * 2) + io_bytes
    fp16_bytes = weight_fp16.numel() * 2 + io_bytes
    major, minor = torch.cuda.get_device_capability(device)
    cfg = choose_config(num_rows, num_paths, x.dtype, arch=10 * major + minor, lut_bits=lut_bits)
    return dict(rows=num_rows, N=out_features, K=in_features, paths=num_paths,
                kernel=cfg.kernel + (" LUT" if cfg.lut_bits else ""),
                rabit_ms=rabit_ms, fp16_ms=fp16_ms, speedup=fp16_ms / rabit_ms,
                rabit_gbs=rabit_bytes / (rabit_ms * 1e-3) / 1e9, fp16_gbs=fp16_bytes / (fp16_ms * 1e-3) / 1e9,
                rabit_tflops=2 * num_rows * out_features * in_features / (rabit_ms * 1e-3) / 1e12,
                fp16_tflops=2 * num_rows * out_features * in_features / (fp16_ms * 1e-3) / 1e12,
                max_rel_error=error)


def bench_siblings(name: str, out_features: list[int], num_paths: int, device, lut_bits: int | None = None) -> dict:
    from rabit_compiler.kernels.triton_gemv import residual_binary_linear_siblings_triton, residual_binary_linear_triton

    packed_signs, row_scale, _ = random_packed(num_paths, sum(out_features), SIBLING_K, device)
    col_scale = (torch.rand(len(out_features), num_paths, SIBLING_K, device=device) + 0.5).half()
    x = torch.randn(1, SIBLING_K, device=device, dtype=torch.float16)
    out = torch.empty(1, sum(out_features), device=device, dtype=torch.float16)
    starts = [0]
    for size in out_features:
        starts.append(starts[-1] + size)
    members = [(packed_signs[:, a:b].contiguous(), row_scale[:, a:b].contiguous(), col_scale[s].contiguous(),
                out[:, a:b].clone()) for s, (a, b) in enumerate(zip(starts, starts[1:], strict=True))]
    fused = residual_binary_linear_siblings_triton(x, packed_signs, row_scale, col_scale, None, SIBLING_K,
                                                   out_features, lut_bits=lut_bits)
    for s, (a, b) in enumerate(zip(starts, starts[1:], strict=True)):
        weight = dequantized(members[s][0], members[s][1], members[s][2], SIBLING_K)
        _check(fused[:, a:b], x, weight)

    def separate():
        for signs, rows, cols, part in members:
            residual_binary_linear_triton(x, signs, rows, cols, None, SIBLING_K, out=part, lut_bits=lut_bits)

    fused_ms = _median_ms(lambda: residual_binary_linear_siblings_triton(
        x, packed_signs, row_scale, col_scale, None, SIBLING_K, out_features, out=out, lut_bits=lut_bits))
    separate_ms = _median_ms(separate)
    return dict(group=name, out_features=out_features, paths=num_paths, fused_ms=fused_ms, separate_ms=separate_ms,
                speedup=separate_ms / fused_ms)


def bench_pack(num_paths: int, device) -> dict:
    from rabit_compiler.kernels import pack_signs

    signs = torch.randn(num_paths, 4096, 11008, device=device, dtype=torch.float16)
    ms = _median_ms(lambda: pack_signs(signs))
    return dict(shape=[num_paths, 4096, 11008], pack_ms=ms,
                gbs=(signs.numel() * 2 + signs.numel() // 8) / (ms * 1e-3) / 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=2, help="sign planes k (default 2)")
    parser.add_argument("--prefill", type=int, default=128, help="rows of the prefill GEMM (default 128)")
    parser.add_argument("--lut-bits", type=int, choices=(0, 4), default=None,
                        help="batch-1 GEMV inner loop: 0 = select per bit, 4 = lookup tables (default: launcher's)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False). "
              "Run benchmarks/kernel_report.py for the static report.", file=sys.stderr)
        return 2
    import triton
    from tqdm import tqdm

    device = torch.device("cuda")
    torch.manual_seed(0)
    results = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__,
                   copy_gbs=copy_bandwidth_gbs(device), layers=[], siblings=[])
    print(f"device {results['device']}, torch {torch.__version__}, triton {triton.__version__}; "
          f"measured copy bandwidth {results['copy_gbs']:.0f} GB/s")
    jobs = [(rows, n, k) for rows in (1, args.prefill) for n, k in LAYER_SHAPES]
    for rows, n, k in tqdm(jobs, desc="layers"):
        results["layers"].append(bench_layer(rows, n, k, args.paths, device, args.lut_bits))
    for name, out_features in tqdm(SIBLING_GROUPS.items(), desc="siblings"):
        results["siblings"].append(bench_siblings(name, out_features, args.paths, device, args.lut_bits))
    results["pack"] = bench_pack(args.paths, device)

    print(f"\n| rows | W [N, K] | kernel | RaBiT k={args.paths} ms | fp16 F.linear ms | speedup | RaBiT GB/s "
          "(% of copy) | fp16 GB/s | RaBiT TFLOP/s | fp16 TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["layers"]:
        print(f"| {r['rows']} | {r['N']}x{r['K']} | {r['kernel']} | {r['rabit_ms']:.4f} | {r['fp16_ms']:.4f} | "
              f"{r['speedup']:.2f}x | {r['rabit_gbs']:.0f} ({100 * r['rabit_gbs'] / results['copy_gbs']:.0f}%) | "
              f"{r['fp16_gbs']:.0f} | {r['rabit_tflops']:.1f} | {r['fp16_tflops']:.1f} |")
    print("\n| siblings (K = 4096, batch 1) | N per sibling | fused ms | separate launches ms | fused speedup |")
    print("|---|---|---|---|---|")
    for r in results["siblings"]:
        print(f"| {r['group']} | {r['out_features']} | {r['fused_ms']:.4f} | {r['separate_ms']:.4f} | "
              f"{r['speedup']:.2f}x |")
    pack = results["pack"]
    print(f"\nGPU pack of {pack['shape']} fp16 signs: {pack['pack_ms']:.3f} ms ({pack['gbs']:.0f} GB/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
