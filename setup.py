"""megatron_visualchat: multi-round, multi-image visual chat (MMCA) on megatron-core.

GPU users keep their own CUDA torch: ``install_requires`` names no torch version. The exact CPU/CI pins live in
``requirements-cpu.txt``, which the README commands use.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_visualchat",
    version="0.1.0",
    description="DeepSpeed-VisualChat's multi-modal causal attention on megatron-core, with TP/PP",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_visualchat", "megatron_visualchat.*"]),
    # the chat page `serve` shows; the modeling files `export-hf` copies into a trust_remote_code directory
    package_data={"megatron_visualchat.inference": ["static/*"], "megatron_visualchat.checkpoint": ["hf_remote/*.py"]},
    install_requires=[
        "torch",
        "torchvision",
        "megatron-core>=0.16.1",
        "numpy",
        "sentencepiece",
        "timm",
        "safetensors",
        "pillow",
        "psutil",  # megatron-core's checkpoint save needs it (0.16.1 hangs without it)
        "tqdm",
        "tensorboard",
        "pyyaml",  # training recipes (already required by timm)
        "protobuf",  # sentencepiece's model proto, edited when `fuse` merges two vocabularies
    ],
    extras_require={
        "hf": ["transformers"],
        "te": ["transformer-engine[pytorch]"],
        "apex": ["apex"],
        "serve": ["fastapi", "uvicorn"],
        "test": ["pytest", "pytest-timeout", "transformers", "fastapi", "uvicorn", "openai", "selenium"],
    },
    entry_points={
        "console_scripts": [
            "megatron-visualchat=megatron_visualchat.cli:main",
        ]
    },
)
