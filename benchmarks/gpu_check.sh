#!/usr/bin/env bash
# The one-command GPU check: on one H100/H200, in about 8 minutes, everything this project has only proven on CPU.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine; writes $OUT (default benchmarks/out/gpu_check)
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: the same steps with CPU stand-ins (CI runs this)
#
# Steps, each under its own time limit, each recorded (command, exit status, seconds, full output) in
# $OUT/gpu_check.md, the JSON results beside it:
#   1. the environment (GPU, driver, torch / triton / transformers versions) and an install of this checkout if
#      rabit_compiler is not importable (--no-deps: the GPU image brings torch and triton; nothing is downloaded);
#   2. the Triton kernel tests compiled on the GPU (RABIT_TEST_DEVICE=cuda): GEMV, GEMM, siblings, LUT, packing;
#   3. benchmarks/kernels.py with both GEMV inner loops (--lut-bits 0 and 4): GB/s against fp16 F.linear;
#   4. benchmarks/decode.py on the Llama-2-7B shapes (random weights): fp16 Inductor vs backend="rabit" decode.
# A failed step is recorded and the next one runs; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1
out="${OUT:-benchmarks/out/gpu_check}"
mkdir -p "$out"
report="$out/gpu_check.md"
failed=0

step() {  # step TITLE SECONDS COMMAND...
    local title="$1" limit="$2"
    shift 2
    local started rc
    started=$(date +%s.%N)
    { echo; echo "## $title"; echo; echo "\`$*\` (limit ${limit} s)"; echo; echo '```'; } >> "$report"
    timeout "$limit" "$@" >> "$report" 2>&1
    rc=$?
    echo '```' >> "$report"
    printf -- '- exit status %s, %.1f s\n' "$rc" "$(echo "$(date +%s.%N) - $started" | bc)" >> "$report"
    [[ $rc -ne 0 ]] && failed=$((failed + 1))
    echo "$title: exit $rc"
}

{
    echo "# GPU check$([[ $dry_run -eq 1 ]] && echo ' (DRY RUN: CPU stand-ins, no GPU figures)')"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$report"

step "environment" 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true;
    python -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__,
    \"cuda\", torch.cuda.is_available())"; python -c "import transformers; print(\"transformers\",
    transformers.__version__)" || echo "transformers missing: steps 2-4 need it"'
if ! python -c "import rabit_compiler.kernels" 2>/dev/null; then
    step "install this checkout" 120 python -m pip install -q --no-deps --no-build-isolation -e .
fi

tests=(tests/test_triton_kernels.py tests/test_triton_pack.py tests/test_op.py tests/test_op_siblings.py)
if [[ $dry_run -eq 1 ]]; then
    step "kernel tests (collected only)" 120 python -m pytest -q --co "${tests[@]}"
    step "kernels.py (arguments only)" 60 python benchmarks/kernels.py --help
    step "decode.py (tiny random model on CPU)" 300 python benchmarks/decode.py --tiny --new-tokens 4 \
        --variants fp-eager rabit-eager
else
    step "kernel tests on the GPU" 150 env RABIT_TEST_DEVICE=cuda python -m pytest -q -x -p no:cacheprovider \
        "${tests[@]}"
    step "kernels.py, GEMV select loop" 90 python benchmarks/kernels.py --lut-bits 0 --json "$out/kernels_lut0.json"
    step "kernels.py, GEMV lookup tables" 90 python benchmarks/kernels.py --lut-bits 4 --json "$out/kernels_lut4.json"
    step "decode.py, Llama-2-7B shapes" 180 python benchmarks/decode.py --model llama2-7b --new-tokens 64 \
        --variants fp-inductor rabit
fi
echo "$failed failed step(s); report: $report"
exit "$failed"
