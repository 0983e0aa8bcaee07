"""The benchmark CLI end to end on the smoke grid (fresh subprocess per case)."""
from __future__ import annotations

import csv

import pytest

from sdar_benchmarks.cli import main, parse_args


@pytest.mark.parametrize("argv", [["--suite", "nope"], ["--repeats", "0"], ["--vocab-chunk", "-1"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_logprobs_smoke_run_writes_results(tmp_path):
    out = tmp_path / "res"
    rc = main(["--suite", "logprobs", "--grid", "smoke", "--out", str(out), "--repeats", "1",
               "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["backend"] for r in rows} == {"naive", "torch"} and all(r["status"] == "ok" for r in rows)
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    assert all(float(r["value_diff"]) < 1e-2 for r in torch_rows)  # same log-probs as naive
    md = (out / "results.md").read_text()
    assert "time / naive" in md and "python -m sdar_benchmarks.cli --suite logprobs" in md
    assert (out / "logprobs_time_vs_n.png").stat().st_size > 10_000
