"""``sdar <command>`` checks its optional dependencies before any work and names the pip extra."""
from __future__ import annotations

import sys

import pytest

from sdar_engine import cli
from sdar_engine.extras import COMMAND_EXTRAS, EXTRA_MODULES, missing_extra_message, missing_modules


def _recorder(calls: list):
    return lambda args: calls.append(args) or 0


def test_bench_without_matplotlib_stops_before_work_and_names_the_extra(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(cli.COMMANDS, "bench", _recorder(calls))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["bench", "--suite", "loss", "--quick"]) == 2
    assert calls == []  # the benchmarks never started
    err = capsys.readouterr().err
    assert "sdar bench needs matplotlib: pip install 'sdar-engine[bench]'" in err and "Traceback" not in err


def test_the_engine_extra_is_named_first_and_every_missing_module_listed(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(cli.COMMANDS, "bench", _recorder(calls))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    assert cli.main(["bench"]) == 2 and calls == []
    assert "sdar bench needs transformers, safetensors: pip install 'sdar-engine[engine]'" in capsys.readouterr().err


def test_demo_without_the_envs_extra_stops_before_work(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(cli.COMMANDS, "demo", _recorder(calls))
    monkeypatch.setitem(sys.modules, "textworld", None)
    assert cli.main(["demo"]) == 2 and calls == []
    assert "sdar demo needs textworld: pip install 'sdar-engine[envs]'" in capsys.readouterr().err


def test_with_everything_installed_the_command_runs(monkeypatch):
    pytest.importorskip("matplotlib")
    calls: list = []
    monkeypatch.setitem(cli.COMMANDS, "bench", _recorder(calls))
    assert cli.main(["bench", "--suite", "loss"]) == 0
    assert [a.args for a in calls] == [["--suite", "loss"]]


def test_import_names_are_real_in_a_full_install():
    """Every name listed is importable here (the test venv has every CPU extra): no typo such as
    'pyyaml' for 'yaml' hides behind a check that could never pass."""
    for mod in ("transformers", "matplotlib", "alfworld"):
        pytest.importorskip(mod)
    assert {extra: missing_modules(extra) for extra in EXTRA_MODULES} == {extra: [] for extra in EXTRA_MODULES}
    assert all(missing_extra_message(cmd) is None for cmd in COMMAND_EXTRAS)
    assert set(COMMAND_EXTRAS) == set(cli.COMMANDS)


def test_unknown_extra_raises_naming_the_valid_ones():
    with pytest.raises(ValueError, match="extra='gpus' is unknown; valid: engine, envs, bench"):
        missing_modules("gpus")
