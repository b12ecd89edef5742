#!/usr/bin/env bash
# The SmolLM2-135M experiment of issue #15: six methods on one fixed ML-1M subsample.
#
#   bash experiments/smollm2/run.sh [STEP...]      # default: every step, in order
#
# Every step resumes (llmrec train --resume), so the script may be killed at any point and
# run again: finished runs are skipped, a run in progress continues from its last
# checkpoint (--save-every 10 steps: CoLLM's 27 MB checkpoint took a median 0.12 s against
# its 11.8 s step on this EPYC, so a kill loses at most about 2 min). Runs go to $RUNS
# (default runs/smollm2); the table is written by experiments/smollm2/collect.py into
# experiments/smollm2/.
#
# The whole test split (7,331 rows, about 0.9 s a row on 2 CPU cores): each LLM run trains
# and scores its TEST_ROWS subsample (a quick check), then `llmrec evaluate --rows all
# --resume` scores every test row in chunk files under RUN/scores that survive a kill; with
# PART=K/N it scores only the K-th of N ranges of chunks (N machines or sessions; copy their
# RUN/scores into one run and run again without PART to write the metrics). FULL_TEST=0
# keeps the subsample only. SEED (default 0) picks the seed of a whole repetition: runs of
# another seed go to RUNS/seed<SEED>/ (its train subsample and initialisation differ; the
# full test split is the same).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/ml-1m}
RUNS=${RUNS:-runs/smollm2}
TRAIN_ROWS=${TRAIN_ROWS:-8000}
TEST_ROWS=${TEST_ROWS:-2000}
FULL_TEST=${FULL_TEST:-1}
SEED=${SEED:-0}
MF_RUN="$RUNS/mf"  # one CF table for every seed: the LLM methods' spread, not MF's
SASREC_RUN="$RUNS/sasrec"  # A-LLMRec's CF table, likewise one for every seed
[[ "$SEED" == 0 ]] || RUNS="$RUNS/seed$SEED"
mkdir -p "$RUNS"

# the same rows for every method: the subsamples are seeded by --seed (train: seed, valid:
# seed + 1, test: seed + 2); the budget deviations from the papers' settings (one epoch, a
# 400-row validation every 250 steps) are the same for every LLM method
COMMON=(--data "$DATA" --seed "$SEED" --preset paper
        --max-train-rows "$TRAIN_ROWS" --max-valid-rows 400 --max-test-rows "$TEST_ROWS"
        --epochs 1 --eval-every 250 --save-every 10 --no-progress --resume)
# --compile: the decoder layers compiled (the same masks and arithmetic up to rounding). On
# this 2-core EPYC a CoRA training step with the preset's LoRA dropout gains nothing from it
# (each dropout projection runs eagerly, a graph break: 44.1 s against 44.6 s eager over the
# same 7 steps; without dropout 1.05x). Every SmolLM2 run below uses it.
# bf16 where the CPU computes it natively (AVX512-BF16 or AMX: about 1.75x faster than fp32);
# fp32 elsewhere: an AVX2-only CPU (AMD Zen 3) emulates bf16 about 45x slower than fp32
# (experiments/smollm2/allmrec_probe.md). LLM_DTYPE overrides; each run.json records it.
if [[ -z "${LLM_DTYPE:-}" ]]; then
  LLM_DTYPE=fp32
  grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && LLM_DTYPE=bf16
fi
SMOL=(--llm smollm2 --llm-dtype "$LLM_DTYPE" --compile)

done_run() { [[ -f "$1/metrics.json" ]]; }

step_mf() {
  done_run "$MF_RUN" || llmrec train-cf --model mf --dim 256 --data "$DATA" --out "$MF_RUN" \
    --seed 0 --no-progress --predictions "$MF_RUN/test_predictions.csv" --resume
}
# A-LLMRec's stage-1 CF model as the reference trains it: SASRec on the next-item task
# (each positive against one random unrated item; issue 29). d 64 (the reference's SASRec
# width is 50); 15 epochs at most, patience 5: about 100 s an epoch on 2 contended cores
# (experiments/smollm2/allmrec_probe.md)
step_sasrec() {
  done_run "$SASREC_RUN" || llmrec train-cf --model sasrec --objective next-item --dim 64 \
    --epochs 15 --patience 5 --data "$DATA" --out "$SASREC_RUN" --seed 0 --no-progress --resume
}
# the whole test split, in chunks (resumable) or one part of them (A-LLMRec's chunks hold
# whole users; its ranking episodes are scored once the chunks are complete)
full_test() {  # full_test RUN_DIR METHOD
  local run=$1 chunked=(--resume ${PART:+--part "$PART"})
  [[ "$FULL_TEST" == 1 && ! -f "$run/test_predictions.csv" ]] || return 0
  llmrec evaluate --run "$run" --rows all "${chunked[@]}" --no-progress \
    --metrics "$run/eval_test_all.json" --predictions "$run/test_predictions.csv"
}
llm_train() {  # llm_train NAME METHOD [ARGS...]: train, and score the seeded subsample
  local name=$1 method=$2 pred=test_predictions.csv; shift 2
  [[ "$FULL_TEST" != 1 ]] || pred=subsample_predictions.csv
  done_run "$RUNS/$name" || llmrec train --method "$method" --out "$RUNS/$name" "${COMMON[@]}" \
    --cf "${CF:-$MF_RUN}" --predictions "$RUNS/$name/$pred" "$@"
}
llm_run() {  # llm_run NAME METHOD [ARGS...]: llm_train, then the whole test split
  llm_train "$@"
  full_test "$RUNS/$1" "$2"
}
step_zeroshot() { llm_run zeroshot frozen "${SMOL[@]}"; }
step_tallrec() { llm_run tallrec tallrec "${SMOL[@]}"; }
step_cora() { llm_run cora cora "${SMOL[@]}"; }
# CoLLM's step 1 is TALLRec's text-only LoRA on the same rows and settings (the tensors are
# equal, tests/model/test_collm_lora_from.py), so step 2 starts from the TALLRec run's LoRA, as
# the reference's step 2 loads its step-1 checkpoint (cfg ckpt); a seed without its TALLRec
# run trains it first, without its whole-split scoring (CoLLM needs only the LoRA; about 43
# min on this CPU; `run.sh tallrec` scores it)
step_collm() {
  done_run "$RUNS/tallrec" || llm_train tallrec tallrec "${SMOL[@]}"
  llm_run collm collm "${SMOL[@]}" --collm-lora-from "$RUNS/tallrec"
}
# the logit-offset-invariant score against the reference's "Yes" logit (issue 29): CoRA with
# --answer-score yes, everything else equal
step_cora_yes() { llm_run cora_yes cora "${SMOL[@]}" --answer-score yes; }
# A-LLMRec validates on 500 ranking episodes (10,000 candidate titles): 31 min on 2 threads
# against about 2.5 min for the other methods' 400 rows, so every 1,000 of its 2,148 steps
# (and at the end) rather than every 250
step_allmrec() { CF="$SASREC_RUN" llm_run allmrec allmrec "${SMOL[@]}" --eval-every 1000; }
# the same at lr 1e-3 (a departure from the reference's 1e-4): at 1e-4 the validation Hit@1
# was 0.032 at step 250 and 0.038 at step 1,000 of 2,148 (chance 0.05; popularity 0.23), with
# 18% of the probability on the listed titles; the reference trains 5 epochs over every user
step_allmrec_lr1e3() {
  CF="$SASREC_RUN" llm_run allmrec_lr1e-3 allmrec "${SMOL[@]}" --eval-every 1000 --lr 1e-3
}
# ablations: the same CoRA on the random tiny LLM; CoRA on SmolLM2 with the CF zeroed
step_cora_tiny() { llm_run cora_tiny cora --llm tiny; }
step_cora_nocf() {
  python experiments/smollm2/zero_cf.py "$MF_RUN" "$RUNS/mf_zero"
  CF="$RUNS/mf_zero" llm_run cora_nocf cora "${SMOL[@]}"
}

# learning curve: CoRA on SmolLM2 and on the tiny LLM with smaller training budgets (the same
# test rows; the TRAIN_ROWS runs above are the last point). The paper preset's 200 warm-up
# steps scale with the budget, so every point has the same schedule shape.
step_curve_tiny() {
  local n
  for n in ${CURVE_ROWS:-1000 2000 4000}; do
    local w=$(( 200 * n / TRAIN_ROWS ))
    FULL_TEST=0 llm_run "curve/cora_tiny_$n" cora --llm tiny --max-train-rows "$n" --warmup-steps "$w"
  done
}
step_curve_smollm2() {
  local n
  for n in ${CURVE_ROWS:-1000 2000 4000}; do
    local w=$(( 200 * n / TRAIN_ROWS ))
    FULL_TEST=0 llm_run "curve/cora_$n" cora "${SMOL[@]}" --max-train-rows "$n" --warmup-steps "$w"
  done
}
step_curve() { step_curve_tiny; step_curve_smollm2; }
# the spread between random tiny LLMs (--tiny-seed: another draw of its weights; the rows,
# CF table and training order stay those of every other run), at 4,000 and 8,000 rows
step_tiny_draws() {
  local s
  for s in ${TINY_SEEDS:-1 2}; do
    FULL_TEST=0 llm_run "tiny_draws/cora_tiny_4000_s$s" cora --llm tiny --tiny-seed "$s" \
      --max-train-rows 4000 --warmup-steps 100
    FULL_TEST=0 llm_run "tiny_draws/cora_tiny_8000_s$s" cora --llm tiny --tiny-seed "$s"
  done
}

STEPS=("$@")
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=(mf zeroshot tallrec cora cora_tiny collm sasrec allmrec_lr1e3 cora_nocf curve)
for s in "${STEPS[@]}"; do
  echo "=== $s ($(date -u +%FT%TZ))"
  "step_$s"
done
python experiments/smollm2/collect.py "$RUNS"
