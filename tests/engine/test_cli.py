"""The sdar command: parsing, clean errors for bad config, bench stub, train on a packaged config."""
import pytest

from sdar_engine.cli import build_parser, main


def test_parser_subcommands_and_repeatable_set():
    p = build_parser()
    a = p.parse_args(["train", "--config", "tiny_alfworld.yaml", "--set", "algo.method=grpo",
                      "--set", "train.steps=3", "--resume", "--output", "runs/x"])
    assert (a.command, a.config, a.overrides, a.resume, a.output) == (
        "train", "tiny_alfworld.yaml", ["algo.method=grpo", "train.steps=3"], True, "runs/x")
    d = p.parse_args(["demo", "--compare"])
    assert d.compare and d.config == "tiny_alfworld_demo.yaml" and d.output is None
    assert p.parse_args(["eval", "--tasks", "5"]).tasks == 5
    with pytest.raises(SystemExit):
        p.parse_args(["fly"])


def test_bad_config_exits_2_with_one_clear_line(capsys):
    assert main(["train", "--config", "tiny_alfworld.yaml", "--set", "algo.method=ppo"]) == 2
    err = capsys.readouterr().err
    assert "algo.method='ppo' is invalid" in err and "grpo, sdar" in err and "Traceback" not in err
    assert main(["eval", "--set", "model.path=/nonexistent/model"]) == 2
    assert "/nonexistent/model" in capsys.readouterr().err


def test_bench_delegates_its_arguments(monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("sdar_benchmarks.cli")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sdar_benchmarks.cli", fake)
    assert main(["bench", "--suite", "loss", "--quick"]) == 0
    assert seen == [["--suite", "loss", "--quick"]]
