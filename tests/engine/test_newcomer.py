"""What a new user meets first: the demo summary in run order with its output paths, `sdar train`
without --config, and progress output that stays readable in a log file (no \\r / \\x1b[A)."""
import os
import subprocess
import sys

try:
    from tests.engine.loop_fakes import FakeEnv, tiny_config
except ImportError:
    from loop_fakes import FakeEnv, tiny_config

from sdar_engine.cli import main
from sdar_engine.demo import format_summary, output_paths
from sdar_engine.progress import PlainProgress, progress, progress_mode

SPAM = ("\x1b[A", "\r")


def _summary(run_dir, methods):
    # keys inserted in an order that sorts differently from the run order (after_* < untrained)
    s = {"run_dir": str(run_dir), "env": "alfworld", "eval_tasks": 60, "total_seconds": 60.0,
         "main_process_cpu_seconds": 50.0, "success_untrained": 0.0, "success_warmstart": 4 / 60,
         "rl_methods": methods}
    for m in reversed(methods):
        s[f"success_after_{m}"] = 5 / 60
    return s


def test_summary_lists_stages_in_run_order_then_every_output_path(tmp_path):
    for m in ("sdar", "grpo"):
        (tmp_path / m).mkdir()
        (tmp_path / m / "curves.png").write_bytes(b"png")
        (tmp_path / m / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "model_warmstart").mkdir()
    summary = _summary(tmp_path, ["sdar", "grpo"])  # run order: sdar before grpo (sorted: grpo first)
    summary["outputs"] = output_paths(tmp_path, summary["rl_methods"])
    text = format_summary(summary)
    stages = [line.split()[2] for line in text.splitlines() if "won)" in line]
    assert stages == ["untrained", "warmstart", "after_sdar", "after_grpo"]
    assert "(4/60 won)" in text and "(5/60 won)" in text
    for path in (tmp_path / "sdar" / "curves.png", tmp_path / "grpo" / "curves.png",
                 tmp_path / "sdar" / "metrics.jsonl", tmp_path / "model_warmstart", tmp_path / "summary.json"):
        assert str(path) in text, path
    assert "checkpoints" not in text  # only outputs that exist (besides summary.json, written right after)


def test_train_without_config_exits_2_listing_the_packaged_configs(capsys):
    assert main(["train", "--set", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdar train: error: --config is required") and len(err.strip().splitlines()) == 1
    assert "tiny_alfworld_demo.yaml" in err and "alfworld_qwen2.5-7b.yaml" in err and "--config defaults" in err


def test_progress_mode_follows_the_stream_and_the_override(monkeypatch):
    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("SDAR_PROGRESS", raising=False)
    assert progress_mode(Tty()) == "bars" and progress_mode(open(os.devnull, "w")) == "plain"
    monkeypatch.setenv("SDAR_PROGRESS", "off")
    assert progress_mode(Tty()) == "off"
    monkeypatch.setenv("SDAR_PROGRESS", "fancy")
    try:
        progress_mode(Tty())
    except ValueError as err:
        assert "SDAR_PROGRESS" in str(err) and "plain" in str(err)
    else:
        raise AssertionError("SDAR_PROGRESS=fancy must raise")


def test_plain_progress_counts_like_tqdm_and_logs_on_close(caplog):
    caplog.set_level("INFO", logger="sdar.progress")
    bar = progress(range(2, 5), desc="sdar RL", unit="step", initial=2, total=5, file=open(os.devnull, "w"))
    assert isinstance(bar, PlainProgress)
    for _ in bar:
        bar.set_postfix(success="0.25")
    assert bar.n == 5
    assert [r.getMessage().split(", ")[0] for r in caplog.records] == ["sdar RL: 5/5 step (100%)"]
    assert "success=0.25" in caplog.records[0].getMessage()
    with progress(desc="nested", nested=True, total=3, file=open(os.devnull, "w")) as inner:
        inner.update(3)
    assert len(caplog.records) == 1  # nested bars say nothing off a terminal


_NESTED = """
import time
from sdar_engine.progress import progress
for step in progress(range(3), desc="outer", unit="step", log_every_s=0.0):
    bar = progress(desc="inner", unit="turn", nested=True, total=4)
    for t in range(4):
        bar.update(1)
        bar.set_postfix(live=4 - t)
    bar.close()
print("done", flush=True)
"""


def _run_redirected(tmp_path, mode):
    log = tmp_path / f"{mode}.log"
    env = {**os.environ, "SDAR_PROGRESS": mode}
    with open(log, "w") as fh:  # stdout and stderr to a file, as `make demo > demo.log 2>&1`
        subprocess.run([sys.executable, "-c", "import logging, sys; logging.basicConfig(level=logging.INFO, "
                        "stream=sys.stderr)\n" + _NESTED], stdout=fh, stderr=subprocess.STDOUT, env=env,
                       check=True, timeout=120)
    return log.read_text()


def test_nested_bars_redirected_to_a_file_write_plain_lines(tmp_path):
    text = _run_redirected(tmp_path, "auto")
    assert not any(s in text for s in SPAM), repr(text[:300])
    assert text.count("outer: ") >= 3 and "inner" not in text and text.rstrip().endswith("done")
    forced = _run_redirected(tmp_path, "bars")  # what tqdm itself writes to a file: the spam this avoids
    assert any(s in forced for s in SPAM)


def test_trainer_run_off_a_terminal_writes_no_bar_escapes(tmp_path, capfd, monkeypatch):
    from sdar_engine.trainer import Trainer

    monkeypatch.delenv("SDAR_PROGRESS", raising=False)
    cfg = tiny_config(tmp_path, "train.steps=1", "train.save_every=1", "env.eval_tasks=2")
    capfd.readouterr()  # building the shared tiny model (first use) is not this test's business
    Trainer(cfg, tmp_path, env=FakeEnv(n_tasks=8), eval_env=FakeEnv("test", n_tasks=2)).fit()
    out, err = capfd.readouterr()
    assert not any(s in out + err for s in SPAM), repr((out + err)[:300])
