#!/usr/bin/env bash
# BERT-Large on 1 node x 8 GPUs, DP=8, with the 128 -> 512 two-phase schedule.
#
#   DATA=data/my_text_sentence VOCAB=data/bert-vocab.txt launch/slurm/bert-large.sh
#
# DATA: shards made with --split-sentences and the WordPiece vocab VOCAB (vocab.txt).
# NODES, GPUS_PER_NODE (0: CPU tasks), TASKS_PER_NODE and OVERRIDES (key=value ...) change
# the job; relative paths are read from the directory you run this from.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpus=${GPUS_PER_NODE:-8}
gpu_args=()
if [ "$gpus" -gt 0 ]; then gpu_args=(--gpus-per-node="$gpus"); fi
exec sbatch --job-name=bert-large --nodes="${NODES:-1}" \
    --ntasks-per-node="${TASKS_PER_NODE:-$gpus}" ${gpu_args[@]+"${gpu_args[@]}"} \
    --export=ALL,CONFIG=configs/bert/large.yaml,OVERRIDES="model.seq_length=128 train.phase2_seq_length=512 data.data_path=${DATA:?set DATA=shard prefix (made with --split-sentences)} data.vocab_file=${VOCAB:?set VOCAB=the WordPiece vocab.txt of DATA} ${OVERRIDES:-}" \
    "$@" "$here/train.sbatch"
