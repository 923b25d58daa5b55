"""What a person sees while fmrilm runs, and where everything else goes.

The console gets fmrilm's own lines (a line per stage start and end, progress bars, result
tables, errors, and fmrilm's lines from Ray workers, such as "resumed at step N") and any
library's errors. Library warnings and INFO chatter (Ray, transformers, peft, DeepSpeed, Python
warnings) go to a log file per command under ``FMRILM_LOG_DIR`` (default
``./fmrilm-data/logs``); in Ray's workers and actors the same chatter is quieted at its source
(Ray Train's and Ray Data's log levels, Hugging Face progress bars, warnings to a file) and
stays in the Ray session's ``logs/`` folder. ``fmrilm --verbose`` (``FMRILM_VERBOSE=1``) shows
all of it on the console again. When the output is not a terminal (a pipe, a CI log), lines are
written whole, never cut or wrapped at a width.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from contextlib import contextmanager, redirect_stdout

from rich.console import Console

VERBOSE_ENV = "FMRILM_VERBOSE"
LOG_DIR_ENV = "FMRILM_LOG_DIR"
DEFAULT_LOG_DIR = "./fmrilm-data/logs"
OURS = "fmrilm"
# For the processes Ray starts: progress bars and advisory warnings of the Hugging Face libraries
# (they have their own handlers), Ray Data's lines in its actors (execution plans, "execution
# finished", "Progress bars disabled"), and deprecation warnings libraries raise inside Ray's own
# actors (Ray Train's DatasetManager warns of a Ray Data option Ray itself sets).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_LOG_LEVEL": "ERROR",
             "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
             "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # Ray Train's workers log every print on their root logger, past library_prints
_announced = False
_log_path: str | None = None


def verbose() -> bool:
    """Whether this process (and the Ray workers it starts) should show library logs."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def make_console(stderr: bool = False) -> Console:
    """A rich console; off a terminal it writes each line whole (no wrapping, tables up to 200 columns)."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=max(200, int(os.environ.get("COLUMNS", 0) or 0)))


class ConsoleFilter(logging.Filter):
    """Passes fmrilm's records, and other loggers' only from ERROR up (all of them when verbose)."""

    def __init__(self, show_all: bool):
        super().__init__()
        self.show_all = show_all

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == OURS or record.name.startswith(OURS + ".")
        return self.show_all or ours or record.levelno >= logging.ERROR


def setup(show_all: bool = False, command: str = "fmrilm", console: Console | None = None) -> None:
    """Route logging: fmrilm's lines (and errors) to the console, everything from INFO up to
    :func:`log_file`. ``show_all`` (``--verbose``) adds DEBUG lines and every library's log to the
    console, and is passed on to Ray workers through ``FMRILM_VERBOSE``."""
    global _log_path
    if show_all:
        os.environ[VERBOSE_ENV] = "1"
    else:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    console = console or make_console(stderr=True)
    if console.is_terminal:
        from rich.logging import RichHandler

        screen: logging.Handler = RichHandler(console=console, show_path=False)
        screen.setFormatter(logging.Formatter("%(message)s"))
    else:
        screen = _PlainHandler(console)
        screen.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    screen.addFilter(ConsoleFilter(show_all))
    _log_path = os.path.join(os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR,
                             f"{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log")
    handlers = [screen, _LazyFileHandler(_log_path)]
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    logging.getLogger(OURS).setLevel(logging.DEBUG if show_all else logging.INFO)
    logging.captureWarnings(True)  # library deprecation warnings: to the log file


def log_file() -> str | None:
    """This command's log file (set by :func:`setup`; it exists once something was logged)."""
    return _log_path


class _PlainHandler(logging.StreamHandler):
    """Plain lines to the console's current stream (looked up at each record, as rich does: a
    stream replaced since set-up, e.g. by a test runner, is never written to after it closed)."""

    def __init__(self, console: Console):
        super().__init__(console.file)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self.console.file
        super().emit(record)


class _LazyFileHandler(logging.FileHandler):
    """A file handler that makes its folder and file at the first record (a command that logs
    nothing leaves nothing behind)."""

    def __init__(self, path: str):
        self._path = path
        super().__init__(path, delay=True, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            os.makedirs(os.path.dirname(self._path) or ".", exist_ok=True)
        super().emit(record)


def train_log_level() -> str:
    """Level of Ray Train's own console lines (its ``LoggingConfig``): every worker's
    "Reporting training result ... TrainingReport(...)" and the controller's scheduling lines
    are INFO; they stay in Ray's Train log files unless verbose."""
    return "INFO" if verbose() else "WARNING"


def worker_setup() -> None:
    """In a Ray Train worker: Python warnings (library deprecations) go to a file in Ray's session
    log folder instead of the worker's stderr, which Ray streams to the driver's console; fmrilm's
    own lines still reach it. Verbose: nothing changes."""
    if verbose():
        return
    try:  # Ray Train logs every report ("Reporting training result N: TrainingReport(...)") at INFO on a logger
        from ray.train.v2._internal.execution import context  # named by its file, outside `ray.train`, so its
        logging.getLogger(context.__file__).setLevel(logging.WARNING)  # LoggingConfig does not reach it
    except ImportError:
        pass
    logging.captureWarnings(True)
    warned = logging.getLogger("py.warnings")
    warned.propagate = False
    try:
        import ray

        folder = ray._private.worker._global_node.get_logs_dir_path()  # the session's logs/ (no public accessor in 2.60)
        warned.addHandler(logging.FileHandler(os.path.join(folder, f"fmrilm-warnings-{os.getpid()}.log"), delay=True))
    except Exception:  # noqa: BLE001 - outside a Ray session: dropped, never on the console
        warned.addHandler(logging.NullHandler())


@contextmanager
def library_prints(name: str):
    """What a library prints (not logs) to stdout inside this block goes to the logger ``name`` at
    DEBUG instead (DeepSpeed prints "... built successfully" on every CPU start); verbose: printed.
    In Ray Train's workers this needs their print unpatched (``QUIET_ENV``)."""
    if verbose():
        yield
        return
    caught = io.StringIO()
    with redirect_stdout(caught):
        yield
    for line in caught.getvalue().splitlines():
        logging.getLogger(name).debug(line)


def route_ray_logs() -> None:
    """Send the records of Ray's loggers (``ray``, and ``ray.data``, which has its own) through the
    root handlers (console filter, log file) instead of their console handlers; their session
    log files stay. Call after importing Ray and Ray Data, before ``ray.init``."""
    if _log_path is None:
        return  # logging not set up by fmrilm (a library user's own): leave Ray's
    names = [n for n in logging.Logger.manager.loggerDict if n == "ray" or n.startswith("ray.")]
    for name in names:
        lg = logging.getLogger(name)
        screens = [h for h in lg.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for handler in screens:
            lg.removeHandler(handler)
        if screens or name == "ray":
            lg.propagate = True
    logging.getLogger("ray").setLevel(logging.INFO)


def announce_logs(ray_logs: str | None) -> None:
    """Say once where the logs the console leaves out are (this command's file, Ray's folder)."""
    global _announced
    if _announced or verbose():
        return
    _announced = True
    where = [f"fmrilm: {_log_path}"] if _log_path else []
    where += [f"Ray workers: {ray_logs}"] if ray_logs else []
    if where:
        logging.getLogger(OURS).info("logs: %s (fmrilm --verbose shows them here)", "; ".join(where))
