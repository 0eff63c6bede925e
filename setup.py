"""blockwise: a hardware-oriented, memory-efficient trainer for blockwise self-supervised learning."""
from setuptools import find_packages, setup

setup(
    name="blockwise",
    version="0.1.0",
    description=(
        "Blockwise self-supervised learning (Barlow Twins per block) with fused Triton kernels, "
        "a block-at-a-time trainer that frees activations, and NVML energy/memory profiling."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["kernels", "kernels.*", "blockwise", "blockwise.*",
                                    "profiling", "profiling.*"]),
    # Pins are loose on purpose: the CPU CI uses torch 2.14 / triton 3.8, the H100 machine
    # torch 2.11 / triton 3.6. triton >= 3.6: older versions fail fp64 kernels on a GPU (tl.dot
    # takes fp64 from 3.5) and the interpreter tests (kernels/_runtime.py patches 3.6's API);
    # the whole suite was run on CPU with torch 2.4, 2.11 and 2.14.
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "triton>=3.6; platform_system == 'Linux'",
        "nvidia-ml-py>=12.535",  # imported as pynvml
        "einops>=0.7",
        "numpy>=1.24",
        "scikit-learn>=1.2",  # the embedded default dataset (handwritten digits)
        "matplotlib>=3.6",  # profiling report plots
        "tqdm>=4.64",
    ],
    extras_require={
        "test": ["pytest>=7.0", "pytest-benchmark>=4.0", "pytest-timeout>=2.1"],
    },
    entry_points={
        "console_scripts": [
            "blockwise-train=blockwise.train:main",
            "blockwise-profile=profiling.__main__:main",
        ],
    },
)
