"""The machine's CPU queue (core.cpu_queue): one background job at a time, interactive work first and
pausing background work, pages' timings freezing the holder, pauses never read as death.

Each worker is a real process that takes a turn and then ticks (appends a timestamp to a file) until
told to stop; the tests read the ticks and the kernel's process state ("T" = stopped).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import cpu_queue
from core.jobs import dead_reason
from core.processes import process_state
from ui.jobs import queue_line

WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from core.cpu_queue import cpu_turn
    db, name, priority = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    ticks, stop = Path(sys.argv[4]), Path(sys.argv[5])
    with cpu_turn(name, priority, db=db, poll_s=0.05):
        while not stop.exists():
            with open(ticks, "a") as f:
                f.write(f"{time.time()}\\n")
            time.sleep(0.02)
""")


class Worker:
    """A process that holds a CPU turn and ticks into `ticks` until `stop()`."""

    def __init__(self, tmp: Path, db: Path, name: str, priority: int):
        self.ticks, self.stop_file = tmp / f"{name}.ticks", tmp / f"{name}.stop"
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(db), name, str(priority), str(self.ticks),
                                      str(self.stop_file)], cwd=Path(__file__).resolve().parent.parent,
                                     start_new_session=True)

    def times(self) -> list[float]:
        return [float(x) for x in self.ticks.read_text().split()] if self.ticks.exists() else []

    def wait_ticking(self, timeout: float = 20.0) -> None:
        end = time.time() + timeout
        while not self.times():
            assert time.time() < end, "the worker never got its turn"
            time.sleep(0.05)

    def stop(self) -> None:
        self.stop_file.touch()
        self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def workers(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    made: list[Worker] = []
    db = tmp_path / "cpu.sqlite"  # the queue of this HEADLAB_HOME, which core.jobs consults

    def make(name: str, priority: int) -> Worker:
        made.append(Worker(tmp_path, db, name, priority))
        return made[-1]

    make.db = db
    yield make
    for w in made:
        w.kill()


def test_background_jobs_take_turns_first_come_first_served(workers):
    first = workers("first", cpu_queue.BACKGROUND)
    first.wait_ticking()
    second = workers("second", cpu_queue.BACKGROUND)
    time.sleep(1.0)
    assert second.times() == []  # waits while the first holds the CPU
    queue = cpu_queue.reconcile(workers.db)
    assert [(t.name, t.state) for t in queue] == [("first", "running"), ("second", "waiting")]
    assert cpu_queue.accounts_for(second.proc.pid, workers.db)  # waiting with a fresh heartbeat: alive
    first.stop()
    second.wait_ticking()
    assert min(second.times()) > max(first.times())  # never both at once
    second.stop()
    assert cpu_queue.reconcile(workers.db) == []


def test_interactive_work_pauses_background_work_and_resumes_it(workers):
    training = workers("training", cpu_queue.BACKGROUND)
    training.wait_ticking()
    analysis = workers("analysis", cpu_queue.INTERACTIVE)
    analysis.wait_ticking()  # did not wait behind the training run
    time.sleep(0.3)
    assert process_state(training.proc.pid) == "T"
    frozen = len(training.times())
    time.sleep(0.5)
    assert len(training.times()) == frozen  # no tick while paused
    assert cpu_queue.accounts_for(training.proc.pid, workers.db)
    assert dead_reason(training.proc.pid, heartbeat=0.0) is None  # silent for ages, but paused on purpose
    analysis.stop()
    time.sleep(0.5)
    assert process_state(training.proc.pid) != "T"
    assert len(training.times()) > frozen  # goes on after the interactive work
    paused = [t for t in training.times() if min(analysis.times()) < t < max(analysis.times())]
    assert paused == []
    training.stop()


def test_interactive_work_waits_for_interactive_work(workers):
    first = workers("heads", cpu_queue.INTERACTIVE)
    first.wait_ticking()
    second = workers("refine", cpu_queue.INTERACTIVE)
    time.sleep(0.8)
    assert second.times() == [] and process_state(first.proc.pid) != "T"
    first.stop()
    second.wait_ticking()
    second.stop()


def test_a_page_timing_freezes_the_holder_for_the_block_only(workers):
    training = workers("training", cpu_queue.BACKGROUND)
    training.wait_ticking()
    with cpu_queue.paused_for_timing(workers.db) as frozen:
        assert frozen == 1
        time.sleep(0.2)
        assert process_state(training.proc.pid) == "T"
        during = len(training.times())
        time.sleep(0.4)
        assert len(training.times()) == during
    time.sleep(0.3)
    assert len(training.times()) > during
    training.stop()


def test_work_that_asks_for_its_turn_during_a_timing_waits_for_the_timing(workers):
    """A job started a moment before a page times a model asks for its turn only after it loaded: it must
    not take the CPU in the middle of the timing."""
    with cpu_queue.paused_for_timing(workers.db) as frozen:
        assert frozen == 0
        late = workers("heads", cpu_queue.INTERACTIVE)
        end = time.time() + 20
        while len(cpu_queue.reconcile(workers.db)) < 2:  # until it asks (its Python starts first)
            assert time.time() < end, "the worker never asked for its turn"
            time.sleep(0.05)
        time.sleep(0.5)
        assert late.times() == []
        assert [(t.name, t.state) for t in cpu_queue.reconcile(workers.db)] == [
            (cpu_queue.TIMING, "running"), ("heads", "waiting")]
    late.wait_ticking()
    assert [t.name for t in cpu_queue.reconcile(workers.db)] == ["heads"]
    late.stop()


STARTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from core.cpu_queue import cpu_turn
    ticks, ask, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def tick_until(path):
        while not path.exists():
            with open(ticks, "a") as f:
                f.write(f"{time.time()}\\n")
            time.sleep(0.02)

    tick_until(ask)  # importing and loading: no turn asked for yet
    with cpu_turn("heads", poll_s=0.05):
        while not stop.exists():
            time.sleep(0.02)
    tick_until(Path(str(stop) + ".exit"))  # writing results and shutting down, its turn given back
""")


def test_a_timing_freezes_launched_work_outside_its_turn(workers, tmp_path):
    """A job launched a moment before a page times a model imports and loads before it asks for its turn,
    and shuts down after it gives the turn back: a timing freezes it then too, and lets it go on after."""
    from core.jobs import start_process, stop_background_work

    ticks, ask, stop = tmp_path / "starter.ticks", tmp_path / "ask", tmp_path / "stop"
    proc = start_process([sys.executable, "-c", STARTER, str(ticks), str(ask), str(stop)], tmp_path / "heads.log")

    def frozen_by_a_timing(expected: int) -> None:
        with cpu_queue.paused_for_timing(workers.db) as frozen:
            assert frozen == expected
            time.sleep(0.2)
            assert process_state(proc.pid) == "T" and cpu_queue.accounts_for(proc.pid, workers.db)
            during = len(ticks.read_text().split())
            time.sleep(0.4)
            assert len(ticks.read_text().split()) == during
        time.sleep(0.3)
        assert process_state(proc.pid) != "T" and len(ticks.read_text().split()) > during

    def until(condition, what: str) -> None:
        end = time.time() + 20
        while not condition():
            assert time.time() < end, what
            time.sleep(0.05)

    try:
        assert cpu_queue.launched_pids(workers.db) == [proc.pid]
        until(ticks.exists, "the launched process never ran")
        frozen_by_a_timing(1)  # starting
        ask.touch()
        until(lambda: [t.name for t in cpu_queue.reconcile(workers.db)] == ["heads"], "it never took its turn")
        with cpu_queue.paused_for_timing(workers.db) as frozen:
            assert frozen == 1 and process_state(proc.pid) == "T"  # as the holder of a turn, frozen once
        stop.touch()
        until(lambda: cpu_queue.reconcile(workers.db) == [], "it never gave its turn back")
        frozen_by_a_timing(1)  # shutting down
        stop_background_work(tmp_path)
        assert proc.wait(timeout=20) == -signal.SIGTERM  # ended, not left frozen
        assert cpu_queue.launched_pids(workers.db) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_launched_work_frozen_by_a_dead_pauser_is_resumed(workers, tmp_path):
    from core.jobs import start_process

    ticks = tmp_path / "starter.ticks"
    proc = start_process([sys.executable, "-c", STARTER, str(ticks), str(tmp_path / "ask"), str(tmp_path / "stop")],
                         tmp_path / "heads.log")
    pauser = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from core.cpu_queue import paused_for_timing\n"
                               "with paused_for_timing(Path(sys.argv[1])):\n    time.sleep(60)",
                               str(workers.db)], cwd=Path(__file__).resolve().parent.parent)
    try:
        end = time.time() + 20
        while process_state(proc.pid) != "T":
            assert time.time() < end, "the pauser never froze the launched process"
            time.sleep(0.05)
        pauser.kill()
        pauser.wait()
        assert not cpu_queue.accounts_for(proc.pid, workers.db)  # its pauser is gone
        cpu_queue.reconcile(workers.db)
        time.sleep(0.2)
        assert process_state(proc.pid) not in ("T", None)
    finally:
        pauser.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


CLOCKED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from core.cpu_queue import ActiveClock, cpu_turn, watch_pauses
    db, ready, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    watch_pauses()
    with cpu_turn("clocked", db=db, poll_s=0.05):
        clock = ActiveClock(db)
        wall, active = time.time(), clock.now()
        ready.touch()
        while not stop.exists():
            time.sleep(0.02)
        print(time.time() - wall, clock.now() - active, clock.paused)
""")


def test_a_pause_is_recorded_and_the_active_clock_leaves_it_out(tmp_path):
    """The queue records how long it froze a process; that process's ActiveClock runs without the pause."""
    db, ready, stop = tmp_path / "cpu.sqlite", tmp_path / "ready", tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", CLOCKED, str(db), str(ready), str(stop)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    try:
        end = time.time() + 30
        while not ready.exists():
            assert time.time() < end and proc.poll() is None
            time.sleep(0.05)
        with cpu_queue.paused_for_timing(db):
            time.sleep(1.5)
            assert 1.0 < cpu_queue.paused_seconds(proc.pid, db) < 3.0  # a pause going on counts up to now
        paused = cpu_queue.paused_seconds(proc.pid, db)
        assert 1.5 <= paused < 3.0
        time.sleep(0.3)
        stop.touch()
        wall, active, seen = map(float, proc.communicate(timeout=30)[0].split())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert seen == pytest.approx(paused, abs=0.05)
    assert wall - active == pytest.approx(paused, abs=0.05)  # the wall time less exactly the recorded pause
    assert cpu_queue.paused_seconds(proc.pid, db) == 0  # forgotten with the turn


def test_work_paused_by_a_dead_pauser_is_resumed(workers):
    training = workers("training", cpu_queue.BACKGROUND)
    training.wait_ticking()
    analysis = workers("analysis", cpu_queue.INTERACTIVE)
    analysis.wait_ticking()
    time.sleep(0.2)
    assert process_state(training.proc.pid) == "T"
    analysis.kill()  # dies without resuming what it paused
    assert not cpu_queue.accounts_for(training.proc.pid, workers.db)
    cpu_queue.reconcile(workers.db)
    time.sleep(0.3)
    assert process_state(training.proc.pid) != "T"
    assert [t.name for t in cpu_queue.reconcile(workers.db)] == ["training"]
    training.stop()


def test_every_page_says_what_the_background_work_does(workers):
    training = workers("pruning train --run-id 3", cpu_queue.BACKGROUND)
    training.wait_ticking()
    analysis = workers("heads-0a8eab592c0f-5f4c75d48d293d40-500-None", cpu_queue.INTERACTIVE)
    analysis.wait_ticking()
    assert queue_line(cpu_queue.reconcile(workers.db)) == (
        "CPU: Heads analysis runs; pruning train --run-id 3 is paused (interactive work goes first).")
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("CPU: Heads analysis runs") for c in at.sidebar.caption)
    analysis.stop()
    training.stop()
    assert queue_line(cpu_queue.reconcile(workers.db)) is None


PAUSED_TIMING = textwrap.dedent("""
    import sys, time
    import torch
    from core.cpu_queue import watch_pauses
    from core.latency import compare

    class Slow(torch.nn.Module):  # 0.2 s a call, whatever the machine
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))  # where it runs (the CPU)

        def forward(self, input_ids):
            time.sleep(0.2)
            return input_ids
    watch_pauses()
    print("ready", flush=True)
    start = time.perf_counter()
    timed = compare({"slow": Slow()}, {"input_ids": torch.zeros(1, 3)}, rounds=3, repeats_per_round=2, warmup=False)
    print(timed["slow"].p90_s, time.perf_counter() - start, flush=True)
""")


def test_a_timing_never_includes_a_pause():
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_TIMING], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # inside the timed calls
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGCONT)
    p90, wall = map(float, proc.stdout.readline().split())
    assert proc.wait(timeout=120) == 0  # a torch process's exit takes long on a loaded machine
    assert wall > 1.5 + 6 * 0.2 - 0.1  # the pause happened during the timing...
    assert 0.19 < p90 < 0.5  # ...and no timed call includes it (the paused call was made again)
