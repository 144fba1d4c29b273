#!/usr/bin/env bash
# Pretrain -> fine-tune -> evaluate on SST-2 (sentiment; GLUE TSV files train.tsv and dev.tsv
# with a header row "sentence<TAB>label"):
#   1. a WordPiece tokenizer trained on the training sentences,
#   2. a small u-muP encoder pretrained with masked-LM on the same sentences,
#   3. its trunk fine-tuned with a fresh classification head (best checkpoint by dev accuracy),
#   4. that checkpoint evaluated on the dev split (a table, and OUT/finetuned/report.json).
#
# usage: examples/finetune_sst2.sh [SST2_DIR] [OUT_DIR]
#   SST2_DIR defaults to ../shared/data/sst2, OUT_DIR to runs/sst2-example.
#   PRETRAIN_STEPS, FINETUNE_STEPS, VOCAB_SIZE and EXTRA_FLAGS (added to train and finetune)
#   override the sizes; UNITSCALE_JAX the command (default: unitscale-jax).
# On two CPU cores the defaults take about ten minutes; rerunning resumes every step.
set -euo pipefail

SST2=${1:-../shared/data/sst2}
OUT=${2:-runs/sst2-example}
CLI=${UNITSCALE_JAX:-unitscale-jax}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000}
FINETUNE_STEPS=${FINETUNE_STEPS:-600}
VOCAB_SIZE=${VOCAB_SIZE:-4000}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
MODEL="--d-model 64 --n-layers 2 --n-heads 4 --seq-len 64"

for f in train.tsv dev.tsv; do
  if [[ ! -f "$SST2/$f" ]]; then
    echo "finetune_sst2.sh: error: no $SST2/$f; pass the directory of SST-2's train.tsv and dev.tsv." >&2
    exit 2
  fi
done
mkdir -p "$OUT"

echo "== 1. tokenizer"
tail -n +2 "$SST2/train.tsv" | cut -f1 > "$OUT/sentences.txt"
$CLI tokenizer train --data "$OUT/sentences.txt" --kind wordpiece --vocab-size "$VOCAB_SIZE" \
  --out "$OUT/tok.json"

echo "== 2. masked-LM pretraining"
$CLI train --model encoder --tokenizer "hf:$OUT/tok.json" --data "$OUT/sentences.txt" $MODEL \
  --steps "$PRETRAIN_STEPS" --run-dir "$OUT/pretrained" $EXTRA_FLAGS

echo "== 3. fine-tuning"
$CLI finetune --task classify --data "$SST2" --init-from "$OUT/pretrained" \
  --steps "$FINETUNE_STEPS" --run-dir "$OUT/finetuned" $EXTRA_FLAGS

echo "== 4. evaluation on the dev split"
$CLI evaluate --run-dir "$OUT/finetuned" --data "$SST2/dev.tsv"
