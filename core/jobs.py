"""The one background-work layer: how HeadLab starts, watches and judges processes that work on their
own, and the tiny embedded store (SQLite, WAL) of app jobs' progress, polled by the app.

Long work never runs inside a Streamlit rerun: the page starts a separate process and polls what it
reports. Two kinds of work share the mechanics here:

- app jobs (`start_job`: `python -m core|analysis|pruning ... --job NAME`) report to the `jobs`
  table of $HEADLAB_HOME/jobs.sqlite (`JobReporter`);
- training runs (`pruning.launch`: `python -m pruning train` or `torchrun ... -m pruning train`)
  report to the run store (`pruning.runs`).

Both start through `start_process` (detached in its own session, stdin closed, cwd the repository,
output appended to a log file after a `START` line) and are judged by one rule, `dead_reason`: a
process that says it works is dead when its pid is gone (`pid_alive`) or its last heartbeat is older
than `STALE_S` (`is_stale`). A dead job reads as failed with the error its log shows (an `error: ...`
line, the last line of a traceback), or as interrupted if the log shows none; never left "running"
forever. Files the work writes go through `core.folders` (`atomic_file`, `atomic_folder`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.cpu_queue import accounts_for, launched, launched_pids, reconcile
from core.messages import quote
from core.paths import headlab_home
from core.processes import continue_work, pid_alive, signal_work

SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY, status TEXT NOT NULL, done INTEGER, total INTEGER, message TEXT,
    pid INTEGER, started REAL, heartbeat REAL, error TEXT)"""
STALE_S = 120.0  # seconds: a running job or run whose process has not reported for this long is dead
BACKGROUND_NICE = 10  # niceness of background processes: the app's server goes first
BACKGROUND_ENV = "HEADLAB_BACKGROUND_JOB"  # set for background processes: their log files need no progress bar
REPO = Path(__file__).resolve().parent.parent  # the working folder of every background process
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


def is_stale(heartbeat: float, now: float | None = None) -> bool:
    """True if a process's last sign of life at `heartbeat` (Unix seconds) is more than `STALE_S` ago."""
    return (time.time() if now is None else now) - heartbeat > STALE_S


def dead_reason(pid: int | None, heartbeat: float, now: float | None = None) -> str | None:
    """Why work said to run in process `pid`, last heard of at `heartbeat` (Unix seconds), is dead: its
    process is gone (`pid_alive`) or silent (`is_stale`) without the CPU queue accounting for the
    silence (waiting for its turn, or paused: `core.cpu_queue.accounts_for`). None while it lives."""
    now = time.time() if now is None else now
    if not pid_alive(pid):
        return f"the job's process (pid {pid}) ended without finishing"
    if is_stale(heartbeat, now) and not accounts_for(pid):
        return f"the job's process (pid {pid}) has not reported for {now - heartbeat:.0f} s"
    return None


def python_command(args: list[str]) -> list[str]:
    """`python -m <args>` with this interpreter."""
    return [sys.executable, "-m", *args]


def start_process(command: list[str], log: str | Path) -> subprocess.Popen:
    """The one launcher: run `command` (e.g. `python_command(...)` or a torchrun command) detached from
    the caller, in its own session (so `os.killpg(pid, ...)` reaches all its processes), stdin closed,
    cwd the repository, `BACKGROUND_ENV` set, stdout and stderr appended to `log` after a `START` line
    naming the command, and recorded in the CPU queue (`core.cpu_queue.launched`). Returns at
    once."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = shlex.join(["python" if command[0] == sys.executable else command[0], *command[1:]])
    with open(log, "ab") as out:
        out.write(f"\n{START} {time.strftime('%Y-%m-%d %H:%M:%S')}: {shown}\n".encode())
        out.flush()  # before the child's output
        # niced from its first instruction: its imports and model loading, before `run_command` runs, already
        # take a core (`nice` execs the command, so the pid is the command's)
        proc = subprocess.Popen(["nice", "-n", str(BACKGROUND_NICE), *command], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO,
                                env={**os.environ, BACKGROUND_ENV: "1"})
    launched(proc.pid)  # a page's timing freezes it outside its turn too
    return proc


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
    why = dead_reason(state.pid, state.heartbeat) if state.status == "running" else None
    if why:
        logged = state.error or log_error(name)
        state.status = "failed" if logged else "interrupted"
        state.error = logged or why
    return state


def start_job(name: str, args: list[str], db: Path | None = None) -> subprocess.Popen:
    """Run `python -m <args>` as job `name` (`start_process`), logging to $HEADLAB_HOME/logs/<name>.log."""
    state = job_state(name, db)
    if state and state.status == "running":
        raise RuntimeError(f"Job '{name}' is already running (pid {state.pid}).")
    proc = start_process(python_command(args), job_log(name))
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
            os.killpg(state.pid, signal.SIGTERM)  # start_process runs each job in its own session
            stopped = True
        except (ProcessLookupError, PermissionError):
            pass
    with _connect(db) as con:
        con.execute("DELETE FROM jobs WHERE name=?", (name,))
    return stopped


def stop_background_work(home: Path, extra_pids: set[int] = frozenset()) -> None:
    """End every background process started for HEADLAB_HOME `home`: its running app jobs, whatever holds or
    waits for a CPU turn or was launched and lives, and `extra_pids` (e.g. training runs started with --parallel).
    Paused work is let go on first, so that it acts on the SIGTERM."""
    pids = set(extra_pids)
    if (home / "jobs.sqlite").exists():
        with contextlib.closing(_connect(home / "jobs.sqlite")) as con:
            pids |= {pid for (pid,) in con.execute("SELECT pid FROM jobs WHERE status='running'") if pid}
    if (home / "cpu.sqlite").exists():
        pids |= {turn.pid for turn in reconcile(home / "cpu.sqlite")} | set(launched_pids(home / "cpu.sqlite"))
    pids.discard(os.getpid())  # a timing in this very process holds a turn too (`paused_for_timing`)
    for pid in pids:
        continue_work(pid)
        signal_work(pid, signal.SIGTERM)
