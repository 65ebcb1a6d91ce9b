# megamoe GPU image: an NGC PyTorch base (its torch, triton, CUDA, NCCL and apex are kept) plus
# megamoe with its GPU extras (faiss-gpu-cu12), pinned by constraints/gpu.txt. The Triton kernels
# are checked against their reference at build time, in Triton's interpreter (a build sees no GPU).
#   docker build -t megamoe:0.1 .
#   docker run --gpus all --ipc=host --rm -v $PWD/runs:/workspace/megamoe/runs megamoe:0.1 \
#       megamoe train configs/debug/lory.yaml
# docs/docker.md: SLURM with pyxis/enroot, and Apptainer.
FROM nvcr.io/nvidia/pytorch:26.06-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WANDB_MODE=offline \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/workspace/megamoe/.cache/torch_extensions

WORKDIR /workspace/megamoe

# Dependencies first (a layer that survives source edits).
COPY setup.py pyproject.toml README.md ./
COPY constraints/ constraints/
COPY kernels/ kernels/
COPY megamoe/ megamoe/
RUN pip install -c constraints/gpu.txt -e ".[gpu,dev]" \
    && python -c "import torch, triton, megatron.core, deepspeed, faiss, megamoe_kernels.lory; print('torch', torch.__version__, 'triton', triton.__version__)"

COPY configs/ configs/
COPY launch/ launch/
COPY bench/ bench/
COPY tests/ tests/
COPY docs/ docs/
COPY Makefile ./

# Validate the fused Lory kernels against the float64 reference (outputs and all gradients).
RUN TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/kernels

CMD ["megamoe", "--help"]
