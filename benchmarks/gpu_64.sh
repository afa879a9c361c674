#!/usr/bin/env bash
# The flow-vs-monolithic benchmark on the full 64-layer Qwen3.6-27B-shaped checkpoint (54 GB BF16),
# on one GPU machine, in parts that each fit one command of at most 10 minutes. Run from the
# repository root; each command must start within 30 s of the previous one's end (the machine,
# /dev/shm and the workdir stay only while it stays up):
#
#   command 1: bash benchmarks/gpu_setup.sh .whl/a && bash benchmarks/gpu_64.sh "$OUT" build+monolithic
#   command 2: bash benchmarks/gpu_setup.sh .whl/b && bash benchmarks/gpu_64.sh "$OUT" flow
#   command 3: bash benchmarks/gpu_64.sh "$OUT" budget+report
#
# Parts (join them with '+', in this order):
#   build       the checkpoint (benchmarks.build_model --fill pool) in BENCH_MODEL_DIR (default
#               /dev/shm/q27b; when that tmpfs is too small it is remounted larger (root), else the
#               checkpoint goes to the workdir's disk if the disk can hold it and one export) and
#               the corpora; ModelOpt's FP8 extension is built meanwhile. Needs set a only.
#   monolithic  stages warmup (on a BENCH_WARMUP_LAYERS-layer checkpoint at the same widths, so
#               Triton's kernel cache is warm for the baseline and the flow alike), floor (the
#               machine's read, host-to-GPU, matmul and fsynced write rates) and monolithic (the
#               one-process ModelOpt baseline; its export is deleted after, its bytes recorded).
#               Needs set a only: these stages import no Prefect or MLflow.
#   flow        stages flow_cold, flow_cached (needs set b).
#   budget      stage flow_budget: the cold flow with placement.memory_budget_gib=BENCH_BUDGET_GIB on
#               a fresh store, BENCH_BUDGET_IMAGE_TEXT_ROWS + BENCH_BUDGET_TEXT_ROWS calibration rows
#               (the cold flow's checkpoint is deleted first: the disk holds one export at a time).
#   2gpu        stage flow_2gpu (a machine with 2 GPUs): the cold flow on a store of its own with
#               calibration_gpus: 2 and each branch in 2 shards; the calibration stage's speedup over
#               flow_cold's and each GPU's utilisation (nvidia-smi samples). Run after flow.
#   report      the combined report of every part so far (runs nothing).
#
# Every part merges its results into $BENCH_WORKDIR/bench.json and copies back to OUT_DIR (at most
# 6 files): bench.json, report.txt (the combined report so far), console.log (this script's output),
# logs.tgz (each stage's and driver's log, refreshed while it runs), env.txt (GPU, memory, disks,
# versions), build.json (the checkpoint's build record).
# Each part's python runs under `timeout` so the command ends before BENCH_DEADLINE seconds
# (default 570) counted from the start of the command's shell (the parent of this script), which
# includes gpu_setup.sh; a stage cut short is reported as interrupted with what finished.
#
# Knobs (environment): BENCH_WORKDIR (/root/bench: corpora, stores, exports, results; on disk),
# BENCH_MODEL_DIR, BENCH_LAYERS (64), BENCH_IMAGE_TEXT_ROWS / BENCH_TEXT_ROWS (128 / 128),
# BENCH_SEQ_LEN (512), BENCH_BUDGET_GIB (32), BENCH_BUDGET_IMAGE_TEXT_ROWS / BENCH_BUDGET_TEXT_ROWS
# (16 / 16), BENCH_WARMUP_LAYERS (4; 0 skips the warmup), BENCH_FLOOR_WRITE_GB (4), BENCH_DEVICE
# (cuda), BENCH_TINY (1: the demo's tiny model, for a CPU smoke test), BENCH_DEADLINE, PYTHON (python3).
set -euo pipefail
OUT=${1:?usage: bash benchmarks/gpu_64.sh OUT_DIR PART[+PART...]   (build, monolithic, flow, budget, 2gpu, report)}
PARTS=${2:?usage: bash benchmarks/gpu_64.sh OUT_DIR PART[+PART...]}
PY=${PYTHON:-python3}
LAYERS=${BENCH_LAYERS:-64}
DEVICE=${BENCH_DEVICE:-cuda}
WORK=${BENCH_WORKDIR:-/root/bench}
MODEL=${BENCH_MODEL_DIR:-/dev/shm/q27b}
DEADLINE=${BENCH_DEADLINE:-570}
STARTED=$(ps -o etimes= -p "$PPID" 2>/dev/null | tr -d ' ' || true)
STARTED=${STARTED:-0}
[ "$STARTED" -lt "$DEADLINE" ] 2>/dev/null || STARTED=0

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch-extensions}
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"  # gpu_setup.sh's --target
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK/logs"
exec > >(tee -a "$OUT/console.log") 2>&1
stamp() { echo "[$(date +%T) +$((STARTED + SECONDS))s] $*"; }
left() { echo $(( DEADLINE - STARTED - SECONDS )); }

RELOCATED=$MODEL.relocated  # written by a build part that had to put the checkpoint elsewhere
if [ -f "$RELOCATED" ]; then MODEL=$(cat "$RELOCATED"); fi
make_driver() {
  DRIVER=("$PY" -m benchmarks.gpu_flow_vs_monolithic --workdir "$WORK" --out "$WORK/bench.json"
          --report-file "$WORK/report.txt" --layers "$LAYERS" --model-dir "$MODEL" --fill pool --device "$DEVICE"
          --drop-exports --image-text-rows "${BENCH_IMAGE_TEXT_ROWS:-128}" --text-rows "${BENCH_TEXT_ROWS:-128}"
          --seq-len "${BENCH_SEQ_LEN:-512}" --budget-gib "${BENCH_BUDGET_GIB:-32}"
          --budget-image-text-rows "${BENCH_BUDGET_IMAGE_TEXT_ROWS:-16}" --budget-text-rows "${BENCH_BUDGET_TEXT_ROWS:-16}"
          --floor-write-gb "${BENCH_FLOOR_WRITE_GB:-4}")
  if [ "${BENCH_WARMUP_LAYERS:-4}" != 0 ]; then DRIVER+=(--warmup-layers "${BENCH_WARMUP_LAYERS:-4}"); fi
  if [ -n "${BENCH_TINY:-}" ]; then DRIVER+=(--tiny); fi
}
make_driver
TINY_PY=False; [ -n "${BENCH_TINY:-}" ] && TINY_PY=True

pack_logs() {  # stage logs (and the extension build's) into OUT/logs.tgz, replaced atomically
  tar -czf "$OUT/logs.part" -C "$WORK" logs 2>/dev/null && mv "$OUT/logs.part" "$OUT/logs.tgz" || true
}
finish() {
  status=$?
  [ -n "${PACKER:-}" ] && kill "$PACKER" 2>/dev/null || true
  pack_logs
  [ -f "$WORK/bench.json" ] && cp "$WORK/bench.json" "$OUT/bench.json"
  [ -f "$WORK/report.txt" ] && cp "$WORK/report.txt" "$OUT/report.txt"
  [ -f "$MODEL.built.json" ] && cp "$MODEL.built.json" "$OUT/build.json"
  stamp "done: $PARTS (status $status)"
}
trap finish EXIT
( while sleep 20; do pack_logs; done ) &
PACKER=$!

run_driver() {  # run_driver STAGES: one invocation of the driver, cut at the deadline
  local budget; budget=$(( $(left) - 15 ))
  if [ "$budget" -lt 30 ]; then stamp "no time left for $1 (${budget}s)"; return 3; fi
  stamp "stages $1 (at most ${budget}s)"
  local status=0 log="$WORK/logs/driver-${1//,/-}.log"
  timeout --signal=INT --kill-after=20 "$budget" "${DRIVER[@]}" --stages "$1" > "$log" 2>&1 || status=$?
  grep -i "error\|failed\|interrupted\|skipping\|Traceback" "$log" | grep -v "fast path" | tail -20 || true
  [ -f "$WORK/report.txt" ] && cat "$WORK/report.txt"
  return $status
}

{ stamp "parts $PARTS; command started ${STARTED}s before this script; deadline ${DEADLINE}s"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>/dev/null || echo "no nvidia-smi"
  free -g; df -h /dev/shm "$WORK" /tmp 2>/dev/null || true; nproc
  "$PY" benchmarks/env_versions.py 2>&1 | grep -v "fast path" || true
} > "$OUT/env.txt" 2>&1 || true
cat "$OUT/env.txt"

status=0
IFS='+' read -r -a TODO <<< "$PARTS"
for part in "${TODO[@]}"; do
  case "$part" in
    build)
      need=$("$PY" -c "from benchmarks.bench_report import checkpoint_bytes; print(int(checkpoint_bytes($LAYERS, $TINY_PY)['total']))" 2>/dev/null | tail -1 || true)
      [[ "$need" =~ ^[0-9]+$ ]] || { stamp "could not size the checkpoint; assuming 56 GB"; need=56000000000; }
      parent=$(dirname "$MODEL"); mkdir -p "$parent"
      have=$(df --output=avail -B1 "$parent" | tail -1)
      [ -d "$MODEL" ] && have=$(( have + $(du -sb "$MODEL" | cut -f1) ))
      stamp "checkpoint: $(( need / 1000000000 )) GB; free where $MODEL goes: $(( have / 1000000000 )) GB"
      if [ "$have" -lt $(( need + (1 << 30) )) ] && [ "$(df --output=fstype "$parent" | tail -1)" = tmpfs ] \
         && [ "$(id -u)" = 0 ]; then  # a tmpfs's size is a cap on RAM it may take, not a reservation
        mount_point=$(df --output=target "$parent" | tail -1)
        grow=$(( ( $(df --output=size -B1 "$mount_point" | tail -1) + need - have + (2 << 30) ) >> 30 ))
        stamp "raising the size of the tmpfs $mount_point to ${grow}G"
        mount -o remount,size="${grow}G" "$mount_point" || true
        have=$(df --output=avail -B1 "$parent" | tail -1)
        [ -d "$MODEL" ] && have=$(( have + $(du -sb "$MODEL" | cut -f1) ))
      fi
      if [ "$have" -lt $(( need + (1 << 30) )) ]; then
        disk=$(df --output=avail -B1 "$WORK" | tail -1)
        if [ "$disk" -lt $(( need + need / 2 + (8 << 30) )) ]; then
          stamp "neither $parent ($(( have >> 30 )) GiB free) nor $WORK ($(( disk >> 30 )) GiB free) holds the"\
                "checkpoint ($(( need >> 30 )) GiB) and one export; set BENCH_MODEL_DIR / BENCH_WORKDIR"; exit 2
        fi
        MODEL=$WORK/model; echo "$MODEL" > "$RELOCATED" 2>/dev/null || true
        stamp "the checkpoint goes to $MODEL (on disk)"
        make_driver
      fi
      if [ "$DEVICE" = cuda ]; then
        ( start=$(date +%s)
          "$PY" -c "from modelopt.torch.quantization.extensions import get_cuda_ext_fp8; get_cuda_ext_fp8(raise_if_failed=True)"
          echo "fp8 extension ready in $(( $(date +%s) - start )) s" ) > "$WORK/logs/fp8-extension.log" 2>&1 &
        JIT=$!
      fi
      stamp "build: checkpoint + corpora"
      [ "$(left)" -gt 60 ] || { stamp "no time left for the build"; exit 3; }
      timeout --signal=INT $(( $(left) - 15 )) "${DRIVER[@]}" --prepare-only 2>&1 | grep -v "fast path" | tail -25 \
        || { status=$?; stamp "build failed ($status)"; exit "$status"; }
      if [ -n "${JIT:-}" ]; then wait "$JIT" || { cat "$WORK/logs/fp8-extension.log"; exit 1; }; tail -1 "$WORK/logs/fp8-extension.log"; fi
      df -h /dev/shm "$WORK" | tail -2 ;;
    monolithic)
      stages=floor,monolithic; [ "${BENCH_WARMUP_LAYERS:-4}" != 0 ] && stages=warmup,$stages
      run_driver "$stages" || status=$? ;;
    flow) run_driver flow_cold,flow_cached || status=$? ;;
    budget) run_driver flow_budget || status=$? ;;
    2gpu) run_driver flow_2gpu || status=$? ;;
    report)
      stamp "report"
      "${DRIVER[@]}" --report-only > "$WORK/logs/report.log" 2>&1 || status=$?
      [ -f "$WORK/report.txt" ] && cat "$WORK/report.txt" ;;
    *) echo "unknown part '$part' (build, monolithic, flow, budget, 2gpu, report)"; exit 2 ;;
  esac
done
exit $status
