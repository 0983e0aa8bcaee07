"""The prepared GPU check of the fused SDAR loss: run ``python benchmarks/gpu/run_gpu_check.py``.

Modules: designs.py (the timed designs and their inputs), checks.py (correctness vs the
float64 oracle, bitwise determinism), report.py (markdown table and the issue's targets).
"""
