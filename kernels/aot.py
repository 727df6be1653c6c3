"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, without a GPU, and what their cubins say.

:func:`compile_variants` compiles kernel variants (one dict each: ``kernel`` name, x ``dtype``, ``arch`` e.g. 89
or 90, ``constexprs``, ``num_warps``, ``num_stages``) with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` in subprocesses with ``TRITON_INTERPRET`` unset, spread over the CPU cores,
and returns per variant: registers and stack frame (``cuobjdump -res-usage``), local-memory instructions
(``LDL`` / ``STL``: spills), 128-bit global loads in the SASS, the contiguous int32 words per thread of every
sign-word load (from the TTGIR layouts) and the instruction mix of the hottest loop (:func:`loop_stats`).

Arguments are specialised the way the JIT specialises a typical LLM layer: pointers, N, K, the row strides and
the sibling bounds divisible by 16; M, R and W = ceil(K/32) not (e.g. K = 11008 gives W = 344), so the kernels'
own WORD_ALIGN hint must carry the alignment. Used by tests/test_kernel_aot.py and benchmarks/kernel_report.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

_SCALAR_TYPES = {"M": "i32", "N": "i32", "K": "i32", "W": "i32", "stride_xm": "i32", "stride_ym": "i32",
                 "bound0": "i32", "bound1": "i32", "bound2": "i32", "bound3": "i32", "bound4": "i32",
                 "segment_base": "i32", "R": "i32", "stride_src": "i32", "num_groups": "i32"}
_POINTER_TYPES = {"signs_ptr": "*i32", "row_scale_ptr": "*fp16", "col_scale_ptr": "*fp16", "packed_ptr": "*i32",
                  "lut_ptr": "*fp32"}
_X_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
# Arguments specialised as divisible by 16 (see the module docstring); M, W and R are not. The sibling segment
# bounds of LLM layers (q/k/v: 0, 4096, 5120, 6144) are, and so is num_groups (a multiple of 32 by construction).
_DIVISIBLE = {"x_ptr", "signs_ptr", "row_scale_ptr", "col_scale_ptr", "bias_ptr", "y_ptr", "lut_ptr", "num_groups",
              "N", "K", "stride_xm", "stride_ym", "bound0", "bound1", "bound2", "bound3", "bound4", "segment_base",
              "src_ptr", "packed_ptr", "stride_src"}
_MODULES = {"_rbl_gemv_kernel": "triton_gemv", "_rbl_gemm_kernel": "triton_gemv", "_rbl_lut_kernel": "triton_gemv",
            "_pack_signs_kernel": "triton_pack"}
#: SASS opcodes issued to the ALU pipe of sm_89 / sm_90 (64 lanes per SM per clock, CUDA C++ Programming Guide,
#: "Throughput of native arithmetic instructions": 32-bit bitwise ops, compares / selects, shifts, integer adds).
ALU_OPCODES = ("LOP3", "FSEL", "SEL", "ISETP", "SHF", "PLOP3", "LEA", "IADD3")
_WIDE_LOAD = re.compile(r"\b(LDG\.E(?:\.\w+)*\.128|LDGSTS\.E(?:\.\w+)*\.128)\b")


# --------------------------------------------------------------------------------------------- worker side


def cuobjdump_path() -> str | None:
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


def compile_variant(spec: dict) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module = importlib.import_module(f"rabit_compiler.kernels.{_MODULES[spec['kernel']]}")
    fn = getattr(module, spec["kernel"])
    if not isinstance(fn, JITFunction):  # imported under TRITON_INTERPRET=1 after all
        fn = JITFunction(fn.fn)
    constexprs = spec["constexprs"]
    x_type = _X_TYPES[spec["dtype"]]
    types = dict(_SCALAR_TYPES, **_POINTER_TYPES, x_ptr=x_type, bias_ptr=x_type, y_ptr=x_type, src_ptr=x_type)
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in _DIVISIBLE}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", spec["arch"], 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    cuobjdump = cuobjdump_path()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    wide = _WIDE_LOAD.findall(sass)
    return dict(
        spec,
        loop=loop_stats(sass),
        regs=int(re.search(r"REG:(\d+)", usage).group(1)),
        stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
        local_ops=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        wide_loads=len(wide),
        wide_kinds=sorted(set(wide)),
        sign_load_widths=_int32_load_vector_widths(compiled.asm["ttgir"]),
    )


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"^\s*0x([0-9a-f]+)")


def loop_stats(sass: str) -> dict:
    """Instruction mix of the largest loop (a backward ``BRA``) of the kernel in ``sass`` (cuobjdump output; for
    these kernels the K loop): ``instructions`` in its body and ``opcodes`` (base opcode -> count, e.g. LOP3,
    FSEL, FADD, HMMA, LDG)."""
    instructions = [(int(m.group(1), 16), m.group(3), m.group(4)) for line in sass.splitlines()
                    if (m := _SASS_LINE.search(line))]
    body: list[str] = []
    for offset, opcode, operands in instructions:
        target = _BRANCH_TARGET.match(operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < offset:
            loop = [op for at, op, _ in instructions if int(target.group(1), 16) <= at <= offset]
            body = loop if len(loop) > len(body) else body
    opcodes: dict[str, int] = {}
    for opcode in body:
        opcodes[opcode.split(".")[0]] = opcodes.get(opcode.split(".")[0], 0) + 1
    return {"instructions": len(body), "opcodes": dict(sorted(opcodes.items(), key=lambda kv: -kv[1]))}


def _worker(specs: list[dict]) -> list[dict]:
    return [compile_variant(spec) for spec in specs]


#: variants per worker subprocess (each compile takes seconds; a bounded chunk keeps every subprocess well
#: inside its time limit on a loaded machine, whatever the number of variants).
VARIANTS_PER_WORKER = 12


def compile_variants(specs: list[dict]) -> list[dict]:
    """Compile ``specs`` in subprocesses (TRITON_INTERPRET unset) of at most :data:`VARIANTS_PER_WORKER`
    variants, one running per CPU core (at most 8); results in spec order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    workers = max(1, min(len(specs), os.cpu_count() or 1, 8))
    chunks = [specs[i:i + VARIANTS_PER_WORKER] for i in range(0, len(specs), VARIANTS_PER_WORKER)]

    def run(chunk):
        proc = subprocess.run([sys.executable, "-m", "rabit_compiler.kernels.aot", "--worker"], input=json.dumps(chunk),
                              capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(workers) as pool:
        return [result for chunk_results in pool.map(run, chunks) for result in chunk_results]


def missing_toolchain() -> str | None:
    """Why AOT compilation cannot run here (no NVIDIA backend in triton, no cuobjdump or ptxas), or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton with the NVIDIA backend is not importable: {e}"
    if cuobjdump_path() is None:
        return "cuobjdump not found (neither triton's bundled copy nor on PATH)"
    from triton.backends.nvidia import compiler as nvidia_compiler

    try:
        ptxas = nvidia_compiler.get_ptxas(90).path if hasattr(nvidia_compiler, "get_ptxas") else None
    except Exception:  # noqa: BLE001
        ptxas = None
    if ptxas is not None and not os.path.exists(ptxas):
        return f"ptxas not found at {ptxas}"
    return None


def label(r: dict) -> str:
    """One line naming a compiled variant."""
    c = r["constexprs"]
    if r["kernel"] == "_pack_signs_kernel":
        return f"{r['kernel']} sm_{r['arch']} {r['dtype']} BR={c['BLOCK_R']} BW={c['BLOCK_W']} warps={r['num_warps']}"
    if r["kernel"] == "_rbl_lut_kernel":
        return (f"{r['kernel']} sm_{r['arch']} {r['dtype']} paths={c['NUM_PATHS']} BG={c['BLOCK_G']} "
                f"warps={r['num_warps']}")
    return (f"{r['kernel']} sm_{r['arch']} {r['dtype']} paths={c['NUM_PATHS']} S={c['NUM_SEGMENTS']} "
            f"BM={c['BLOCK_M']} BN={c['BLOCK_N']} BKW={c['BLOCK_KW']} warps={r['num_warps']} "
            f"stages={r['num_stages']}" + (f" LUT_BITS={c['LUT_BITS']}" if c.get("LUT_BITS") else "")
            + (" WORD_ALIGN=1" if r.get("unaligned") else ""))




if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        raise SystemExit("usage: python -m rabit_compiler.kernels.aot --worker  (JSON list of variants on stdin)")
    print(json.dumps(_worker(json.loads(sys.stdin.read()))))
