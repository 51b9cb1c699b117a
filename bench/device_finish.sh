#!/usr/bin/env bash
# Finish one resumable training run on a lent GPU, evaluate it, and bring everything back.
#
# A device session has 15 minutes in all and one command at most 10, so one prepared command
# does the whole job: continue the run (`deqguard train --resume`, which reads the committed
# resume.pt) until a deadline, then, if it reached its last epoch, run the headline table's three
# `deqguard eval` lines (bench/headline.py --evaluate), then, with what time is left, the serving
# benchmark (bench/cuda_serve.py). Whatever happened, the run folder (resume.pt included, so a
# run stopped at the deadline continues here or in the next window), the reports and the logs go
# into one archive under $OUT. Nothing else computes on the device meanwhile, so the run's
# train_seconds per epoch are the preset's epoch time on that GPU.
#
# usage (on the device, from the checkout's root; docs/gpu-window.md has the run() call):
#   bench/device_finish.sh RUN_DIR EPOCHS "NAME=REPORT_DIR" TRAIN_S END_S -- TRAIN_ARGS...
#   TRAIN_S: seconds from the start after which training is stopped; END_S: the whole budget.
set -u
if [ $# -lt 6 ] || [ "$6" != "--" ]; then
  echo "usage: $0 RUN_DIR EPOCHS NAME=REPORT_DIR TRAIN_S END_S -- TRAIN_ARGS..." >&2
  exit 2
fi
RUN=$1; EPOCHS=$2; SPEC=$3; TRAIN_S=$4; END_S=$5; shift 6
OUT=${OUT:-/tmp/device-out}
DATA=${DATA:-.devdata/fashion-mnist}
DEVICE=${DEVICE:-cuda}            # cpu: the same steps here, for a smoke run
HEADLINE_ARGS=${HEADLINE_ARGS:-}  # smoke runs: fewer images, fewer attack steps
SERVE=${SERVE:-1}                 # 0: no serving benchmark
LOGS=${LOGS:-logs-device}
BENCH=$(cd "$(dirname "$0")" && pwd)
REPORTS=${SPEC#*=}
START=$(date +%s)
left() { echo $(( START + $1 - $(date +%s) )); }
until_() { local r; r=$(left "$1"); [ "$r" -lt 1 ] && r=1; echo "$r"; }  # timeout 0 never stops
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} > "$LOGS/environment.txt" 2>&1

train=(deqguard train --out "$RUN" --resume --no-progress --epochs "$EPOCHS"
       --device "$DEVICE" --data-dir "$DATA" "$@")
echo "\$ ${train[*]}   (stopped at $TRAIN_S s)" > "$LOGS/train.log"
timeout --signal=TERM --kill-after=20 "$(until_ "$TRAIN_S")" "${train[@]}" >> "$LOGS/train.log" 2>&1
echo "# exit $?, $(( $(date +%s) - START )) s since the start" >> "$LOGS/train.log"

if grep -q '"event": "final"' "$RUN/train_log.jsonl" 2>/dev/null \
   && grep -q "\"epoch\": $EPOCHS," "$RUN/train_log.jsonl"; then
  budget=$(( $(left "$END_S") - 10 ))  # the serving benchmark gets what is left after
  if [ "$budget" -gt 30 ]; then
    # shellcheck disable=SC2086
    timeout "$budget" python3 "$BENCH"/headline.py --evaluate "$SPEC=$RUN" $HEADLINE_ARGS \
      --eval-args "--data-dir $DATA --device $DEVICE ${EVAL_ARGS:-}" \
      > "$LOGS/headline.log" 2>&1
    echo "# exit $?, $(( $(date +%s) - START )) s since the start" >> "$LOGS/headline.log"
  fi
fi

budget=$(( $(left "$END_S") - 15 ))
if [ "$SERVE" = 1 ] && [ "$budget" -gt 60 ]; then
  timeout "$budget" python3 "$BENCH"/cuda_serve.py --checkpoint default --device "$DEVICE" \
    --data-dir "$DATA" --json "$LOGS/serve.json" > "$LOGS/serve.txt" 2>&1
  echo "# exit $?, $(( $(date +%s) - START )) s since the start" >> "$LOGS/serve.txt"
fi

tar czf "$OUT/device.tar.gz" "$RUN" "$LOGS" $( [ -d "$REPORTS" ] && echo "$REPORTS" )
cp "$LOGS/train.log" "$OUT/"
tail -3 "$RUN/train_log.jsonl" | cut -c1-400
echo "done in $(( $(date +%s) - START )) s"
