#!/usr/bin/env bash
# The answer-score learning curves of issue 29 (experiments/smollm2/answer_score_curve.py):
# CoRA on SmolLM2 (fp32), 800 training rows, validation every 20 steps on 200 rows, under
# --answer-score yes and yes-no side by side (one thread each), then the frozen LLM on the same
# rows as step 0. Resumable: rerun after a kill. About 75 min on a contended 2-core AMD EPYC.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/ml-1m}
RUNS=${RUNS:-runs/smollm2}
OUT="$RUNS/answer_curve"
ROWS=(--data "$DATA" --cf "$RUNS/mf" --seed 0 --preset paper --max-train-rows 800
      --max-valid-rows 200 --max-test-rows 200 --no-progress --resume --llm smollm2 --llm-dtype fp32)
[[ -f "$RUNS/mf/metrics.json" ]] || bash experiments/smollm2/run.sh mf
for score in yes yes-no; do
  OMP_NUM_THREADS=1 llmrec train --method cora --out "$OUT/cora_$score" "${ROWS[@]}" --epochs 1 \
    --warmup-steps 20 --eval-every 20 --save-every 20 --answer-score "$score" &
done
wait
for score in yes yes-no; do
  llmrec train --method frozen --out "$OUT/frozen_$score" "${ROWS[@]}" --answer-score "$score"
done
python experiments/smollm2/answer_score_curve.py "$OUT"
