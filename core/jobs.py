"""A tiny embedded store (SQLite, WAL) of background jobs' progress, polled by the app.

Long work never runs inside a Streamlit rerun: the page starts `python -m core ...` as a separate
process, which reports here; the page reads the row on each poll. A job whose process is gone
without finishing is reported as failed with the error its log shows (an `error: ...` line, the last
line of a traceback), or as interrupted if the log shows none; never left "running" forever.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.messages import quote
from core.paths import headlab_home

SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY, status TEXT NOT NULL, done INTEGER, total INTEGER, message TEXT,
    pid INTEGER, started REAL, heartbeat REAL, error TEXT)"""
STALE_S = 120.0  # a running job that has not reported for this long is treated as dead
START = "=== HeadLab job started"  # begins each start's part of a job's log
LOG_TAIL = 1 << 16  # bytes at the end of a log searched for its error line
ERROR_LIMIT = 300  # characters of a log's error line shown


@dataclass
class JobState:
    """One job's row: `status` is running | done | failed | interrupted."""

    name: str
    status: str
    done: int
    total: int
    message: str
    pid: int | None
    started: float
    heartbeat: float
    error: str | None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def _connect(db: Path | None = None) -> sqlite3.Connection:
    con = sqlite3.connect(db or headlab_home() / "jobs.sqlite", timeout=10)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(SCHEMA)
    return con


def pid_alive(pid: int | None) -> bool:
    """True if process `pid` exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a finished child stays a zombie until reaped: not alive for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _register(name: str, pid: int, db: Path | None) -> None:
    """(Re)start job `name`'s row as running in process `pid`."""
    with _connect(db) as con:
        now = time.time()
        con.execute("INSERT OR REPLACE INTO jobs VALUES (?, 'running', 0, 0, 'starting', ?, ?, ?, NULL)",
                    (name, pid, now, now))


class JobReporter:
    """Progress callback `(done, total, message)` that writes the job's row (throttled to ~2/s)."""

    def __init__(self, name: str, db: Path | None = None):
        self.name, self.db, self._last = name, db, 0.0
        _register(name, os.getpid(), db)

    def __call__(self, done: int, total: int, message: str) -> None:
        now = time.time()
        if now - self._last < 0.5 and done < total:
            return
        self._last = now
        with _connect(self.db) as con:
            con.execute("UPDATE jobs SET done=?, total=?, message=?, heartbeat=? WHERE name=?",
                        (done, total, message, now, self.name))

    def finish(self, error: str | None = None) -> None:
        with _connect(self.db) as con:
            con.execute("UPDATE jobs SET status=?, error=?, heartbeat=? WHERE name=?",
                        ("failed" if error else "done", error, time.time(), self.name))


def job_log(name: str) -> Path:
    """The log file of job `name`: what its process printed, every start appended."""
    return headlab_home() / "logs" / f"{name}.log"


def log_error(name: str) -> str | None:
    """The last error line job `name` logged since its latest start: an `error: ...` line (without the
    prefix) or the last line of a Python traceback, cut to `ERROR_LIMIT` characters; None if none."""
    path = job_log(name)
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = tail.rsplit(START, 1)[-1].splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("error: "):
            return quote(lines[i].removeprefix("error: "), ERROR_LIMIT)
        if lines[i].startswith("Traceback (most recent call last):"):
            ends = [line for line in lines[i + 1:] if line.strip() and not line[0].isspace()]
            return quote(ends[-1], ERROR_LIMIT) if ends else None
    return None


def job_state(name: str, db: Path | None = None) -> JobState | None:
    """The job's row. A dead or silent 'running' job reads as 'failed' with its log's error line
    (`log_error`), or as 'interrupted' if the log has none."""
    with _connect(db) as con:
        row = con.execute("SELECT * FROM jobs WHERE name=?", (name,)).fetchone()
    if row is None:
        return None
    state = JobState(*row)
    if state.status == "running" and (not pid_alive(state.pid) or time.time() - state.heartbeat > STALE_S):
        logged = state.error or log_error(name)
        state.status = "failed" if logged else "interrupted"
        state.error = logged or "the job's process ended without finishing"
    return state


BACKGROUND_ENV = "HEADLAB_BACKGROUND_JOB"  # set for jobs the app starts: their log files need no progress bar


def start_job(name: str, args: list[str], db: Path | None = None) -> subprocess.Popen:
    """Run `python -m <args>` detached from the caller, logging to $HEADLAB_HOME/logs/<name>.log."""
    state = job_state(name, db)
    if state and state.status == "running":
        raise RuntimeError(f"Job '{name}' is already running (pid {state.pid}).")
    log_path = job_log(name)
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n{START} {time.strftime('%Y-%m-%d %H:%M:%S')}: python -m {' '.join(args)}\n".encode())
        log.flush()  # before the child's output
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=Path(__file__).resolve().parent.parent, env={**os.environ, BACKGROUND_ENV: "1"})
    # Record the job before returning so the next poll sees it running (and does not start it again).
    _register(name, proc.pid, db)
    return proc


def cancel_job(name: str, db: Path | None = None) -> bool:
    """Stop a running job (SIGTERM to its process group) and forget it, so it can be started afresh.

    Returns True if a running job was stopped. What the job already wrote (atomic outputs) stays.
    """
    state = job_state(name, db)
    stopped = False
    if state is not None and state.status == "running" and state.pid:
        try:
            os.killpg(state.pid, signal.SIGTERM)  # start_job runs each job in its own session
            stopped = True
        except (ProcessLookupError, PermissionError):
            pass
    with _connect(db) as con:
        con.execute("DELETE FROM jobs WHERE name=?", (name,))
    return stopped
