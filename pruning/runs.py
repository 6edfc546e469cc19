"""The run store of pruning jobs (SQLite, WAL).

A training job (`python -m pruning train`, started in the background by `pruning.launch`) is a
separate process. It writes here; the app and the CLI only read (and set the stop flag). Tables, in
$HEADLAB_HOME/runs.sqlite by default:

    runs     id, config (JSON), status, pid, heartbeat, error, created, run_dir, step, total, message,
             stop flag, attempt (1 + times resumed), result (JSON of the final metrics), processes
             (1, or the torchrun process count; a store written before it had the column gains it)
    metrics  one row per eval step: (run, step, attempt) -> JSON of the live metrics
    gates    one row per eval step: (run, step, attempt) -> GateState JSON (deterministic gates)

Status: queued -> running -> done | failed | stopped; a queued or running run whose process is gone
(kill -9, out of memory, power cut) or silent for `core.jobs.STALE_S` reads as interrupted, with an
error saying so (`core.jobs.dead_reason`, the rule app jobs are judged by too). Stopped, interrupted
and failed runs can be resumed from their last checkpoint: the rows a crashed attempt wrote after
that checkpoint are kept but marked superseded, so the curve continues where the checkpoint left it
and nothing recorded is deleted. One run trains at a time: `claim`
lets the oldest waiting run go first.

The run folder (checkpoints: `pruning.checkpoints`; the final model; train.log) is created with a
`core.folders` marker naming the run and its store, so that `delete` removes only folders the store
created.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.folders import check_target, new_folder, remove_owned
from core.jobs import dead_reason, is_stale
from core.paths import headlab_home
from pruning.gate_state import GateState
from pruning.record import StepRecord

RESUMABLE = ("failed", "interrupted", "stopped")
WRITER = "pruning.runs"  # names the store in a run folder's marker (core.folders)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, config TEXT NOT NULL, status TEXT NOT NULL, pid INTEGER,
        heartbeat REAL, error TEXT, created REAL NOT NULL, run_dir TEXT NOT NULL, step INTEGER DEFAULT 0,
        total INTEGER DEFAULT 0, message TEXT DEFAULT '', stop INTEGER DEFAULT 0, attempt INTEGER DEFAULT 1,
        result TEXT, processes INTEGER NOT NULL DEFAULT 1)""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id INTEGER NOT NULL, step INTEGER NOT NULL, attempt INTEGER NOT NULL, superseded INTEGER DEFAULT 0,
        time REAL NOT NULL, data TEXT NOT NULL, PRIMARY KEY (run_id, step, attempt))""",
    """CREATE TABLE IF NOT EXISTS gates (
        run_id INTEGER NOT NULL, step INTEGER NOT NULL, attempt INTEGER NOT NULL, superseded INTEGER DEFAULT 0,
        state TEXT NOT NULL, PRIMARY KEY (run_id, step, attempt))""",
)


@dataclass
class Run:
    """One row of `runs`. Times are Unix seconds; `step`/`total` count optimizer steps; `processes` is
    how many processes train it (torchrun; 1 otherwise); `store` is the database the row is in."""

    id: int
    config: dict
    status: str
    pid: int | None
    heartbeat: float | None
    error: str | None
    created: float
    run_dir: Path
    step: int
    total: int
    message: str
    stop_requested: bool
    attempt: int
    result: dict | None
    processes: int
    store: Path

    @property
    def active(self) -> bool:
        """Queued or running (after dead-process detection)."""
        return self.status in ("queued", "running")

    @property
    def final(self) -> StepRecord | None:
        """The final evaluation of a finished run (`result`, on the whole dev split) as a StepRecord, or None."""
        return StepRecord.from_dict(self.result) if self.result else None


class RunStore:
    """The run store at `db` (default $HEADLAB_HOME/runs.sqlite). Every call opens its own connection,
    so one store object may be used from several threads and many processes may share the file."""

    def __init__(self, db: str | Path | None = None):
        self.db = Path(db) if db is not None else headlab_home() / "runs.sqlite"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            for statement in SCHEMA:
                con.execute(statement)
            columns = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
            if "processes" not in columns:  # a store written before runs recorded their process count
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it meanwhile
                    con.execute("ALTER TABLE runs ADD COLUMN processes INTEGER NOT NULL DEFAULT 1")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode, closed on exit; use `_transaction` to group writes."""
        con = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (rolled back on error): read-check-write without races."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ------------------------------------------------------------------ runs

    def create(self, config: dict, run_dir: str | Path | None = None) -> int:
        """Add a queued run with `config` (JSON-able dict); its folder is `run_dir` (default
        <store folder>/runs/run-<id>-<date>-<time>-<pid>), created with a marker file. Returns the new id.

        Raises `core.folders.FolderError` (a ValueError) if `run_dir` is a file or a non-empty folder
        (a run never writes into a foreign folder).
        """
        if run_dir is not None:
            run_dir = check_target(Path(run_dir).expanduser().resolve(), written_by=WRITER)
        text = json.dumps(config)
        with self._transaction() as con:
            cur = con.execute("INSERT INTO runs (config, status, created, run_dir) VALUES (?, 'queued', ?, '')",
                              (text, time.time()))
            run_id = int(cur.lastrowid)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            folder = run_dir or (self.db.parent / "runs" / f"run-{run_id}-{stamp}-{os.getpid()}").resolve()
            con.execute("UPDATE runs SET run_dir=? WHERE id=?", (str(folder), run_id))
        new_folder(folder, written_by=WRITER, run_id=run_id, store=str(self.db.resolve()))
        return run_id

    def _row(self, con: sqlite3.Connection, run_id: int) -> Run:
        row = con.execute("SELECT id, config, status, pid, heartbeat, error, created, run_dir, step, total, "
                          "message, stop, attempt, result, processes FROM runs WHERE id=?", (int(run_id),)).fetchone()
        if row is None:
            raise ValueError(f"There is no run {run_id} in {self.db}.")
        return Run(id=row[0], config=json.loads(row[1]), status=row[2], pid=row[3], heartbeat=row[4], error=row[5],
                   created=row[6], run_dir=Path(row[7]), step=row[8], total=row[9], message=row[10] or "",
                   stop_requested=bool(row[11]), attempt=row[12], result=json.loads(row[13]) if row[13] else None,
                   processes=row[14], store=self.db)

    def _reap(self, con: sqlite3.Connection, run: Run) -> Run:
        """Mark `run` interrupted if it is queued/running but its process is gone or silent
        (`core.jobs.dead_reason`)."""
        if not run.active:
            return run
        if run.pid is None:  # created but never started by a process
            why = "the run was created but no process ever started it" if is_stale(run.created) else None
        else:
            why = dead_reason(run.pid, run.heartbeat or run.created)
        if why:
            con.execute("UPDATE runs SET status='interrupted', error=COALESCE(error, ?) WHERE id=? AND status=?",
                        (why, run.id, run.status))
            run.status, run.error = "interrupted", run.error or why
        return run

    def get(self, run_id: int) -> Run:
        """The run, with a dead queued/running run reported (and recorded) as interrupted. ValueError if unknown."""
        with self._connect() as con:
            return self._reap(con, self._row(con, run_id))

    def list(self) -> list[Run]:
        """Every run, newest first (dead ones reported as interrupted)."""
        with self._connect() as con:
            ids = [r[0] for r in con.execute("SELECT id FROM runs ORDER BY id DESC")]
            return [self._reap(con, self._row(con, i)) for i in ids]

    def enqueue(self, run_id: int, pid: int | None = None, processes: int = 1) -> Run:
        """Put a new or resumable run in the queue for process `pid` (default this one), trained by
        `processes` processes (torchrun; the store watches `pid`, the launcher's).

        A resumed run starts a new attempt (its earlier rows stay). ValueError if the run is active in
        another live process or already done.
        """
        pid = pid or os.getpid()
        with self._transaction() as con:
            run = self._reap(con, self._row(con, run_id))
            if run.status == "done":
                raise ValueError(f"Run {run_id} is already done; start a new run instead.")
            if run.active and run.pid not in (None, pid):
                raise ValueError(f"Run {run_id} is already {run.status} in process {run.pid}.")
            if run.active and run.pid == pid:  # queued by its launcher, or claimed already: nothing to do
                return run
            again = run.status in RESUMABLE  # a new attempt; a queued run (launched or not) keeps its own
            con.execute("UPDATE runs SET status='queued', pid=?, processes=?, heartbeat=?, stop=0, error=NULL, "
                        "attempt=attempt + ? WHERE id=?", (pid, int(processes), time.time(), int(again), run_id))
            return self._row(con, run_id)

    def claim(self, run_id: int, *, exclusive: bool = True) -> bool:
        """Move queued `run_id` to running if it is its turn: with `exclusive`, no other run is running
        and no older queued run is waiting in a live process. Returns True when claimed."""
        with self._transaction() as con:
            run = self._row(con, run_id)
            if run.status != "queued":
                raise ValueError(f"Run {run_id} is {run.status}, not queued.")
            if exclusive:
                others = [self._reap(con, self._row(con, i)) for (i,) in
                          con.execute("SELECT id FROM runs WHERE id != ? AND status IN ('queued', 'running')",
                                      (run_id,))]
                if any(o.status == "running" or (o.status == "queued" and o.pid is not None and o.id < run_id)
                       for o in others):
                    return False
            con.execute("UPDATE runs SET status='running', heartbeat=?, message='starting' WHERE id=?",
                        (time.time(), run_id))
            return True

    def wait_turn(self, run_id: int, *, exclusive: bool = True, poll_s: float = 1.0, on_wait=None) -> bool:
        """Block until `claim` succeeds (heartbeating while queued). Returns False if a stop was requested
        meanwhile (the run is then marked stopped). `on_wait(message)` is called while waiting."""
        while True:
            if self.stop_requested(run_id):
                self.finish(run_id, "stopped")
                return False
            if self.claim(run_id, exclusive=exclusive):
                return True
            self.heartbeat(run_id, message="waiting for another run to finish")
            if on_wait:
                on_wait("waiting for another run to finish")
            time.sleep(poll_s)

    def heartbeat(self, run_id: int, step: int | None = None, total: int | None = None,
                  message: str | None = None) -> None:
        """Record that the job is alive (and, optionally, its progress)."""
        with self._connect() as con:
            con.execute("UPDATE runs SET heartbeat=?, step=COALESCE(?, step), total=COALESCE(?, total), "
                        "message=COALESCE(?, message) WHERE id=?", (time.time(), step, total, message, run_id))

    def finish(self, run_id: int, status: str, *, error: str | None = None, result: dict | None = None) -> None:
        """End the current attempt as done / failed / stopped / interrupted, with an error line or a result."""
        if status not in ("done", "failed", "stopped", "interrupted"):
            raise ValueError(f"A run finishes as done, failed, stopped or interrupted. Got {status!r}.")
        with self._connect() as con:
            con.execute("UPDATE runs SET status=?, error=?, result=COALESCE(?, result), heartbeat=? WHERE id=?",
                        (status, error, json.dumps(result) if result is not None else None, time.time(), run_id))

    def request_stop(self, run_id: int) -> Run:
        """Ask a queued or running run to stop (it checkpoints and ends as 'stopped'). ValueError if the
        run is not active."""
        with self._transaction() as con:
            run = self._reap(con, self._row(con, run_id))
            if not run.active:
                raise ValueError(f"Run {run_id} is {run.status}; only a queued or running run can be stopped.")
            con.execute("UPDATE runs SET stop=1 WHERE id=?", (run_id,))
            return self._row(con, run_id)

    def stop_requested(self, run_id: int) -> bool:
        with self._connect() as con:
            row = con.execute("SELECT stop FROM runs WHERE id=?", (run_id,)).fetchone()
        return bool(row and row[0])

    def delete(self, run_id: int) -> None:
        """Remove a run that is not active: its rows, and its folder if the store created it (marker)."""
        with self._transaction() as con:
            run = self._reap(con, self._row(con, run_id))
            if run.active:
                raise ValueError(f"Run {run_id} is {run.status} (pid {run.pid}); stop it before deleting it.")
            for table, key in (("metrics", "run_id"), ("gates", "run_id"), ("runs", "id")):
                con.execute(f"DELETE FROM {table} WHERE {key}=?", (run_id,))
        remove_owned(run.run_dir, written_by=WRITER, run_id=run_id, store=str(self.db.resolve()))

    # ------------------------------------------------------------------ metrics and gates

    def add_metrics(self, run_id: int, step: int, metrics: dict, attempt: int) -> None:
        """Record the live metrics of eval step `step` (JSON-able dict; NaN is stored as null)."""
        text = json.dumps(_finite(metrics))
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO metrics (run_id, step, attempt, time, data) VALUES (?, ?, ?, ?, ?)",
                        (run_id, int(step), attempt, time.time(), text))

    def metrics(self, run_id: int, *, superseded: bool = False) -> list[dict]:
        """Metrics rows in step order, each the recorded dict plus `step` and `attempt` (and `superseded`
        when asked for the rows of abandoned attempts too)."""
        query = "SELECT step, attempt, superseded, data FROM metrics WHERE run_id=?"
        query += "" if superseded else " AND superseded=0"
        with self._connect() as con:
            rows = con.execute(query + " ORDER BY step, attempt", (run_id,)).fetchall()
        out = []
        for step, attempt, gone, data in rows:
            row = {**json.loads(data), "step": step, "attempt": attempt}
            if superseded:
                row["superseded"] = bool(gone)
            out.append(row)
        return out

    def records(self, run_id: int) -> list[StepRecord]:
        """The current curve's eval steps (`metrics`) as StepRecords, in step order."""
        return [StepRecord.from_dict(row) for row in self.metrics(run_id)]

    def add_gates(self, run_id: int, step: int, state: GateState, attempt: int) -> None:
        """Record the (deterministic) gate state at eval step `step`."""
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO gates (run_id, step, attempt, state) VALUES (?, ?, ?, ?)",
                        (run_id, int(step), attempt, state.to_json()))

    def gate_steps(self, run_id: int) -> list[int]:
        """Steps with a gate snapshot (current curve only), ascending."""
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT step FROM gates WHERE run_id=? AND superseded=0 ORDER BY step",
                                              (run_id,))]

    def gates(self, run_id: int, step: int | None = None) -> GateState:
        """The gate snapshot at `step` (default: the latest). ValueError if there is none."""
        query = "SELECT state FROM gates WHERE run_id=? AND superseded=0"
        args: tuple = (run_id,)
        if step is not None:
            query += " AND step=?"
            args = (run_id, int(step))
        with self._connect() as con:
            row = con.execute(query + " ORDER BY step DESC, attempt DESC LIMIT 1", args).fetchone()
        if row is None:
            raise ValueError(f"Run {run_id} has no gate snapshot" + (f" at step {step}." if step is not None else "."))
        return GateState.from_json(row[0])

    def supersede_after(self, run_id: int, step: int) -> None:
        """Mark metrics and gate rows after `step` as superseded (a resume restarts from that step)."""
        with self._transaction() as con:
            for table in ("metrics", "gates"):
                con.execute(f"UPDATE {table} SET superseded=1 WHERE run_id=? AND step>?", (run_id, int(step)))


def _finite(value):
    """Replace NaN / inf floats (not JSON) by None, recursively."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Heartbeat:
    """A daemon thread calling `store.heartbeat(run_id)` every `every` seconds while in the `with` block,
    so that long single steps (scoring heads, the full dev evaluation) never look like a dead job."""

    def __init__(self, store: RunStore, run_id: int, every: float = 10.0):
        self.store, self.run_id, self.every = store, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{run_id}")

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(sqlite3.Error):
                self.store.heartbeat(self.run_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
