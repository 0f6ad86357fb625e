# megatron-lite image. GPU (default): NVIDIA's PyTorch container brings CUDA, NCCL, torch
# and apex; the project installs into a venv that sees them (--system-site-packages).
#   docker build -t megatron-lite .
# CPU variant: a slim Python with the pinned CPU torch, installed by the same `make setup`.
#   docker build -t megatron-lite:cpu --build-arg BASE_IMAGE=python:3.11-slim \
#       --build-arg TORCH_SPEC=torch==2.13.0 --build-arg VENV_FLAGS= .
# Run (data and runs are volumes under /workspace):
#   docker run --gpus all --ipc=host -v $PWD/data:/workspace/data -v $PWD/runs:/workspace/runs \
#       megatron-lite torchrun --nproc_per_node 8 -m megatron_lite.train configs/gpt2/1.5b.yaml \
#       data.data_path=data/my_text_document train.run_dir=runs/gpt2-1.5b
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=""
ARG VENV_FLAGS="--system-site-packages"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 trainer \
    && mkdir -p /opt/megatron-lite /workspace/data /workspace/runs \
    && chown -R trainer:trainer /opt/megatron-lite /workspace

WORKDIR /opt/megatron-lite
COPY --chown=trainer:trainer pyproject.toml Makefile README.md ./
COPY --chown=trainer:trainer megatron_lite ./megatron_lite
COPY --chown=trainer:trainer preprocessing ./preprocessing
COPY --chown=trainer:trainer configs ./configs
COPY --chown=trainer:trainer launch ./launch
USER 1000:1000
# the very steps `make setup` runs on a developer machine and in CI
RUN make setup PYTHON=python3 EXTRAS=hf,deepspeed TORCH_SPEC="${TORCH_SPEC}" VENV_FLAGS="${VENV_FLAGS}" \
    && ln -s /opt/megatron-lite/configs /workspace/configs \
    && ln -s /opt/megatron-lite/launch /workspace/launch
ENV PATH=/opt/megatron-lite/.venv/bin:${PATH}

WORKDIR /workspace
VOLUME ["/workspace/data", "/workspace/runs"]
CMD ["python", "-m", "megatron_lite.train", "--help"]
