#!/usr/bin/env bash
# GPT-2 1.5B on 2 nodes x 8 GPUs: TP=4 within a node, DP=4 (configs/gpt2/1.5b.yaml).
#
#   DATA=data/my_text_document VOCAB=data/gpt2-vocab.json MERGES=data/gpt2-merges.txt \
#       launch/slurm/gpt2-1.5b.sh
#
# NODES, GPUS_PER_NODE (0: CPU tasks), TASKS_PER_NODE and OVERRIDES (key=value ...) change
# the job; relative paths are read from the directory you run this from.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpus=${GPUS_PER_NODE:-8}
gpu_args=()
if [ "$gpus" -gt 0 ]; then gpu_args=(--gpus-per-node="$gpus"); fi
exec sbatch --job-name=gpt2-1.5b --nodes="${NODES:-2}" \
    --ntasks-per-node="${TASKS_PER_NODE:-$gpus}" ${gpu_args[@]+"${gpu_args[@]}"} \
    --export=ALL,CONFIG=configs/gpt2/1.5b.yaml,OVERRIDES="data.data_path=${DATA:?set DATA=shard prefix} data.vocab_file=${VOCAB:?set VOCAB=the GPT-2 vocab.json of DATA} data.merge_file=${MERGES:?set MERGES=the GPT-2 merges.txt of DATA} ${OVERRIDES:-}" \
    "$@" "$here/train.sbatch"
