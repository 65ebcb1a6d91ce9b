"""Install megamoe; the Makefile installs the pinned stack from constraints/."""

from setuptools import find_packages, setup

setup(
    name="megamoe",
    version="0.1.0",
    description="Mixture-of-experts language-model training on Megatron-style parallelism",
    python_requires=">=3.10",
    packages=[*find_packages(include=["megamoe", "megamoe.*"]), "megamoe_kernels"],
    package_dir={"megamoe_kernels": "kernels"},
    package_data={"megamoe.interop": ["tasks/*/*.yaml"], "megamoe.ops": ["*.c"]},
    install_requires=[
        # torch is installed first by the Makefile (the CPU wheel, or the CUDA image's own);
        # a range that the installed torch satisfies pulls nothing more.
        "torch>=2.5",
        "megatron-core==0.16.1",
        "deepspeed>=0.16",
        "datasets>=3.0",
        # sharded data preparation: local and SLURM executors with per-task completion (docs/data.md)
        "datatrove>=0.10,<0.11",
        "tokenizers>=0.20",
        "triton>=3.0",
        "wandb>=0.18",
        "tqdm>=4.66",
        "rich>=13",
        "matplotlib>=3.8",
        "pyyaml>=6",
        "safetensors>=0.4",
        "scikit-learn>=1.4",
        "numpy>=1.26",
    ],
    extras_require={
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # Hugging Face interop (export, import-hf) and downstream evaluation (megamoe eval --tasks)
        "hf": ["transformers>=5.20"],
        "eval": ["transformers>=5.20", "lm_eval>=0.4.9"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "ninja>=1.11",
            "tensorboard>=2.15",
        ],
    },
    entry_points={"console_scripts": ["megamoe=megamoe.cli.main:main"]},
)
