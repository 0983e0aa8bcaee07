"""pytest setup of the benchmark suites.

Files named bench_*.py are collected as test modules here (the default python_files pattern
only matches test_*.py). ``pytest benchmarks/ --benchmark-disable`` runs every case once as a
smoke test on tiny shapes; SDAR_BENCH_GRID=quick|cpu|gpu picks bigger kernel shapes for timed
runs, SDAR_BENCH_COMPILE=1 adds torch.compile cases to the smoke grid.
"""
from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        patterns = parent.config.getini("python_files")
        if not any(p.startswith("bench_") for p in patterns):  # do not collect twice
            return pytest.Module.from_parent(parent, path=file_path)
    return None
