"""sdar-engine: fused SDAR/GRPO loss kernels, a lean agentic-RL trainer, and offline agent envs."""
from pathlib import Path

from setuptools import find_packages, setup


def _mapped(folder: str, name: str) -> list[str]:
    """Packages under ``folder`` renamed to the import name ``name`` (kernels/ -> sdar_kernels)."""
    subs = find_packages(where=folder)
    return [name] + [f"{name}.{sub}" for sub in subs]


def _requirements(name: str) -> list[str]:
    path = Path(__file__).parent / "requirements" / f"{name}.txt"
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


setup(
    name="sdar-engine",
    version="0.1.0",
    description="Self-distilled agentic RL: fused Triton/PyTorch SDAR loss kernels, a packed GRPO trainer, "
                "and offline ALFWorld / WebShop / Search-QA environments",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_mapped("kernels", "sdar_kernels") + _mapped("envs", "sdar_envs")
    + find_packages(include=["sdar_engine", "sdar_engine.*", "benchmarks", "benchmarks.*"]),
    package_dir={"sdar_kernels": "kernels", "sdar_envs": "envs"},
    package_data={"sdar_envs": ["skill_banks/*.json", "**/*.json", "**/*.txt"], "sdar_engine": ["configs/*.yaml"]},
    include_package_data=True,
    # torch is not pinned here: pin it when you install (the Makefile uses torch==2.13.0, CPU);
    # >= 2.6 for the public FSDP2 API (torch.distributed.fsdp.fully_shard) the trainer uses.
    install_requires=["torch>=2.6", "numpy", "transformers>=4.56", "tokenizers", "safetensors", "pyyaml", "tqdm"],
    extras_require={
        # one Triton version everywhere (requirements/triton.txt): kernels and compile report match it
        "gpu": ["flash-attn"] + _requirements("triton"),
        "bench": _requirements("bench"),
        "envs": list(dict.fromkeys(_requirements("envs_core") + _requirements("webshop") + _requirements("alfworld"))),
        # rollout.backend: vllm (CUDA only; brings its own torch build). = sdar_engine.vllm_backend.VLLM_PIN
        "vllm": ["vllm==0.32.0"],
        "dev": ["pytest", "hypothesis", "pytest-benchmark", "matplotlib"] + _requirements("triton"),
    },
    entry_points={"console_scripts": ["sdar=sdar_engine.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
