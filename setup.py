"""sdar-engine: fused SDAR/GRPO loss kernels, a lean agentic-RL trainer, and offline agent envs.

``pip install sdar-engine`` is the kernels alone (``import sdar_kernels``): torch (+ numpy) and nothing else
(Triton comes with torch's CUDA build, or with the ``gpu`` extra). The rest comes with extras:
``engine`` (the trainer and the ``sdar`` command), ``envs``, ``bench`` (``sdar bench``), ``gpu``,
``vllm``, ``dev``; ``all`` = engine + envs + bench (what runs on a CPU; gpu and vllm are CUDA builds).
The ``sdar`` command checks the extras a subcommand needs before it starts (sdar_engine/extras.py).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# import name -> source folder. sdar_kernels/ carries its import name in the checkout too: run from the
# repository root (pytest, python -m), a folder named ``kernels`` shadowed Hugging Face's ``kernels``
# package, which transformers probes and imports at import time. The installed names carry the project
# prefix so nothing collides with another project's top-level ``benchmarks`` or ``envs``.
PACKAGE_DIRS = {"sdar_kernels": "sdar_kernels", "sdar_envs": "envs", "sdar_engine": "sdar_engine",
                "sdar_benchmarks": "benchmarks"}
# data folders (no __init__.py) declared as packages so setuptools ships them without a warning
DATA = {"sdar_envs.skill_banks": ["*.json"], "sdar_engine.configs": ["*.yaml"]}


def _mapped(name: str, folder: str) -> list[str]:
    """``name`` and its subpackages found under ``folder`` (sdar_kernels/triton_backend -> sdar_kernels.triton_backend)."""
    return [name] + [f"{name}.{sub}" for sub in find_packages(where=str(HERE / folder))]


def _requirements(name: str) -> list[str]:
    """The requirement lines of requirements/<name>.txt (comments and blanks dropped)."""
    path = HERE / "requirements" / f"{name}.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _union(*groups: list[str]) -> list[str]:
    """One requirement per project, in first-seen order; a pinned line (``==``) wins over a range."""
    picked: dict[str, str] = {}
    for req in (req for group in groups for req in group):
        name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name not in picked or ("==" in req and "==" not in picked[name]):
            picked[name] = req
    return list(picked.values())


ENGINE = ["numpy", "transformers>=4.56", "tokenizers", "safetensors", "pyyaml", "tqdm"]
ENVS = _union(_requirements("envs_core"), _requirements("webshop"), _requirements("alfworld"))
# sdar bench runs the trainer suite too, so it brings the engine
BENCH = _union(ENGINE, _requirements("bench"))

setup(
    name="sdar-engine",
    version="0.1.0",
    description="Self-distilled agentic RL: fused Triton/PyTorch SDAR loss kernels, a packed GRPO trainer, "
                "and offline ALFWorld / WebShop / Search-QA environments",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license_expression="Apache-2.0",
    python_requires=">=3.10",
    packages=[pkg for name, folder in PACKAGE_DIRS.items() for pkg in _mapped(name, folder)] + list(DATA),
    package_dir=PACKAGE_DIRS,
    package_data=DATA,
    include_package_data=False,
    # >= 2.6 for the public FSDP2 API (torch.distributed.fsdp.fully_shard) the trainer uses. Not pinned
    # here: pin it when you install (the Makefile uses TORCH_SPEC=torch==2.13.0, CPU).
    # numpy: torch itself warns "Failed to initialize NumPy" on import without it
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "engine": ENGINE,
        "envs": ENVS,
        "bench": BENCH,
        # one Triton version everywhere (requirements/triton.txt): kernels and compile report match it
        "gpu": ["flash-attn"] + _requirements("triton"),
        # rollout.backend: vllm (CUDA only; brings its own torch build). = sdar_engine.vllm_backend.VLLM_PIN
        "vllm": ["vllm==0.32.0"],
        "dev": ["pytest", "hypothesis", "pytest-benchmark", "matplotlib"] + _requirements("triton"),
        "all": _union(ENGINE, ENVS, BENCH),
    },
    entry_points={"console_scripts": ["sdar=sdar_engine.cli:main"]},
    classifiers=["Programming Language :: Python :: 3"],
)
