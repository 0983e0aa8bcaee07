"""The built wheel: torch (+ numpy) alone in the base install, only sdar_* top-level names, every module and
data file shipped, and a build without a single setuptools warning.

One ``pip wheel --no-deps --no-build-isolation`` of a copy of the source (a few seconds, no network).
"""
from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# source folder -> installed import name (setup.py's PACKAGE_DIRS)
FOLDERS = {"sdar_kernels": "sdar_kernels", "envs": "sdar_envs", "sdar_engine": "sdar_engine",
           "benchmarks": "sdar_benchmarks"}
BUILD_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "requirements")
WARNING = re.compile(r"warning|deprecat|would be ignored", re.IGNORECASE)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """(wheel path, the build's full verbose output)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".sdar_cache")
    for name in (*BUILD_FILES, *FOLDERS):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    # the quiet environment a user's shell has: byte-compiling on, no pip self-check or root notice
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore", PIP_NO_INPUT="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                           str(src), "-w", str(out)], capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    wheels = list(out.glob("sdar_engine-*.whl"))
    assert len(wheels) == 1, log[-2000:]
    return wheels[0], log


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def _project(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_build_prints_no_warning(built):
    _, log = built
    bad = [line.strip() for line in log.splitlines() if WARNING.search(line)]
    assert bad == [], "\n".join(bad)


def test_base_install_requires_torch_and_numpy_only(built):
    meta = _metadata(built[0])
    reqs = meta.get_all("Requires-Dist") or []
    base = [r for r in reqs if "extra ==" not in r]
    assert sorted(_project(r) for r in base) == ["numpy", "torch"], base  # numpy: torch warns without it
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"engine", "envs", "bench", "gpu", "vllm", "dev", "all"} <= extras, extras
    engine = {_project(r.split(";")[0]) for r in reqs if 'extra == "engine"' in r}
    assert {"transformers", "tokenizers", "safetensors", "pyyaml"} <= engine, engine
    # all = the CPU extras; gpu / vllm are CUDA builds a CPU venv cannot install
    everything = {_project(r.split(";")[0]) for r in reqs if 'extra == "all"' in r}
    assert {"transformers", "matplotlib", "alfworld"} <= everything and not {"vllm", "flash-attn"} & everything


def test_license_is_an_spdx_expression(built):
    meta = _metadata(built[0])
    assert meta.get("License-Expression") == "Apache-2.0"
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]


def test_top_level_names_are_the_four_sdar_packages(built):
    with zipfile.ZipFile(built[0]) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(FOLDERS.values()), tops
    with zipfile.ZipFile(built[0]) as zf:
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert set(zf.read(top_level).decode().split()) <= set(FOLDERS.values())


def test_every_module_and_data_file_is_shipped(built):
    """A folder missing from ``packages`` (no __init__.py, or not discovered) would silently drop out."""
    with zipfile.ZipFile(built[0]) as zf:
        shipped = set(zf.namelist())
    want = set()
    for folder, name in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                want.add(f"{name}/{rel.as_posix()}")
    want |= {f"sdar_engine/configs/{p.name}" for p in (ROOT / "sdar_engine/configs").glob("*.yaml")}
    want |= {f"sdar_envs/skill_banks/{p.name}" for p in (ROOT / "envs/skill_banks").glob("*.json")}
    assert "sdar_engine/configs/tiny_alfworld_demo.yaml" in want and "sdar_envs/skill_banks/alfworld.json" in want
    assert sorted(want - shipped) == []
