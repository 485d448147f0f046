#!/usr/bin/env bash
# The CPU measurements behind the README's performance section (a few minutes on 2 cores, most of it
# AOTInductor compiling the engines once). Results: benchmarks/results/cpu-*.json (+ .png), then
# `python benchmarks/table.py benchmarks/results/cpu-*.json` prints the README tables.
#
#   bash benchmarks/cpu.sh            # uses the python on PATH (e.g. the project's .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
if [ -z "${ENGINES:-}" ]; then  # engines (and the random checkpoint): set ENGINES to keep and reuse them
    ENGINES=$(mktemp -d)
    trap 'rm -rf "$ENGINES"' EXIT
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# the built-in tiny-random checkpoint (WanConfig.tiny() with random weights, written on the spot; the
# shipped trained `tiny` has a wider DiT): every backend, the default bench size
$PY -m wanrt.bench --ckpt_dir tiny-random --size '64*48' --frame_num 9 --backends eager,onnxruntime,aoti,tensorrt \
    --what dit_step --repeat 20 --warmup 2 --engine_dir "$ENGINES/tiny" \
    --json "$OUT/cpu-tiny.json" --plot "$OUT/cpu-tiny.png"

# the mid-size random config (~55M-parameter DiT, 768 tokens): per-step time of each backend
$PY -m wanrt.bench --ckpt_dir random:small --size '256*256' --frame_num 9 \
    --backends eager,onnxruntime,aoti,tensorrt --what dit_step --repeat 8 --warmup 1 \
    --engine_dir "$ENGINES/small" --json "$OUT/cpu-small.json" --plot "$OUT/cpu-small.png"

$PY benchmarks/table.py "$OUT/cpu-tiny.json" "$OUT/cpu-small.json"
