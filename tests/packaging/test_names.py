"""benchmarks/ is installed as ``sdar_benchmarks``: no code may import it as ``benchmarks``.

pytest collects benchmarks/bench_*.py (and conftest.py) as ``benchmarks.<name>`` from the checkout;
if any code also imported ``benchmarks.<module>``, that module would load twice in one process (two
copies of its state and classes) next to the ``sdar_benchmarks.<module>`` everything else uses.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = {".venv", "runs", "build", "dist", ".git", "__pycache__"}
BARE = re.compile(r"^\s*(from\s+benchmarks[\s.]|import\s+benchmarks\b)|[\"']-m[\"'],\s*[\"']benchmarks\.|"
                  r"python -m benchmarks\.", re.MULTILINE)


def _sources() -> list[Path]:
    here = Path(__file__).resolve()  # its examples would match
    tops = [p for p in ROOT.iterdir() if p.name not in SKIP]  # never walk .venv
    files = [p for top in tops for p in ([top] if top.is_file() else top.rglob("*.py")) if p.suffix == ".py"]
    return [p for p in files if not SKIP & set(p.relative_to(ROOT).parts) and p.resolve() != here]


def test_the_pattern_finds_bare_imports():
    for line in ("from benchmarks.grids import cases", "import benchmarks.cli", "from benchmarks import x",
                 'subprocess.run([sys.executable, "-m", "benchmarks.worker"])', "python -m benchmarks.cli"):
        assert BARE.search(line), line
    assert not BARE.search("from sdar_benchmarks.grids import cases\nROOT / 'benchmarks/gpu'")


def test_no_module_imports_benchmarks_by_its_folder_name():
    files = _sources()
    assert len(files) > 50 and any(p.name == "bench_loss.py" for p in files)
    bad = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in files
           for m in BARE.finditer(p.read_text(encoding="utf-8", errors="replace"))]
    assert bad == [], "\n".join(bad)
