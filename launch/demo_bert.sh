#!/usr/bin/env bash
# BERT you can watch learn, on 2 CPU processes: corpus -> WordPiece -> sentence shards ->
# TP=2 BERT (MLM + NSP) -> MLM and NSP accuracy before and after. About 5 minutes on 2 cores.
# Usage: launch/demo_bert.sh [OUT_DIR] [extra train overrides...]   (make demo-bert runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
OUT=${1:-runs/demo-bert}
shift || true
DATA="$OUT/data"
RUN="$OUT/bert-tiny-cpu"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$DATA"
start=$(date +%s)
step() { printf '\n== %s\n' "$*"; }

step "1/5 corpus: the Python standard library's docstrings (no download)"
$PY -m preprocessing.stdlib_corpus --output "$DATA/corpus.jsonl"

step "2/5 tokenizer: WordPiece (lower case), 8192 tokens"
$PY -m preprocessing.train_tokenizer --input "$DATA/corpus.jsonl" --type wordpiece \
    --vocab-size 8192 --output-dir "$DATA/tokenizer"

step "3/5 preprocessing: one sentence per sequence (BERT's sentence pairs), dedup, shards"
$PY -m preprocessing --input "$DATA/corpus.jsonl" --output-prefix "$DATA/stdlib" \
    --tokenizer-type BertWordPieceLowerCase --vocab-file "$DATA/tokenizer/vocab.txt" \
    --split-sentences --workers 2 --quiet

COMMON=(data.data_path="$DATA/stdlib_text_sentence"
        data.vocab_file="$DATA/tokenizer/vocab.txt"
        train.run_dir="$RUN")

step "4/5 MLM and NSP accuracy of the untrained model (validation split)"
before=$($PY -m megatron_lite.evaluate --config configs/bert/tiny-cpu.yaml "${COMMON[@]}" \
    --iters 40 parallel.tensor_parallel_size=1)
echo "$before"

step "5/5 training: BERT tiny-cpu (MLM + NSP), tensor parallel over 2 processes"
rm -rf "$RUN"
$TORCHRUN --nproc_per_node 2 -m megatron_lite.train configs/bert/tiny-cpu.yaml \
    "${COMMON[@]}" "$@" 2>&1 | grep -v -e '^W[0-9]* ' -e '^\*\*\*'
after=$($TORCHRUN --nproc_per_node 2 -m megatron_lite.evaluate "$RUN" --iters 40 2>/dev/null)
echo "$after"

field() { sed -n "s/.*\"$1\": \([0-9.]*\).*/\1/p" <<<"$2"; }
printf '\n== done in %ss\n' "$(( $(date +%s) - start ))"
printf 'MLM accuracy: %.3f before -> %.3f after training (masked positions, validation)\n' \
    "$(field mlm_accuracy "$before")" "$(field mlm_accuracy "$after")"
printf 'NSP accuracy: %.3f before -> %.3f after training (0.5 = chance)\n' \
    "$(field nsp_accuracy "$before")" "$(field nsp_accuracy "$after")"
echo "data:        $DATA (corpus.jsonl, tokenizer/vocab.txt, stdlib_text_sentence.bin/.idx)"
echo "run:         $RUN (config.yaml, metrics.jsonl with mlm/nsp losses and accuracies, checkpoints/)"
echo "loss curve:  $RUN/loss.png"
