#!/bin/bash
# Square after APGD-CE + APGD-T on the wide DEQ's weight average, first 1,000 test images, in two halves
cd "$(dirname "$0")" && cd "$(git rev-parse --show-toplevel)"
export BENTOML_DO_NOT_TRACK=true
P=docs/eval/wk/paired/regulated-w2-e60-ema/square-parts
for span in "--n 500:head" "--start 500 --n 500:tail"; do
  args=${span%%:*}; name=${span##*:}
  [ -f $P/$name.json ] && continue
  CMD="deqguard eval runs/long/e60/regulated-w2-e60/ema_best.safetensors --data fashion-mnist --split test $args --threads 2 --no-progress --attacks clean,aa --aa-attacks apgd-ce,apgd-t,square --aa-from docs/eval/wk/paired/regulated-w2-e60-ema/aa-n1000.json --batch-size 500 --json $P/$name.json"
  echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) load: $(cat /proc/loadavg)"
  echo "\$ $CMD"
  t0=$(date +%s); .venv/bin/$CMD; rc=$?
  echo "# exit $rc wall $(($(date +%s)-t0)) s, ended $(date -u +%FT%TZ)"
  [ $rc = 0 ] || exit $rc
done
CMD="deqguard eval-merge $P/head.json $P/tail.json --json docs/eval/wk/paired/regulated-w2-e60-ema/aa-square-n1000.json"
echo "\$ $CMD"; .venv/bin/$CMD; echo "# exit $?"
