#!/usr/bin/env bash
# GPT-2 8.3B (configs/gpt2/8.3b.yaml) at TP=8 within a node x PP=2 stages across nodes:
# 2 nodes x 8 GPUs make one model replica (each node one pipeline stage of 36 layers, the
# 1F1B schedule, 512 / 4 = 128 micro-batches per step); NODES=2k nodes run DP=k replicas.
# Ranks are TP innermost, then DP, then PP, so a stage's TP group is one node's NVLink and
# only the stages' point-to-point activations cross the network.
#
#   DATA=data/my_text_document VOCAB=data/gpt2-vocab.json MERGES=data/gpt2-merges.txt \
#       launch/slurm/gpt2-8.3b-pp.sh
#
# python -m megatron_lite.plan configs/gpt2/8.3b.yaml --tp 8 --pp 2 --dp $((NODES / 2))
# says what each stage holds. NODES (an even number), GPUS_PER_NODE (0: CPU tasks),
# TASKS_PER_NODE and OVERRIDES (key=value ...) change the job; relative paths are read
# from the directory you run this from.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpus=${GPUS_PER_NODE:-8}
gpu_args=()
if [ "$gpus" -gt 0 ]; then gpu_args=(--gpus-per-node="$gpus"); fi
exec sbatch --job-name=gpt2-8.3b-pp --nodes="${NODES:-2}" \
    --ntasks-per-node="${TASKS_PER_NODE:-$gpus}" ${gpu_args[@]+"${gpu_args[@]}"} \
    --export=ALL,CONFIG=configs/gpt2/8.3b.yaml,OVERRIDES="parallel.tensor_parallel_size=${TP:-8} parallel.pipeline_parallel_size=${PP:-2} data.data_path=${DATA:?set DATA=shard prefix} data.vocab_file=${VOCAB:?set VOCAB=the GPT-2 vocab.json of DATA} data.merge_file=${MERGES:?set MERGES=the GPT-2 merges.txt of DATA} ${OVERRIDES:-}" \
    "$@" "$here/train.sbatch"
