"""Copies of a training run's measurements for the tools people watch training in: TensorBoard event files
(`torch.utils.tensorboard`) and an MLflow run in a local file store (`mlflow-skinny`'s client).

The run store (`pruning.runs`) stays the source of truth; these are write-only mirrors. Each eval step's
`StepRecord` becomes metrics at its step: every number of `StepRecord.row()` (losses as loss_<name>, the
method's figures by name, the clock's parts) and the per-layer counts as heads_alive/<layer> and
units_alive/<layer>. The config (every common field and the method's options with their defaults, as
option.<name>) is the run's params (MLflow) and a text summary (TensorBoard). A tracker that fails (a
folder it cannot write, a package missing) prints one warning line and stops logging; the run goes on.

TensorBoard writes one subfolder per run, `<DIR>/run-<id>-<method>`, so `tensorboard --logdir DIR` shows
runs side by side. MLflow logs to experiment "headlab" of the store `file:<DIR>`; the run is tagged with the
HeadLab run id and run folder, so a resumed run continues its MLflow run (steps an earlier attempt logged
after its checkpoint are logged again: the run store supersedes them, MLflow keeps both values); it ends
FINISHED with the final record, KILLED when stopped, FAILED when it fails (a resume sets it RUNNING again).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from core.messages import one_line

EXPERIMENT = "headlab"
RUN_TAG = "headlab.run_id"
DIR_TAG = "headlab.run_dir"


def measurements(record) -> dict[str, float]:
    """Every finite number a `StepRecord` holds, by metric name (booleans, text and None left out)."""
    flat = record.row()
    out = {}
    for name, value in flat.items():
        if isinstance(value, list) and name in ("heads_alive", "units_alive"):
            out.update({f"{name}/{layer}": float(v) for layer, v in enumerate(value)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def params(config) -> dict[str, str]:
    """The run's config as text params: the common fields, then the method's options as option.<name>."""
    common = {k: v for k, v in config.to_dict().items() if k != "options"}
    common["label_map"] = ",".join(f"{k}={v}" for k, v in config.label_map.items())
    values = {**common, **{f"option.{k}": v for k, v in asdict(config.method_options()).items()}}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


class _Tracker:
    """One destination; `write` errors switch it off with a single warning line on stderr."""

    what = ""

    def __init__(self) -> None:
        self.alive = True

    def guarded(self, action, *args) -> None:
        if not self.alive:
            return
        try:
            action(*args)
        except Exception as exc:  # any failure of the tool: the run store has the record, the run goes on
            self.alive = False
            print(f"warning: {self.what} logging stopped ({type(exc).__name__}: {one_line(exc)}); "
                  "the run store keeps every measurement", file=sys.stderr, flush=True)


class TensorBoardTracker(_Tracker):
    what = "TensorBoard"

    def __init__(self, root: str, run_id: int, config) -> None:
        super().__init__()
        self.writer = None
        self.folder = Path(root).expanduser().resolve() / f"run-{run_id}-{config.method}"
        self.guarded(self._open, config)

    def _open(self, config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.folder))
        rows = [f"| {k} | {v} |" for k, v in params(config).items()]
        table = "\n".join(["| setting | value |", "| --- | --- |", *rows])
        self.writer.add_text("config", table, 0)
        self.writer.flush()

    def log(self, record) -> None:
        self.guarded(self._log, record)

    def _log(self, record) -> None:
        for name, value in measurements(record).items():
            self.writer.add_scalar(name, value, record.step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.guarded(self.writer.close)


class MLflowTracker(_Tracker):
    what = "MLflow"

    def __init__(self, root: str, run_id: int, run_dir: Path, config) -> None:
        super().__init__()
        self.client = self.run = None
        self.uri = Path(root).expanduser().resolve().as_uri()
        self.guarded(self._open, run_id, run_dir, config)

    def _open(self, run_id: int, run_dir: Path, config) -> None:
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless this says otherwise; a file
        # store needs no database and no server (mlflow-skinny has neither).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(EXPERIMENT)
        experiment = found.experiment_id if found else self.client.create_experiment(EXPERIMENT)
        query = f"tags.`{RUN_TAG}` = '{run_id}' and tags.`{DIR_TAG}` = '{run_dir}'"
        earlier = self.client.search_runs([experiment], filter_string=query, max_results=1)
        if earlier:  # a resumed run continues its MLflow run
            self.run = earlier[0].info.run_id
            self.client.update_run(self.run, status="RUNNING")
            return
        self.run = self.client.create_run(experiment, run_name=f"run-{run_id}-{config.method}",
                                          tags={RUN_TAG: str(run_id), DIR_TAG: str(run_dir)}).info.run_id
        from mlflow.entities import Param

        self.client.log_batch(self.run, params=[Param(k, v) for k, v in params(config).items()])

    def log(self, record) -> None:
        self.guarded(self._log, record)

    def _log(self, record) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record.step) for k, v in measurements(record).items()]
        self.client.log_batch(self.run, metrics=metrics)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run: FINISHED after the final record, KILLED when stopped, FAILED when it failed (a
        resume sets it RUNNING again)."""
        if self.run is not None:
            self.guarded(self.client.set_terminated, self.run, status)


class Trackers:
    """The trackers a run's config asks for (`tensorboard`, `mlflow` folders), fed every `StepRecord`."""

    def __init__(self, config, run_id: int, run_dir: Path) -> None:
        self.items: list = []
        if config.tensorboard.strip():
            self.items.append(TensorBoardTracker(config.tensorboard.strip(), run_id, config))
        if config.mlflow.strip():
            self.items.append(MLflowTracker(config.mlflow.strip(), run_id, run_dir, config))

    def log(self, record) -> None:
        """Record one eval step everywhere; the final record also ends each tracker's run."""
        for tracker in self.items:
            tracker.log(record)
            if record.final:
                tracker.close()

    def end(self, status: str) -> None:
        """A run that ends without its final record: "KILLED" (stopped) or "FAILED"."""
        for tracker in self.items:
            tracker.close(status)


def end_trackers(session, status: str) -> None:
    """End the trackers `session` opened (none: nothing to do), e.g. when it stops before its final record."""
    trackers = session.__dict__.get("_trackers") if session is not None else None
    if trackers is not None:
        trackers.end(status)


def trackers_of(session) -> Trackers:
    """The session's trackers, opened on its first eval step (rank 0 only calls this)."""
    if "_trackers" not in session.__dict__:
        session.__dict__["_trackers"] = Trackers(session.c, session.job.run_id, session.job.run_dir)
    return session.__dict__["_trackers"]
