#!/usr/bin/env bash
# Every GPU check and measurement behind the README, in ONE call that fits a short device lease (10 minutes
# a command, 15 minutes a session; this script: < 8 minutes). Steps, most important first, each under a
# timeout computed from what is left of the budget, so a slow or failing step never costs the ones after it:
#   1. benchmarks/gpu_precision.py --parts steps: full 40-block CFG steps (random 14B weights, 1280*720 x 81
#      = 75,600 tokens, batch 2): eager, fp8 GEMMs, fp8 + 8-bit attention + our norm kernels, `wanrt bench`
#      JSON with s/step and error vs eager (dit-step.json, rewritten after each row); then 8-block steps with
#      every row between (exact fusion, fp8, + sage, + triton: dit-step-8-blocks.json);
#   2. the GPU tests (every test marked gpu): Triton kernels on real launches, torch.compile, CUDA graph
#      replay (cached steps too), FP8 _scaled_mm vs its CPU emulation, the one-pass FP8 quantisation kernel;
#   3. --parts attention,profile: attention at the real shape (cuDNN SDPA, our bf16 flash, our 8-bit sage)
#      and the per-op-class profile of a 2-block full-width step (eager, fp8 + fused + sage);
#   4. --parts gemm: the GEMMs at the real shapes (M = 151,200; bf16 vs _scaled_mm tensor-wise / row-wise,
#      fast accumulation or not, quantisation included);
#   5. regional torch.compile of the blocks (eager, fused, fused + compiled) on the small random config at the
#      full token count;
#   6. AOTInductor vs eager (bf16 reference, eager+fp8, aoti fp8) on the small random config at the full
#      token count (a 40-block 14B package does not compile within this budget);
#   7. the whole pipeline on CUDA with the trained tiny model: every runtime option vs the fp32 CUDA video;
#   8. the attention kernels' tile sweep (benchmarks/gpu_attention_sweep.py).
# Results go to $OUT (the folder that comes back from the device machine) or benchmarks/results/<gpu>-<date>.
#
# Needs a Python with CUDA torch and wanrt's dependencies (pip install -e '.[export,kernels]');
# PYTHON picks it, PYTHONPATH gets this tree so the checkout runs without installing. The device machines'
# image lacks ftfy (T5's prompt cleaning; step 7 needs it): fetch it here once as wheels,
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ftfy wcwidth      (.whl/ is git-ignored)
# and name .whl in the device call's carry: this script installs what it finds there into /tmp/wanrt-site.
#
#   bash benchmarks/gpu_all.sh                    # BUDGET=470 seconds by default
#   ONLY=gpu-aoti-small-720p,gpu-pipeline bash benchmarks/gpu_all.sh    # a second call: the steps a first one
#                                                 # did not reach (names as in the '== NAME' lines)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
GPU_SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
    | sed -E 's/nvidia//; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
OUT=${OUT:-benchmarks/results/${GPU_SLUG:-gpu}-$(date +%F)}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
if ! $PY -c "import ftfy" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/wanrt-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/wanrt-site"
fi

left() {  # seconds of budget left, capped at $1
    local rest=$(( BUDGET - ($(date +%s) - START) ))
    (( rest > $1 )) && rest=$1
    echo $(( rest > 0 ? rest : 0 ))
}

step() {  # step NAME CAP CMD...: run CMD under min(CAP, budget left); log to $OUT/NAME.log
    local name=$1 cap=$2; shift 2
    if [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]]; then
        return
    fi
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


# the 40-block step: the reference, the FP8 GEMMs, and everything (these three rows: 156 s on an H200);
# the 8-block step: every row, each transform's own share (61 s)
step gpu-dit-steps 200 $PY benchmarks/gpu_precision.py --parts steps --out "$OUT" \
    --variants eager,eager+fused+fp8,eager+fused+fp8+sage+triton

# every test marked gpu (the files that hold one; the TensorRT test skips with its reason): 83 tests, ~130 s
# on an H200 (test_kernels.py's 75 take ~110 s; 120 s cut the rest on 2026-12-04)
step gpu-tests 170 $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_runtime.py \
    tests/test_precision.py tests/test_triton_quant.py tests/test_cache.py tests/test_build.py

step gpu-dit-steps-8 90 $PY benchmarks/gpu_precision.py --parts steps --layers 8 --out "$OUT"

step gpu-attention-profile 80 $PY benchmarks/gpu_precision.py --parts attention,profile --out "$OUT"

# its own process: a _scaled_mm fault (e.g. pytorch#133334, row-wise with M % 256 != 0) cannot take others down
step gpu-gemm 50 $PY benchmarks/gpu_precision.py --parts gemm --out "$OUT"

# the issue's other exact-fusion route: Inductor fusing each block's elementwise work (regional compile), at the
# full token count on the small random config (a 14B block compiles in about a minute: too long for this lease)
step gpu-compiled-small-720p 70 $PY -m wanrt.bench --ckpt_dir random:small --size '1280*720' --frame_num 81 \
    --backends eager,eager+fused,eager+fused+compiled --what dit_step --repeat 3 --warmup 1 \
    --json "$OUT/gpu-compiled-small-720p.json"

step gpu-aoti-small-720p 150 $PY -m wanrt.bench --ckpt_dir random:small --size '1280*720' --frame_num 81 \
    --backends eager,aoti --precision fp8 --what dit_step --repeat 2 --warmup 1 --json "$OUT/gpu-aoti-small-720p.json"

if ! $PY -c "import ftfy" 2>/dev/null; then
    echo "== gpu-pipeline: skipped: ftfy is not importable (carry it as wheels, see the header)" \
        | tee "$OUT/gpu-pipeline.log"
else
    step gpu-pipeline 80 $PY benchmarks/gpu_pipeline.py --json "$OUT/gpu-pipeline.json"
fi

# tile configs of our attention kernels at the 14B shape (how sage's defaults were picked; H100 and H200 may differ)
step gpu-attention-sweep 120 $PY benchmarks/gpu_attention_sweep.py --budget 100 --json "$OUT/attention-sweep.json"

for f in "$OUT"/dit-step.json "$OUT"/profile-2-blocks.json "$OUT"/gpu-compiled-small-720p.json \
        "$OUT"/gpu-aoti-small-720p.json; do
    [ -f "$f" ] && $PY benchmarks/table.py "$f"
done
echo "== done in $(( $(date +%s) - START ))s"
