#!/usr/bin/env bash
# Every GPU check and measurement behind the README, in ONE call that fits a short device lease (10 minutes
# a command, 15 minutes a session). Steps, most important first, each under a timeout computed from what
# is left of the budget, so a slow or failing step never costs the ones after it:
#   1. the GPU tests (pytest -m gpu): Triton kernels on real launches, torch.compile, CUDA graph replay;
#   2. the whole pipeline on CUDA with the trained tiny model: every runtime option vs the fp32 CPU video
#      (benchmarks/gpu_pipeline.py);
#   3. the full-size DiT CFG step (random 14B weights, 1280*720 x 81 = 75,600 tokens, batch 2), eager bf16;
#   4. the Triton kernels vs PyTorch at the 14B attention shapes (benchmarks/gpu_kernels.py);
#   5. the small random config at the full token count, eager vs an AOTInductor package built on the spot.
# Results go to $OUT (the folder that comes back from the device machine) or benchmarks/results.
#
# Needs a Python with CUDA torch and wanrt's dependencies (pip install -e '.[export,kernels]');
# PYTHON picks it, PYTHONPATH gets this tree so the checkout runs without installing.
#
#   bash benchmarks/gpu_all.sh                    # BUDGET=470 seconds by default
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)

left() {  # seconds of budget left, capped at $1
    local rest=$(( BUDGET - ($(date +%s) - START) ))
    (( rest > $1 )) && rest=$1
    echo $(( rest > 0 ? rest : 0 ))
}

step() {  # step NAME CAP CMD...: run CMD under min(CAP, budget left); log to $OUT/NAME.log
    local name=$1 cap=$2; shift 2
    local limit; limit=$(left "$cap")
    if (( limit < 30 )); then
        echo "== $name: skipped, only ${limit}s of the budget left" | tee "$OUT/$name.log"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s in total"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step gpu-tests 120 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_runtime.py

step gpu-pipeline 80 $PY benchmarks/gpu_pipeline.py --json "$OUT/gpu-pipeline.json"

step gpu-14b-dit-step 170 $PY -m wanrt.bench --ckpt_dir random:flf2v-14b --size '1280*720' --frame_num 81 \
    --backends eager --what dit_step --repeat 1 --warmup 1 --json "$OUT/gpu-14b-dit-step.json"

step gpu-kernels 110 $PY benchmarks/gpu_kernels.py

step gpu-small-720p 240 $PY -m wanrt.bench --ckpt_dir random:small --size '1280*720' --frame_num 81 \
    --backends eager,aoti --what dit_step --repeat 2 --warmup 1 --json "$OUT/gpu-small-720p.json"

for f in "$OUT"/gpu-14b-dit-step.json "$OUT"/gpu-small-720p.json; do
    [ -f "$f" ] && $PY benchmarks/table.py "$f"
done
echo "== done in $(( $(date +%s) - START ))s"
