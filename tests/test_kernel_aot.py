"""Ahead-of-time compilation of every Triton kernel variant the launcher can pick, for sm_89 and sm_90, without a GPU.

For each variant (:func:`rabit_compiler.kernels.triton_gemv.launch_configs`) and architecture this compiles the
kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, reads the cubin's resource
usage (``cuobjdump -res-usage``) and SASS (``cuobjdump -sass``), and asserts

* no register spills: no local-memory instructions (``LDL`` / ``STL``) and a zero stack frame;
* 16-byte loads of the sign planes: the layout Triton gave every int32 (sign word) load keeps 4 contiguous words
  in a thread, and the SASS holds 128-bit global loads (``LDG.E.128`` or, for loads pipelined through shared
  memory, ``LDGSTS.E.BYPASS.128``); for one GEMV and one GEMM variant, compiling with ``WORD_ALIGN=1`` (sign rows
  not known to be 16-byte aligned) must remove 128-bit loads, which ties them to the sign planes.

Arguments are specialised the way the JIT specialises a typical LLM layer: pointers, N, K and the row strides
divisible by 16; M and W = ceil(K/32) not (e.g. K = 11008 gives W = 344), so the kernels' own WORD_ALIGN hint
must carry the alignment. The compiles run in subprocesses with TRITON_INTERPRET unset (the interpreter tests
set it in this process), spread over the CPU cores. Skips cleanly without cuobjdump or a CUDA-capable triton.

Run ``python tests/test_kernel_aot.py [--full]`` for the table of registers, spills and load widths per variant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

ARCHS = (89, 90)
_SCALAR_TYPES = {"M": "i32", "N": "i32", "K": "i32", "W": "i32", "stride_xm": "i32", "stride_ym": "i32"}
_POINTER_TYPES = {"signs_ptr": "*i32", "row_scale_ptr": "*fp16", "col_scale_ptr": "*fp16"}
_X_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
# Arguments specialised as divisible by 16 (see the module docstring); M and W are not.
_DIVISIBLE = {"x_ptr", "signs_ptr", "row_scale_ptr", "col_scale_ptr", "bias_ptr", "y_ptr", "N", "K",
              "stride_xm", "stride_ym"}
_WIDE_LOAD = re.compile(r"\b(LDG\.E(?:\.\w+)*\.128|LDGSTS\.E(?:\.\w+)*\.128)\b")


# --------------------------------------------------------------------------------------------- worker side


def _cuobjdump() -> str | None:
    import shutil

    import triton

    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - older triton: no knobs, look in the usual places
        pass
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _int32_load_vector_widths(ttgir: str) -> list[int]:
    """Contiguous int32 elements per thread of every global load of int32 (the sign words) in a TTGIR module."""
    layouts = {}
    for name, body in re.findall(r"^(#\w+) = #ttg\.blocked<\{(.*?)\}>", ttgir, re.M):
        size = [int(v) for v in re.search(r"sizePerThread = \[([\d, ]+)\]", body).group(1).split(",")]
        order = [int(v) for v in re.search(r"order = \[([\d, ]+)\]", body).group(1).split(",")]
        layouts[name] = size[order[0]]
    widths = []
    for line in ttgir.splitlines():
        if ("tt.load" in line or "async_copy_global_to_local" in line) and "!tt.ptr<i32>" in line:
            layout = re.search(r"!tt\.ptr<i32>, (#\w+)>", line)
            widths.append(layouts.get(layout.group(1), 1) if layout else 1)
    return widths


def _compile_one(spec: dict) -> dict:
    import triton
    from rabit_compiler.kernels import triton_gemv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(triton_gemv, spec["kernel"])
    if not isinstance(fn, JITFunction):  # imported under TRITON_INTERPRET=1 after all
        fn = JITFunction(fn.fn)
    constexprs = spec["constexprs"]
    x_type = _X_TYPES[spec["dtype"]]
    types = dict(_SCALAR_TYPES, **_POINTER_TYPES, x_ptr=x_type, bias_ptr=x_type, y_ptr=x_type)
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in _DIVISIBLE}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", spec["arch"], 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    cuobjdump = _cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    wide = _WIDE_LOAD.findall(sass)
    return dict(
        spec,
        regs=int(re.search(r"REG:(\d+)", usage).group(1)),
        stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
        local_ops=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        wide_loads=len(wide),
        wide_kinds=sorted(set(wide)),
        sign_load_widths=_int32_load_vector_widths(compiled.asm["ttgir"]),
    )


def _worker(specs: list[dict]) -> list[dict]:
    return [_compile_one(spec) for spec in specs]


# --------------------------------------------------------------------------------------------- test side


def _full_matrix() -> bool:
    return os.environ.get("RABIT_AOT_FULL") == "1" or os.environ.get("RABIT_HYPOTHESIS_PROFILE") == "thorough"


def _in_default_subset(dtype: str, constexprs: dict) -> bool:
    """Every tile configuration in fp16 except three paths (the tiles of four, with one plane masked); bf16 and
    fp32 for two paths and the decode tiles only (the same loads and tile shapes; only x's element type changes).
    The full matrix (about 95 s on 2 idle cores, against about 40) with RABIT_AOT_FULL=1 or the "thorough"
    hypothesis profile."""
    if dtype == "float16":
        return constexprs["NUM_PATHS"] != 3
    return constexprs["NUM_PATHS"] == 2 and constexprs["BLOCK_M"] in (1, 16)


def _specs(full: bool | None = None) -> list[dict]:
    from rabit_compiler.kernels.triton_gemv import launch_configs

    full = _full_matrix() if full is None else full
    specs = []
    for arch in ARCHS:
        for cfg in launch_configs(arch):
            dtype = str(cfg["dtype"]).removeprefix("torch.")
            if not full and not _in_default_subset(dtype, cfg["constexprs"]):
                continue
            specs.append(dict(kernel=cfg["kernel"], dtype=dtype, arch=arch,
                              constexprs=cfg["constexprs"], num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"]))
    # The differential check: the same GEMV / GEMM variant with sign rows not known to be 16-byte aligned.
    for arch in ARCHS:
        for kernel, block_m, block_n in (("_rbl_gemv_kernel", 1, 64), ("_rbl_gemm_kernel", 16, 128)):
            base = next(s for s in specs if s["kernel"] == kernel and s["arch"] == arch and s["dtype"] == "float16"
                        and s["constexprs"]["NUM_PATHS"] == 2 and s["constexprs"]["BLOCK_M"] == block_m)
            assert base["constexprs"]["BLOCK_N"] == block_n
            specs.append(dict(base, constexprs=dict(base["constexprs"], WORD_ALIGN=1), unaligned=True))
    return specs


def _run_all(specs: list[dict]) -> list[dict]:
    """Compile ``specs`` in subprocesses (TRITON_INTERPRET unset), one per CPU core; results in spec order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    workers = max(1, min(len(specs), os.cpu_count() or 1, 8))
    chunks = [specs[i::workers] for i in range(workers)]

    def run(chunk):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], input=json.dumps(chunk),
                              capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, chunks))
    merged = [None] * len(specs)
    for w, chunk_results in enumerate(results):
        for j, result in enumerate(chunk_results):
            merged[w + j * workers] = result
    return merged


def _toolchain_or_skip():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton with the NVIDIA backend is not importable: {e}")
    if _cuobjdump() is None:
        pytest.skip("cuobjdump not found (neither triton's bundled copy nor on PATH)")
    from triton.backends.nvidia import compiler as nvidia_compiler

    try:
        ptxas = nvidia_compiler.get_ptxas(90).path if hasattr(nvidia_compiler, "get_ptxas") else None
    except Exception:  # noqa: BLE001
        ptxas = None
    if ptxas is not None and not os.path.exists(ptxas):
        pytest.skip(f"ptxas not found at {ptxas}")


@pytest.fixture(scope="module")
def aot_results():
    _toolchain_or_skip()
    return _run_all(_specs())


def _label(r: dict) -> str:
    c = r["constexprs"]
    return (f"{r['kernel']} sm_{r['arch']} {r['dtype']} paths={c['NUM_PATHS']} BM={c['BLOCK_M']} BN={c['BLOCK_N']} "
            f"BKW={c['BLOCK_KW']} warps={r['num_warps']}" + (" WORD_ALIGN=1" if r.get("unaligned") else ""))


def test_every_variant_compiles_without_spills(aot_results):
    spilled = [f"{_label(r)}: regs {r['regs']}, stack {r['stack']}, {r['local_ops']} LDL/STL"
               for r in aot_results if r["stack"] or r["local_ops"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_sign_planes_use_128_bit_loads(aot_results):
    bad = []
    for r in aot_results:
        if r.get("unaligned"):
            continue
        if not r["sign_load_widths"] or min(r["sign_load_widths"]) < 4:
            bad.append(f"{_label(r)}: int32 load layouts hold {r['sign_load_widths']} contiguous words per thread")
        if not r["wide_loads"]:
            bad.append(f"{_label(r)}: no 128-bit global load in the SASS")
    assert not bad, "\n".join(bad)


def test_128_bit_loads_belong_to_the_sign_planes(aot_results):
    for unaligned in (r for r in aot_results if r.get("unaligned")):
        aligned = next(r for r in aot_results if not r.get("unaligned") and r["kernel"] == unaligned["kernel"]
                       and r["arch"] == unaligned["arch"] and r["dtype"] == unaligned["dtype"]
                       and r["constexprs"] == dict(unaligned["constexprs"], WORD_ALIGN=4))
        assert max(unaligned["sign_load_widths"]) < 4, _label(unaligned)
        assert unaligned["wide_loads"] < aligned["wide_loads"], (
            f"{_label(aligned)}: {aligned['wide_loads']} 128-bit loads, {unaligned['wide_loads']} without the "
            "sign-row alignment: the 128-bit loads are not the sign words")


def _print_table(results: list[dict]) -> None:
    for r in results:
        print(f"{_label(r):95s} regs {r['regs']:3d} stack {r['stack']:4d} LDL/STL {r['local_ops']:3d} "
              f"sign words/thread {r['sign_load_widths']} 128-bit loads {r['wide_loads']} {r['wide_kinds']}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        print(json.dumps(_worker(json.loads(sys.stdin.read()))))
    else:
        import time

        start = time.time()
        _print_table(_run_all(_specs(full="--full" in sys.argv)))
        print(f"{time.time() - start:.1f} s")
