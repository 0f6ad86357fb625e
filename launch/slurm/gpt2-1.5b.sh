#!/usr/bin/env bash
# GPT-2 1.5B on 2 nodes x 8 GPUs: TP=4 within a node, DP=4 (configs/gpt2/1.5b.yaml).
exec sbatch --job-name=gpt2-1.5b --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 \
    --export=ALL,CONFIG=configs/gpt2/1.5b.yaml,OVERRIDES="data.data_path=${DATA:?set DATA=prefix} ${OVERRIDES:-}" \
    "$(dirname "$0")/train.sbatch"
