"""One CPU-heavy background job at a time per machine: the queue every background process of HeadLab
(app jobs and training runs alike) waits in before it works, and the pauses that let interactive work
and the pages' timings go first.

Turns. A background process calls `cpu_turn(name, kind)` around its work. It waits (polling, its row's
heartbeat fresh) until no other process holds the CPU and no waiting process comes before it. Order:
`INTERACTIVE` work (what the page in front of the user waits for: a Heads analysis, a Gates full-dev
refinement, the Model page's evaluation) before `BACKGROUND` work (training runs, one-time preparation),
first come first served within a kind. Interactive work that finds a background job holding the CPU
does not wait for it: it pauses that job (SIGSTOP of its process group), works, and lets it go on
(SIGCONT) when done. A page timing a model (`paused_for_timing`) pauses whatever holds the CPU for the
few seconds it times, and every process the launcher recorded (`launched`) that is outside a turn:
still importing and loading, or writing its results and shutting down after its turn.

Pauses are recorded here (the row's `state` is "paused" and `paused_by` names the pauser's pid), so
`core.jobs.dead_reason` reads a frozen process, which cannot heartbeat, as alive (`accounts_for`), and
a waiting one too (its row's heartbeat stands in for the job's own). If a pauser dies
without resuming what it paused, the next caller of `reconcile` (every waiting process and every page
poll) resumes it. `core.latency` can tell a timing that overlapped a pause (`pauses_seen` in the
paused process changes on each SIGCONT) and repeat it, so measured latencies never include a pause.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.paths import headlab_home
from core.processes import continue_work, pid_alive, stop_work

INTERACTIVE, BACKGROUND = 0, 1  # priorities: lower goes first
KINDS = {INTERACTIVE: "interactive", BACKGROUND: "background"}
POLL_S = 0.5  # seconds between a waiting process's looks at the queue
TIMING = "a page timing a model"  # the turn a timing holds (`paused_for_timing`)
SCHEMA = """CREATE TABLE IF NOT EXISTS turns (
    name TEXT NOT NULL, pid INTEGER PRIMARY KEY, priority INTEGER NOT NULL, enqueued REAL NOT NULL,
    state TEXT NOT NULL, heartbeat REAL NOT NULL, paused_by INTEGER)"""
PAUSES = "CREATE TABLE IF NOT EXISTS pauses (pid INTEGER NOT NULL, start REAL NOT NULL, end REAL)"  # wall seconds
# processes launched by `core.jobs.start_process`, until they end (`paused_by`: frozen outside a turn by that pid)
LAUNCHED = "CREATE TABLE IF NOT EXISTS launched (pid INTEGER PRIMARY KEY, paused_by INTEGER)"


@dataclass
class Turn:
    """One process's place: `state` is waiting | running | paused (`paused_by`: the pauser's pid)."""

    name: str
    pid: int
    priority: int
    enqueued: float
    state: str
    heartbeat: float
    paused_by: int | None

    @property
    def kind(self) -> str:
        return KINDS[self.priority]


def _connect(db: Path | None = None) -> sqlite3.Connection:
    con = sqlite3.connect(db or headlab_home() / "cpu.sqlite", timeout=10, isolation_level="IMMEDIATE")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(SCHEMA)
    con.execute(PAUSES)
    con.execute(LAUNCHED)
    return con


def _turns(con: sqlite3.Connection) -> list[Turn]:
    return [Turn(*row) for row in con.execute("SELECT * FROM turns ORDER BY priority, enqueued")]


def _reconcile(con: sqlite3.Connection) -> None:
    """Forget rows of dead processes; resume processes whose pauser is gone."""
    for turn in _turns(con):
        if not pid_alive(turn.pid):
            _forget(con, turn.pid)
        elif turn.state == "paused" and not pid_alive(turn.paused_by):
            _resume(con, turn.pid)
    for pid, paused_by in con.execute("SELECT pid, paused_by FROM launched").fetchall():
        if not pid_alive(pid):
            con.execute("DELETE FROM launched WHERE pid=?", (pid,))
        elif paused_by is not None and not pid_alive(paused_by):
            _resume_launched(con, pid)


def launched(pid: int, db: Path | None = None) -> None:
    """Record that `pid` was just launched as background work. Outside a turn (before `cpu_turn`:
    importing, loading; after it: writing results, shutting down) a page's timing freezes it too."""
    with _connect(db) as con:
        con.execute("INSERT OR REPLACE INTO launched VALUES (?, NULL)", (pid,))


def launched_pids(db: Path | None = None) -> list[int]:
    """Pids of the launched processes that still live (`launched`)."""
    with _connect(db) as con:
        _reconcile(con)
        return [pid for (pid,) in con.execute("SELECT pid FROM launched")]


def _resume_launched(con: sqlite3.Connection, pid: int) -> None:
    con.execute("UPDATE launched SET paused_by=NULL WHERE pid=?", (pid,))
    continue_work(pid)


def _forget(con: sqlite3.Connection, pid: int) -> None:
    con.execute("DELETE FROM turns WHERE pid=?", (pid,))
    con.execute("DELETE FROM pauses WHERE pid=?", (pid,))


def _resume(con: sqlite3.Connection, pid: int) -> None:
    """Let paused `pid` go on; its pause ends now."""
    now = time.time()
    con.execute("UPDATE pauses SET end=? WHERE pid=? AND end IS NULL", (now, pid))
    con.execute("UPDATE turns SET state='running', paused_by=NULL, heartbeat=? WHERE pid=?", (now, pid))
    continue_work(pid)


def reconcile(db: Path | None = None) -> list[Turn]:
    """Clean the queue (see `_reconcile`) and return it: the holder first, then the waiting, in order."""
    with _connect(db) as con:
        _reconcile(con)
        turns = _turns(con)
    return sorted(turns, key=lambda t: (t.state == "waiting", t.priority, t.enqueued))


def accounts_for(pid: int, db: Path | None = None) -> bool:
    """True if the queue explains why live process `pid` is silent: it waits for its turn (its row's
    heartbeat is fresh) or the queue froze it on purpose (its pauser lives), in its turn or outside one."""
    with _connect(db) as con:
        row = con.execute("SELECT state, heartbeat, paused_by FROM turns WHERE pid=?", (pid,)).fetchone()
        outside = con.execute("SELECT paused_by FROM launched WHERE pid=?", (pid,)).fetchone()
    if row is None:
        return outside is not None and pid_alive(outside[0])
    state, heartbeat, paused_by = row
    return pid_alive(paused_by) if state == "paused" else state == "waiting" and time.time() - heartbeat < 10 * POLL_S


def _pause(con: sqlite3.Connection, turn: Turn, by: int) -> None:
    if stop_work(turn.pid):
        con.execute("UPDATE turns SET state='paused', paused_by=? WHERE pid=?", (by, turn.pid))
        con.execute("INSERT INTO pauses VALUES (?, ?, NULL)", (turn.pid, time.time()))


def _resume_paused_by(con: sqlite3.Connection, by: int) -> None:
    for (pid,) in con.execute("SELECT pid FROM turns WHERE state='paused' AND paused_by=?", (by,)).fetchall():
        _resume(con, pid)


def _try_take(con: sqlite3.Connection, me: int) -> str | None:
    """Take the CPU for `me` if it is its turn (pausing a background holder for interactive work).
    Returns None when taken, else what `me` waits for."""
    _reconcile(con)
    turns = _turns(con)
    mine = next(t for t in turns if t.pid == me)
    holders = [t for t in turns if t.state != "waiting" and t.pid != me]  # paused ones still hold it
    ahead = [t for t in turns if t.state == "waiting" and t.pid != me
             and (t.priority, t.enqueued) < (mine.priority, mine.enqueued)]
    if ahead:
        return f"{ahead[0].name} ({ahead[0].kind}) goes first"
    busy = [t for t in holders if not (mine.priority == INTERACTIVE and t.priority == BACKGROUND)]
    if busy:
        return f"{busy[0].name} is running"
    for holder in holders:  # interactive work pauses background work rather than waiting behind it
        if holder.state == "running" or not pid_alive(holder.paused_by):
            _pause(con, holder, me)
        else:  # frozen by a page's timing: keep it frozen after that timing, until this work is done
            con.execute("UPDATE turns SET paused_by=? WHERE pid=?", (me, holder.pid))
    con.execute("UPDATE turns SET state='running', heartbeat=? WHERE pid=?", (time.time(), me))
    return None


@contextlib.contextmanager
def cpu_turn(name: str, priority: int = BACKGROUND, *, progress: Callable[[int, int, str], None] | None = None,
             db: Path | None = None, poll_s: float = POLL_S) -> Iterator[None]:
    """Hold this machine's CPU turn for the block: wait for it first (reporting "waiting for the CPU: ..."
    through `progress`), give it back after, and let go on whatever this process paused."""
    me = os.getpid()
    with _connect(db) as con:
        now = time.time()
        con.execute("INSERT OR REPLACE INTO turns VALUES (?, ?, ?, ?, 'waiting', ?, NULL)",
                    (name, me, priority, now, now))
    try:
        while True:
            with _connect(db) as con:
                waits_for = _try_take(con, me)
                if waits_for is None:
                    break
                con.execute("UPDATE turns SET heartbeat=? WHERE pid=?", (time.time(), me))
            if progress:
                progress(0, 0, f"waiting for the CPU: {waits_for}")
            time.sleep(poll_s)
        yield
    finally:
        with _connect(db) as con:
            _resume_paused_by(con, me)
            _forget(con, me)


@contextlib.contextmanager
def paused_for_timing(db: Path | None = None) -> Iterator[int]:
    """Freeze every process holding a CPU turn, and every launched one outside a turn (`launched`: a job
    started a moment ago, importing and loading before it asks for its turn, or one that just gave its
    turn back and writes its results and shuts down), while the block times a model; yields how many were
    frozen. They go on when the block ends, even on error. Processes waiting for a turn only poll.

    The block also holds a turn itself (TIMING, interactive) unless this process has one already, so
    work that asks for its turn meanwhile waits until the timing is done."""
    me = os.getpid()
    with _connect(db) as con:
        _reconcile(con)
        turns = _turns(con)
        holders = [t for t in turns if t.state == "running" and t.pid != me]
        for turn in holders:
            _pause(con, turn, me)
        outside = [pid for (pid,) in con.execute(  # launched, holding no turn and not waiting for one
            "SELECT pid FROM launched WHERE paused_by IS NULL AND pid != ? AND pid NOT IN (SELECT pid FROM turns)",
            (me,)).fetchall() if stop_work(pid)]
        con.executemany("UPDATE launched SET paused_by=? WHERE pid=?", [(me, pid) for pid in outside])
        own = not any(t.pid == me for t in turns)
        if own:
            now = time.time()
            con.execute("INSERT INTO turns VALUES (?, ?, ?, ?, 'running', ?, NULL)",
                        (TIMING, me, INTERACTIVE, now, now))
    try:
        yield len(holders) + len(outside)
    finally:
        with _connect(db) as con:
            _resume_paused_by(con, me)
            for (pid,) in con.execute("SELECT pid FROM launched WHERE paused_by=?", (me,)).fetchall():
                _resume_launched(con, pid)
            if own:
                _forget(con, me)


_pauses = 0


def _count_pause(signum, frame) -> None:
    global _pauses
    _pauses += 1


def paused_seconds(pid: int | None = None, db: Path | None = None) -> float:
    """Wall seconds process `pid` (default: this one) has spent paused by the queue while it held its
    current turn (a pause still going on counts up to now)."""
    with _connect(db) as con:
        row = con.execute("SELECT SUM(COALESCE(end, ?) - start) FROM pauses WHERE pid=?",
                          (time.time(), pid or os.getpid())).fetchone()
    return float(row[0] or 0.0)


class ActiveClock:
    """Wall time without this process's pauses: `now()` is time.time() minus `paused_seconds()`, the
    queue read again only after a SIGCONT (`pauses_seen` changed; needs `watch_pauses`), so a block timed
    with it (e.g. a training run's clock) never counts the time the process was frozen."""

    def __init__(self, db: Path | None = None):
        self.db, self._seen, self._paused = db, pauses_seen(), 0.0

    def now(self) -> float:
        if pauses_seen() != self._seen:
            self._seen, self._paused = pauses_seen(), paused_seconds(db=self.db)
        return time.time() - self._paused

    @property
    def paused(self) -> float:
        """Seconds paused so far (as of the last SIGCONT)."""
        self.now()
        return self._paused


def pauses_seen() -> int:
    """How many times this process was let go on after a pause (SIGCONTs received since `watch_pauses`)."""
    return _pauses


def watch_pauses() -> None:
    """Count this process's SIGCONTs (`pauses_seen`), so a timing can tell it overlapped a pause."""
    signal.signal(signal.SIGCONT, _count_pause)
