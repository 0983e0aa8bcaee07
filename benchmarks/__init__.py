"""sdar-engine benchmarks: kernel (loss, log-prob), trainer-step and environment throughput.

Entry point: ``python -m sdar_benchmarks.cli --suite loss|logprobs|trainer|envs|all`` (also ``sdar bench``).
Smoke tests: ``pytest benchmarks/ --benchmark-disable``.
"""
