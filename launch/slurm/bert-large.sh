#!/usr/bin/env bash
# BERT-Large on 1 node x 8 GPUs, DP=8, with the 128 -> 512 two-phase schedule.
exec sbatch --job-name=bert-large --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 \
    --export=ALL,CONFIG=configs/bert/large.yaml,OVERRIDES="model.seq_length=128 train.phase2_seq_length=512 data.data_path=${DATA:?set DATA=prefix} ${OVERRIDES:-}" \
    "$(dirname "$0")/train.sbatch"
