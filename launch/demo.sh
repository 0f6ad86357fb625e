#!/usr/bin/env bash
# The whole pipeline on 2 CPU processes, from nothing: corpus -> tokenizer -> shards ->
# TP=2 training -> evaluation -> generation -> loss plot. About 4.5 minutes on 2 cores.
# Usage: launch/demo.sh [OUT_DIR] [extra train overrides...]   (make demo runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
OUT=${1:-runs/demo}
shift || true
DATA="$OUT/data"
RUN="$OUT/gpt2-tiny-cpu"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$DATA"
start=$(date +%s)
step() { printf '\n== %s\n' "$*"; }

step "1/6 corpus: the Python standard library's docstrings (no download)"
$PY -m preprocessing.stdlib_corpus --output "$DATA/corpus.jsonl"

step "2/6 tokenizer: byte-level BPE, 8192 tokens"
$PY -m preprocessing.train_tokenizer --input "$DATA/corpus.jsonl" --type bpe \
    --vocab-size 8192 --output-dir "$DATA/tokenizer"

step "3/6 preprocessing: filter < 128 tokens, MinHash-LSH near-dedup, Megatron shards"
$PY -m preprocessing --input "$DATA/corpus.jsonl" --output-prefix "$DATA/stdlib" \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/tokenizer/vocab.json" \
    --merge-file "$DATA/tokenizer/merges.txt" --append-eod --workers 2 --quiet

COMMON=(data.data_path="$DATA/stdlib_text_document"
        data.vocab_file="$DATA/tokenizer/vocab.json"
        data.merge_file="$DATA/tokenizer/merges.txt"
        train.run_dir="$RUN")

step "4/6 validation perplexity of the untrained model"
before=$($PY -m megatron_lite.evaluate --config configs/gpt2/tiny-cpu.yaml "${COMMON[@]}")
echo "$before"

step "5/6 training: GPT-2 tiny-cpu, tensor parallel over 2 processes (torchrun)"
rm -rf "$RUN"
$TORCHRUN --nproc_per_node 2 -m megatron_lite.train configs/gpt2/tiny-cpu.yaml \
    "${COMMON[@]}" "$@" 2>&1 | grep -v -e '^W[0-9]* ' -e '^\*\*\*'

step "6/6 validation perplexity after training, and a sample (TP=2)"
after=$($TORCHRUN --nproc_per_node 2 -m megatron_lite.evaluate "$RUN" 2>/dev/null)
echo "$after"
$TORCHRUN --nproc_per_node 2 -m megatron_lite.generate "$RUN" --prompt "Return the" \
    --max-new-tokens 48 --top-p 0.9 --temperature 0.7 2>/dev/null

ppl() { sed -n 's/.*"perplexity": \([0-9.]*\).*/\1/p' <<<"$1"; }
printf '\n== done in %ss\n' "$(( $(date +%s) - start ))"
printf 'validation perplexity: %.1f before -> %.1f after training\n' "$(ppl "$before")" "$(ppl "$after")"
echo "data:        $DATA (corpus.jsonl, tokenizer/, stdlib_text_document.bin/.idx, stdlib.stats.json)"
echo "run:         $RUN (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)"
echo "loss curve:  $RUN/loss.png"
