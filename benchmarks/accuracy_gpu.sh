#!/usr/bin/env bash
# The QAT ablation at a GPU budget, in one run of about 9 minutes on one H100/H200: coupled RaBiT vs standard
# residual QAT on SmolLM2-135M, same init, same batches, same seed; results.json, the PPL curves and a Markdown
# table in $OUT (default benchmarks/out/accuracy_gpu).
#
#   bash benchmarks/accuracy_gpu.sh             # on the GPU (STEPS, BATCH, LR override the budget below)
#   bash benchmarks/accuracy_gpu.sh --dry-run   # the same command at a tiny budget on the CPU, to test the plumbing
#
# Budget: STEPS x BATCH x 512 tokens per method (default 1200 x 16 x 512 = 9.8 M), AdamW at the latent lr measured
# best on the CPU budget (3e-3); the whole run is limited to 540 s by `timeout` (the
# methods that finished by then stay in results.json). The model comes from the rabit cache
# (rabit_compiler.models.load_smollm2): it is 517 MB in fp32 (the GGUF it is made from, 93 MB), more than the
# device tool carries in one call (64 MiB), so it must be put in that cache on the GPU machine first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out/accuracy_gpu}"
mkdir -p "$out"
if [[ "${1:-}" == "--dry-run" ]]; then
    budget=(--steps 2 --batch-size 1 --seq-len 32 --eval-every 2 --calibration-windows 1 --eval-windows 1
            --diagnostics 0 --device cpu)
    limit=2400
else
    steps="${STEPS:-1200}"
    budget=(--steps "$steps" --batch-size "${BATCH:-16}" --seq-len 512 --eval-every $((steps / 4))
            --warmup-steps 50 --diagnostics 7 --device cuda)
    limit=540
fi
PYTHONUNBUFFERED=1 timeout "$limit" python benchmarks/accuracy.py --methods fp32 ptq standard rabit \
    --optimizer adamw --lr-latent "${LR:-3e-3}" --seed 0 "${budget[@]}" --out "$out" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
