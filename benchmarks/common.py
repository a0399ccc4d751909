"""What every benchmark shares: how it describes itself, prints, measures
latency, and runs the engine as a separate process.

A benchmark's JSON says what was measured and how: ``describe_machine()``
(CPU, memory, load average when the run started: the machine is shared, so a
high load average explains a low figure), ``describe_versions()`` (Python,
the libraries on the hot path, PostgreSQL, the fast-path implementation, the
git commit) and the benchmark's own settings.

Latencies are recorded in microseconds into an HdrHistogram (3 significant
digits: a reported value is within 0.1% of the true one) and reported in
milliseconds::

    histogram = new_latency_histogram()
    histogram.record_value(1234)           # 1.234 ms
    latency_summary(histogram)["p99_ms"]   # 1.234

The engine under test runs as a subprocess, exactly as an operator starts it
(``citycard serve``), so its CPU is its own and it can be profiled by pid::

    with serve_engine(dsn, data_dir, log_dir=tmp) as engine:
        engine.port, engine.metrics_port
        engine.metric_sum("citycard_batch_size_count")
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import orjson
import psutil
from hdrh.histogram import HdrHistogram

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

# Latency histogram range: 1 us (below any network round trip) to 60 s
# (far above any timeout of the protocol), 3 significant digits.
LATENCY_LOWEST_US = 1
LATENCY_HIGHEST_US = 60_000_000
LATENCY_SIGNIFICANT_DIGITS = 3

# Packages whose versions change the numbers: the database driver, the event
# loop, the codec libraries, the histogram.
REPORTED_PACKAGES = ("asyncpg", "uvloop", "msgspec", "orjson", "prometheus_client", "hdrhistogram", "psutil")

# The engine loads the city and connects to PostgreSQL before it listens:
# a second for the demo city, a minute is a stuck start.
ENGINE_START_TIMEOUT_S = 60.0

# SIGTERM makes the engine drain in-flight batches (at most SHUTDOWN_DRAIN_S
# = 10 s in engine/server.py) and close; beyond this it is killed.
ENGINE_STOP_TIMEOUT_S = 30.0

# A free port picked here can be taken before the engine binds it; a few
# attempts make that race irrelevant.
ENGINE_START_ATTEMPTS = 3

# How often the start-up banner is looked for.
ENGINE_POLL_S = 0.05

# Characters of the engine's log quoted when it fails.
LOG_TAIL_CHARS = 2000

METRICS_TIMEOUT_S = 5.0


class EngineProcessError(Exception):
    """The engine subprocess did not start, or stopped unexpectedly."""


# --- description ------------------------------------------------------------------------


def describe_machine() -> dict[str, object]:
    """The machine the benchmark ran on.

    >>> sorted(describe_machine())[:3]
    ['cpu_count', 'cpu_model', 'kernel']
    """
    memory = psutil.virtual_memory()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "memory_gib": round(memory.total / 2**30, 1),
        "platform": platform.platform(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def describe_versions(postgres_version: str | None = None) -> dict[str, object]:
    """Versions of everything that changes the numbers.

    ``postgres_version`` is the server's ``SHOW server_version``, which only
    the caller (with a connection) can ask.
    """
    from engine import __version__, fastpath

    packages: dict[str, str | None] = {}
    for name in REPORTED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "engine": __version__,
        "fastpath": fastpath.IMPLEMENTATION,
        "postgres": postgres_version,
        "git_commit": git_commit(),
        "packages": packages,
    }


def git_commit() -> str | None:
    """The repository's HEAD commit, with ``+dirty`` when the tree has changes; None without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPOSITORY_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def print_json(report: Mapping[str, object]) -> None:
    """One JSON object on one line of stdout."""
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    sys.stdout.flush()


# --- latency --------------------------------------------------------------------------------


def new_latency_histogram() -> HdrHistogram:
    """An empty histogram of latencies in microseconds."""
    return HdrHistogram(LATENCY_LOWEST_US, LATENCY_HIGHEST_US, LATENCY_SIGNIFICANT_DIGITS)


def record_latencies_us(histogram: HdrHistogram, latencies_us: Mapping[int, int]) -> None:
    """Add ``{latency_us: count}`` to ``histogram``, clamping to its range.

    Load generators count latencies in a dict while running (one dict
    update per reply) and fill the histogram afterwards, off the clock.
    """
    for value, count in latencies_us.items():
        histogram.record_value(min(max(value, LATENCY_LOWEST_US), LATENCY_HIGHEST_US), count)


def latency_summary(histogram: HdrHistogram) -> dict[str, float | int]:
    """Percentiles of a microsecond histogram, in milliseconds.

    >>> h = new_latency_histogram()
    >>> h.record_value(1000, 99); h.record_value(5000)
    True
    True
    >>> latency_summary(h)["p99_ms"], latency_summary(h)["max_ms"]
    (1.0, 5.003)
    """
    if histogram.get_total_count() == 0:
        return {"count": 0, "p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "p999_ms": 0.0, "max_ms": 0.0}

    def ms(value_us: int) -> float:
        return round(value_us / 1000, 3)

    return {
        "count": histogram.get_total_count(),
        "p50_ms": ms(histogram.get_value_at_percentile(50)),
        "p90_ms": ms(histogram.get_value_at_percentile(90)),
        "p99_ms": ms(histogram.get_value_at_percentile(99)),
        "p999_ms": ms(histogram.get_value_at_percentile(99.9)),
        "max_ms": ms(histogram.get_max_value()),
    }


# --- processes ------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller must tolerate losing a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def process_cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds used so far by ``pids`` (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += times.user + times.system
    return total


def postgres_pids(pgdata: Path) -> list[int]:
    """The postmaster of ``pgdata`` and all its children (backends, WAL writer, checkpointer)."""
    try:
        postmaster = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        process = psutil.Process(postmaster)
        return [postmaster] + [child.pid for child in process.children(recursive=True)]
    except (OSError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return []


@dataclass
class EngineProcess:
    """A running ``citycard serve``."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    metrics_port: int | None
    log_path: Path
    command: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds([self.pid])

    def scrape(self) -> str:
        """The Prometheus text exposition of the engine's metrics."""
        if self.metrics_port is None:
            raise EngineProcessError("the engine was started without metrics")
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
            return str(response.read().decode("utf-8"))

    def metric_sum(self, name: str) -> float:
        """The sum over all label sets of sample ``name`` (e.g. ``citycard_batch_size_count``)."""
        return metric_sum(self.scrape(), name)

    def log_tail(self) -> str:
        return _tail(self.log_path)


def metric_sum(exposition: str, name: str) -> float:
    """Sum the samples called exactly ``name`` in a Prometheus text exposition.

    >>> metric_sum('a_count 3\\na_count{x="1"} 2\\na_counter 9\\n', "a_count")
    5.0
    """
    total = 0.0
    for line in exposition.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name) :]
        if rest[:1] not in ("{", " "):
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def serve_engine(
    dsn: str,
    data_dir: Path,
    *,
    log_dir: Path,
    naive: bool = False,
    batch_max: int | None = None,
    metrics: bool = True,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    name: str = "engine",
) -> Iterator[EngineProcess]:
    """Run ``python -m engine.cli serve`` until the block ends, then SIGTERM it and wait.

    The engine and the benchmark must share ``data_dir`` (its ``master.key``)
    or ``CITYCARD_MASTER_KEY``, so that the benchmark can derive terminal keys.
    Its stdout and stderr go to ``log_dir/<name>.log``.
    """
    last_error: EngineProcessError | None = None
    for attempt in range(ENGINE_START_ATTEMPTS):
        port = free_port(host)
        metrics_port = free_port(host) if metrics else None
        command = [
            sys.executable,
            "-m",
            "engine.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--listen",
            f"{host}:{port}",
            "--metrics",
            f"{host}:{metrics_port}" if metrics_port is not None else "off",
            # No card-office interface: the benchmark does not use it, and a
            # fixed port would collide with another engine on the machine.
            "--admin",
            "off",
            "--dsn",
            dsn,
            "--data-dir",
            str(data_dir),
        ]
        if naive:
            command.append("--naive")
        if batch_max is not None:
            command += ["--batch-max", str(batch_max)]
        log_path = log_dir / f"{name}-{attempt}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=REPOSITORY_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        engine = EngineProcess(process, host, port, metrics_port, log_path, command)
        try:
            _wait_listening(engine)
        except EngineProcessError as error:
            _stop(process)
            last_error = error
            if "already in use" in engine.log_tail() or "Address already in use" in engine.log_tail():
                continue
            raise
        try:
            yield engine
        finally:
            _stop(process)
            if process.returncode not in (0, -signal.SIGTERM):
                # Raised only when the block itself succeeded (contextmanager
                # semantics): an engine that crashed invalidates the figures.
                raise EngineProcessError(
                    f"engine exited with code {process.returncode}; log {log_path}:\n{engine.log_tail()}"
                )
        return
    assert last_error is not None
    raise last_error


def _wait_listening(engine: EngineProcess) -> None:
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            text = engine.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith("{") and '"listening"' in line:
                return
        if engine.process.poll() is not None:
            raise EngineProcessError(
                f"engine exited with code {engine.process.returncode} before listening:\n{engine.log_tail()}"
            )
        time.sleep(ENGINE_POLL_S)
    raise EngineProcessError(f"engine not listening after {ENGINE_START_TIMEOUT_S:.0f} s:\n{engine.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(ENGINE_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""
