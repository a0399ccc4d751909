"""The ``citycard`` command line, run as an operator would: in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.migrate import discover

REPO = Path(__file__).resolve().parent.parent
# Seconds a command may take; serve and demo print their banner well before.
COMMAND_TIMEOUT_S = 120


def citycard(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args, "--data-dir", str(data_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """A `citycard serve`/`demo` subprocess, stopped with SIGTERM."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output: list[str] = []

    def wait_for(self, pattern: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"process ended: {self.process.wait()} {self.process.stderr.read()}")  # type: ignore[union-attr]
            self.output.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"{pattern!r} not printed in time")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture
def served() -> Iterator[Callable[[list[str]], Served]]:
    started: list[Served] = []

    def start(args: list[str]) -> Served:
        process = Served(args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.stop()


def test_migrate_is_idempotent(fresh_db: Callable[..., str], tmp_path: Path) -> None:
    dsn = fresh_db(migrated=False)
    first = citycard("migrate", "--dsn", dsn, data_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["applied"] == [migration.version for migration in discover()]
    second = citycard("migrate", "--dsn", dsn, data_dir=tmp_path)
    assert json.loads(second.stdout)["applied"] == []


def test_seed_then_status_then_seed_again(fresh_db: Callable[..., str], tmp_path: Path) -> None:
    dsn = fresh_db(migrated=False)
    seeded = citycard("seed", "--cards", "300", "--dsn", dsn, data_dir=tmp_path)
    assert seeded.returncode == 0, seeded.stderr
    assert json.loads(seeded.stdout)["seeded"]["cards"] == 300
    status = citycard("status", "--dsn", dsn, data_dir=tmp_path)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["cards"] == 300 and report["ledger_balanced"] is True
    again = citycard("seed", "--cards", "300", "--dsn", dsn, data_dir=tmp_path)
    assert again.returncode == 2
    assert "already" in again.stderr.lower()


def test_unreachable_database(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = citycard("migrate", "--dsn", f"postgresql://postgres@127.0.0.1:{port}/x", data_dir=tmp_path)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", ":80"])
def test_bad_listen_address(tmp_path: Path, listen: str) -> None:
    result = citycard("serve", "--listen", listen, "--dsn", "postgresql://unused/x", data_dir=tmp_path)
    assert result.returncode == 2
    assert "--listen must be HOST:PORT" in result.stderr


def test_port_in_use(seeded_dsn: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = citycard(
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics",
            "off",
            "--admin",
            "off",
            "--dsn",
            seeded_dsn,
            data_dir=tmp_path,
        )
    assert result.returncode == 1
    assert "already in use" in result.stderr


def test_serve_tap_and_terminal_key(seeded_dsn: str, tmp_path: Path, served: Callable[[list[str]], Served]) -> None:
    port = free_port()
    engine = served(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics",
            "off",
            "--admin",
            "off",
            "--dsn",
            seeded_dsn,
            "--data-dir",
            str(tmp_path),
        ]
    )
    banner = json.loads(engine.wait_for("listening"))
    assert banner["listening"] == f"127.0.0.1:{port}"
    import asyncio

    import asyncpg

    async def pick() -> tuple[int, int]:
        conn = await asyncpg.connect(seeded_dsn)
        try:
            terminal = await conn.fetchval("SELECT id FROM terminals WHERE kind = 0 AND status = 0 ORDER BY id LIMIT 1")
            card = await conn.fetchval(
                "SELECT c.uid FROM cards c JOIN accounts a ON a.id = c.account_id"
                " WHERE c.status = 0 AND a.balance_cents >= 1000 ORDER BY c.uid LIMIT 1"
            )
            return int(terminal), int(card)
        finally:
            await conn.close()

    terminal, card = asyncio.run(pick())
    tapped = citycard(
        "tap", "--engine", f"127.0.0.1:{port}", "--terminal", str(terminal), "--card", str(card), data_dir=tmp_path
    )
    assert tapped.returncode == 0, tapped.stderr
    assert json.loads(tapped.stdout)["result"] == "APPROVED"
    unknown = citycard(
        "tap", "--engine", f"127.0.0.1:{port}", "--terminal", str(terminal), "--card", "0x1", data_dir=tmp_path
    )
    assert unknown.returncode == 3
    assert json.loads(unknown.stdout)["result"] == "UNKNOWN_CARD"
    key = citycard("terminal-key", "--terminal", str(terminal), "--dsn", seeded_dsn, data_dir=tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}", json.loads(key.stdout)["key"])
    assert engine.stop() == 0


@pytest.mark.slow
def test_demo_on_the_embedded_database(tmp_path: Path, served: Callable[[list[str]], Served]) -> None:
    """What a new user runs: no DSN, an embedded PostgreSQL, a seeded city, a tap."""
    env_without_dsn = {key: value for key, value in os.environ.items() if key != "CITYCARD_DSN"}
    port = free_port()
    data_dir = tmp_path / "var"
    demo = Served.__new__(Served)
    demo.process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "demo",
            "--cards",
            "500",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics",
            "off",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_dsn,
    )
    demo.output = []
    try:
        tap_line = demo.wait_for(r"citycard tap")
        command = tap_line.split()
        terminal = command[command.index("--terminal") + 1]
        card = command[command.index("--card") + 1]
        tapped = citycard(
            "tap", "--engine", f"127.0.0.1:{port}", "--terminal", terminal, "--card", card, data_dir=data_dir
        )
        assert tapped.returncode == 0, tapped.stderr
        assert json.loads(tapped.stdout)["result"] == "APPROVED"
    finally:
        assert demo.stop() == 0
    assert (data_dir / "pg" / "pgdata" / "PG_VERSION").exists()
    assert not (data_dir / "pg" / "pgdata" / "postmaster.pid").exists()  # the demo stopped the server it started
