"""Start a training run in the background: `python -m pruning train --run-id ID`, or the same under
torchrun in several processes, through the one launcher (`core.jobs.start_process`), logging to
<run_dir>/train.log. The process then reports to the run store (`pruning.runs`), which judges its
liveness by `core.jobs.dead_reason` like every app job.
"""

from __future__ import annotations

import subprocess

from core.jobs import pid_alive, python_command, start_process
from core.paths import headlab_home
from pruning.distributed import torchrun_command
from pruning.runs import RunStore

LOG = "train.log"  # the log file of a run's processes, in its run folder


def launch_command(run_id: int, *, parallel: bool = False, processes: int = 1, executable: bool = False) -> list[str]:
    """The command `launch` runs for run `run_id`: `python -m pruning train --run-id ID [--parallel]`,
    or with `processes` > 1 `torchrun --standalone --nproc_per_node=N -m pruning train --run-id ID`
    (`executable`: this interpreter's path instead of `python` / `torchrun`)."""
    args = ["pruning", "train", "--run-id", str(run_id)] + (["--parallel"] if parallel else [])
    if processes == 1:
        return python_command(args) if executable else ["python", "-m", *args]
    return torchrun_command(args, processes, executable=executable)


def launch(store: RunStore, run_id: int, *, parallel: bool = False, processes: int = 1) -> subprocess.Popen:
    """Start (or resume) run `run_id` in a background process (`launch_command`), logging to
    <run_dir>/train.log; `parallel` skips the one-run-at-a-time queue. With `processes` > 1 the job
    runs data-parallel under torchrun and the store watches the torchrun agent's pid. The run is
    queued for that process, with its process count, before this returns, so the next poll never
    sees it as not started."""
    run = store.get(run_id)
    if run.active and pid_alive(run.pid):
        raise ValueError(f"Run {run_id} is already {run.status} (pid {run.pid}).")
    if run.status == "done":
        raise ValueError(f"Run {run_id} is already done; start a new run instead.")
    if run.store.resolve() != (headlab_home() / "runs.sqlite").resolve():
        raise ValueError("launch() runs jobs of the store in $HEADLAB_HOME only.")
    proc = start_process(launch_command(run_id, parallel=parallel, processes=processes, executable=True),
                         run.run_dir / LOG)
    store.enqueue(run_id, pid=proc.pid, processes=processes)
    return proc
