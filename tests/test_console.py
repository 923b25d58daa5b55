"""The console shows fmrilm's lines whole; library chatter goes to the command's log file."""

import logging
import os
import subprocess
import sys

import pytest

from fmrilm import console


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("ray").handlers[:], logging.getLogger("ray").propagate)
    yield
    for h in root.handlers:
        if h not in saved[0]:
            h.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("ray").handlers[:] = saved[2]
    logging.getLogger("ray").propagate = saved[3]
    logging.captureWarnings(False)


def test_a_long_message_arrives_whole_through_a_pipe(tmp_path):
    """Output to a pipe (a CI log, `| tee`): a line of ours longer than 80 columns is neither cut nor wrapped."""
    long_dir = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 3) / "datasets"
    env = {**os.environ, "FMRILM_LOG_DIR": str(tmp_path / "logs"), "COLUMNS": ""}
    r = subprocess.run([sys.executable, "-m", "fmrilm", "data", "synth", "--subjects", "2", "--rois", "8", "--networks", "2",
                        "--timepoints", "30", "--no-ray", "--out", str(long_dir)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert any(str(long_dir) in line and "written 2 scans" in line for line in (r.stdout + r.stderr).splitlines()), r.stderr
    r = subprocess.run([sys.executable, "-m", "fmrilm", "data", "inspect", str(long_dir / "nothing-here")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("error:") and str(long_dir / "nothing-here") in line and "Traceback" not in r.stderr


def test_library_chatter_goes_to_the_log_file_and_errors_still_show(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    console.setup(show_all=False, command="test", console=console.make_console(stderr=True))
    assert not os.path.exists(tmp_path / "logs")  # nothing logged yet: no file
    console.route_ray_logs()
    long = "stage done: " + "x" * 300
    logging.getLogger("fmrilm.quickstart").info(long)
    logging.getLogger("ray.fmrilm_test").warning("Failed to query Ray Train Controller actor state.")
    logging.getLogger("peft").info("some library INFO")
    logging.getLogger("deepspeed").error("a library error")
    err = capsys.readouterr().err
    assert long in err and "a library error" in err
    assert "Failed to query" not in err and "some library INFO" not in err
    text = open(console.log_file()).read()
    assert long in text and "Failed to query" in text and "some library INFO" in text


def test_verbose_shows_library_logs(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    console.setup(show_all=True, command="test", console=console.make_console(stderr=True))
    assert console.verbose()
    logging.getLogger("peft.tuners").warning("a library warning")
    logging.getLogger("fmrilm").debug("a debug line")
    err = capsys.readouterr().err
    assert "a library warning" in err and "a debug line" in err
    monkeypatch.delenv(console.VERBOSE_ENV)


def test_a_quiet_worker_keeps_ray_train_reports_and_warnings_off_its_stderr(monkeypatch, capsys, restore_logging):
    import warnings

    from ray.train.v2._internal.execution import context

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    report_log = logging.getLogger(context.__file__)
    before = report_log.level
    try:
        console.worker_setup()
        assert not report_log.isEnabledFor(logging.INFO)  # "Reporting training result N: TrainingReport(...)"
        warnings.warn("a library deprecation", DeprecationWarning, stacklevel=1)
        assert "a library deprecation" not in capsys.readouterr().err
    finally:
        report_log.setLevel(before)
        logging.getLogger("py.warnings").handlers.clear()
        logging.getLogger("py.warnings").propagate = True


def test_what_a_library_prints_goes_to_the_log(monkeypatch, capsys, caplog):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    with caplog.at_level(logging.DEBUG, logger="deepspeed"):
        with console.library_prints("deepspeed"):
            print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert "built successfully" not in capsys.readouterr().out
    assert any("built successfully" in r.getMessage() for r in caplog.records)
    # Ray Train patches its workers' print to log on the root logger, past the redirect: the quiet set-up turns that off there
    from fmrilm import runtime

    assert console.QUIET_ENV["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and "RAY_TRAIN_ENABLE_PRINT_PATCH" in runtime.FORWARDED_ENV
