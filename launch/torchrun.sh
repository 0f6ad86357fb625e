#!/usr/bin/env bash
# Train with torchrun on one node, or on several with a c10d rendezvous.
#
#   launch/torchrun.sh CONFIG.yaml [section.key=value ...]
#
# Environment:
#   NPROC_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 2)
#   NNODES          nodes (default 1); with more than one, also set
#   RDZV_ENDPOINT   host:port of the rendezvous (e.g. the first node:29500) and
#   RDZV_ID         a job id shared by all nodes (default megatron-lite)
#   OMP_NUM_THREADS threads per process (default: this node's cores / NPROC_PER_NODE)
#   PYTHON          interpreter (default .venv/bin/python when present, else python3)
#   SAVE_TIMEOUT    seconds torchrun gives the workers to save after Ctrl-C / SIGTERM /
#                   SIGUSR1 before it kills them (default 300; torchrun's own default is 30)
#
# torchrun runs through python -m megatron_lite.launch: a failing run ends with its own
# one-line error and exit code (2: a bad config; 130: Ctrl-C saved), not torchrun's
# traceback and exit code 1.
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,18p' "$0"
    exit 2
fi
CONFIG=$1
shift
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}
NNODES=${NNODES:-1}
threads=$(( $(nproc) / NPROC_PER_NODE ))
# on a signal torchrun forwards it to the workers (which save a checkpoint and exit) and
# waits --shutdown-timeout seconds before SIGKILL
SIGNALS=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
         --shutdown-timeout "${SAVE_TIMEOUT:-300}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
if [ "$NNODES" -gt 1 ]; then
    : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port for a multi-node run}"
    exec "$PYTHON" -m megatron_lite.launch "${SIGNALS[@]}" --nnodes "$NNODES" \
        --nproc_per_node "$NPROC_PER_NODE" \
        --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-megatron-lite}" \
        -m megatron_lite.train "$CONFIG" "$@"
fi
exec "$PYTHON" -m megatron_lite.launch "${SIGNALS[@]}" --standalone \
    --nproc_per_node "$NPROC_PER_NODE" \
    -m megatron_lite.train "$CONFIG" "$@"
