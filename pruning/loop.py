"""The prune-and-finetune training loop, one top-down function for every method (`pruning.methods`).

    start (or resume from the checkpoint)  ->  eval + checkpoint at step 0
    every step:  stop?  ->  lr  ->  forward / backward / step  ->  log
                 eval (adaptive cadence) -> at the end of the gate phase: slice the structure -> checkpoint
    final eval on the whole dev split  ->  export the model to <run_dir>/model (LoRA merged)  ->  done

Phases: a learned method first trains its gates with the weights for `steps` steps; then the
deterministic structure is fixed, the model sliced (`pruning.surgery.prune`) and the smaller model
fine-tuned for `finetune_steps` (CE, mixed with logit distillation when distilling). A one-shot
method only has the second phase. The teacher (distillation, and the dense reference latency is timed
against) is `model` itself unless `teacher` names another classifier with the same labels and
vocabulary. Steps count across both phases; a resume continues the count.

At every eval step (at least `eval_every` steps apart and at most `eval_budget` of the wall time) the
run store receives a `pruning.record.StepRecord` and the gate snapshot. Checkpoints every
`checkpoint_every` evals, at the end of the gate phase and on a stop request (the store's stop flag,
or SIGTERM / Ctrl-C: `pruning.signals.StopSignals`).

Devices: `device` auto (CUDA when present) | cpu | cuda; on CUDA the forward passes run under bf16
autocast (losses in fp32). Several processes (`torchrun ... -m pruning train`, `pruning.distributed`):
rank 0 alone queues the run, writes the store and checkpoints and evaluates (the others wait in the
broadcast of the next eval step); the method's gates, multipliers and the student are checksummed at
every eval step (`replica_checksums`; a difference fails the run); a stop request reaches every rank
at the same step.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from core.cpu_queue import BACKGROUND, cpu_turn
from core.jobs import BACKGROUND_ENV
from core.loaded import LoadedModel
from pruning import memory
from pruning.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from pruning.config import TrainConfig
from pruning.distributed import Dist, checksum, launcher_pid
from pruning.export import save_pruned
from pruning.lora import merge_lora
from pruning.methods.base import Progress
from pruning.record import StepRecord, measure_step
from pruning.runs import Heartbeat, RunStore
from pruning.session import Job, TrainSession
from pruning.signals import StopSignals
from pruning.trackers import end_trackers, trackers_of

MODEL_FILE = "model"  # the exported pruned model inside the run folder
WAITING = "waiting"  # what rank 0 tells the other ranks while the run waits in the queue


def evaluate(s: TrainSession, final: bool = False) -> StepRecord | None:
    """Rank 0 measures the snapshot and records it; the other ranks wait for the next eval step. With
    several ranks every rank's checksum of the replicated modules is gathered first (RuntimeError if
    they differ). Returns the record (None on other ranks)."""
    replicas = s.dist.gather(checksum(s.replicated_modules())) if s.dist.world > 1 else None
    if replicas and len(set(replicas)) > 1:
        raise RuntimeError(f"The processes' gates, multipliers or weights diverged at step {s.step} "
                           f"(checksums {replicas}).")
    record = None
    if s.dist.main:
        record = measure_step(s, final, replicas)
        s.store.add_metrics(s.job.run_id, s.step, record.to_dict(), s.job.attempt)
        s.store.add_gates(s.job.run_id, s.step, s.current_state(), s.job.attempt)
        trackers_of(s).log(record)  # TensorBoard / MLflow copies, when asked for; never fails the run
    s.losses = {}
    s.evals += 1
    s.gap, s.next_eval = s.dist.broadcast((s.gap, s.next_eval))
    return record


def checkpoint(s: TrainSession) -> None:
    """Rank 0 saves everything a resume needs to <run_dir>/checkpoint.pt (other ranks: nothing)."""
    if s.dist.main:
        with s.timed("checkpoint_s"):
            save_checkpoint(s.job.run_dir, s.checkpoint_payload())


def stop_requested(s: TrainSession, signals: StopSignals, last_check: list[float]) -> bool:
    """Rank 0 looks for SIGTERM / SIGINT (every step) and reads the store's stop flag (at most once a
    second), and tells every rank, every step."""
    stop = signals.received is not None
    now = time.monotonic()
    if not stop and s.dist.main and now - last_check[0] >= 1.0:
        last_check[0] = now
        stop = s.store.stop_requested(s.job.run_id)
    return s.dist.flag(stop)


def report(s: TrainSession, total: int, last_report: list[float]) -> None:
    """Progress to the callback (every step) and to the store (at most twice a second)."""
    message = s.message()
    s.progress(s.step, total, message)
    now = time.monotonic()
    if s.dist.main and (now - last_report[0] >= 0.5 or s.step == total):
        last_report[0] = now
        s.store.heartbeat(s.job.run_id, step=s.step, total=total, message=message)


def run(s: TrainSession, signals: StopSignals) -> str:
    """Train `s` to the end or to a stop request; returns "done" or "stopped"."""
    c, total = s.c, s.c.total_steps
    torch.manual_seed(c.seed)
    with s.timed("setup_s"):
        if s.job.resume:  # rank 0 reads the checkpoint; every rank restores the same state from it
            s.restore(s.dist.broadcast(load_checkpoint(s.job.run_dir) if s.dist.main else None))
        elif s.method.learned:
            s.setup_gates()
        else:
            s.one_shot()
        if s.dist.main:  # rows an earlier attempt wrote after the checkpoint (or at all) are superseded
            s.store.supersede_after(s.job.run_id, s.step if s.job.resume else -1)
        s.teacher.model.to(s.device)  # after one-shot scores were computed on the CPU copy
    if not s.job.resume:
        evaluate(s)
        checkpoint(s)
    last_check, last_report = [0.0], [0.0]
    while s.step < total:
        if stop_requested(s, signals, last_check):
            checkpoint(s)
            if s.dist.main:  # the store's step is the checkpoint's (heartbeats are throttled)
                s.store.heartbeat(s.job.run_id, step=s.step, total=total, message=s.message())
            return "stopped"
        with s.timed("train_s"):
            s.train_step()
            s.step += 1
        report(s, total, last_report)
        end_of_gates = s.phase == "gates" and s.step == c.gate_steps
        if s.step < total and (s.step >= s.next_eval or end_of_gates):
            evaluate(s)  # at the end of the gate phase: the learned structure before its fine-tune
            if end_of_gates:
                s.setup_finetune(s.current_state())
            if end_of_gates or s.evals % max(1, c.checkpoint_every) == 0:
                checkpoint(s)
    if s.phase == "gates":  # finetune_steps == 0: slice the learned structure as it is
        s.setup_finetune(s.current_state())
    s.progress(total, total, "final evaluation on the full dev split")
    final = evaluate(s, final=True)
    if s.dist.main:
        merge_lora(s.student.model).cpu()  # the exported folder holds plain weights, no peft module
        final.export = str(save_pruned(s.student, s.job.run_dir / MODEL_FILE, overwrite=True))
        s.store.finish(s.job.run_id, "done", result=final.to_dict())
    return "done"


def train(config: TrainConfig, store: RunStore | None, job: Job, progress: Progress | None = None, *,
          teacher: LoadedModel | None = None, dist: Dist | None = None) -> str:
    """Run the training of `job` (already claimed as running in `store`) in this process.

    `job.resume` continues from the run folder's checkpoint (ValueError if it is missing or corrupt).
    `teacher` may pass the already loaded `config.teacher_spec`. Before training starts the memory
    budget is checked (`pruning.memory`; ValueError if the run cannot fit). Rank 0 ends the run in
    the store as done, stopped (a stop request, SIGTERM or Ctrl-C: checkpointed at the next step
    boundary first) or failed (the error recorded, then re-raised); a second signal interrupts at
    once and marks it interrupted. With several processes (`dist`), every rank calls this with the
    same job, `store` only on rank 0; rank 0 loads its models and checks the memory before the others
    load theirs. Returns "done" or "stopped".
    """
    dist = dist or Dist()
    config.check()
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    session = None
    try:
        with StopSignals() as signals, Heartbeat(store, job.run_id) if dist.main else contextlib.nullcontext():
            if dist.main:
                session = TrainSession(config, job, store, progress, teacher, dist)
                memory.check(session.memory_budget())
            dist.barrier()
            session = session or TrainSession(config, job, None, None, teacher, dist)
            status = run(session, signals)
        if status == "stopped" and dist.main:
            store.finish(job.run_id, "stopped")
            end_trackers(session, "KILLED")
        return status
    except KeyboardInterrupt:
        if dist.main:
            store.finish(job.run_id, "interrupted", error="interrupted (a second Ctrl-C or SIGTERM)")
        raise
    except BaseException as exc:
        if dist.main:
            store.finish(job.run_id, "failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
            end_trackers(session, "FAILED")
        raise
    finally:
        torch.set_num_threads(threads)


def run_job(store: RunStore | None, run_id: int | None, progress: Progress | None = None, *,
            exclusive: bool = True, teacher: LoadedModel | None = None, dist: Dist | None = None) -> str:
    """Start or resume run `run_id` in this process: queue it, wait for its turn, then `train`.

    A run with a checkpoint in its folder resumes from it; otherwise it starts from step 0. Returns
    "done", "stopped" (also when stopped while still queued). With several processes (`dist`) only
    rank 0 passes the store and the run id: it queues the run for the torchrun agent's pid and
    claims it, telling the other ranks every poll that it still waits, then the `Job`.
    """
    dist = dist or Dist()
    job = None
    if dist.main:
        run_row = store.enqueue(run_id, pid=launcher_pid(), processes=dist.world)

        def waiting(message: str) -> None:
            dist.broadcast(WAITING)
            if progress:
                progress(0, 1, message)

        if store.wait_turn(run_id, exclusive=exclusive, on_wait=waiting):
            job = Job(run_id=run_id, config=run_row.config, run_dir=run_row.run_dir, attempt=run_row.attempt,
                      resume=(run_row.run_dir / CHECKPOINT).exists())
    while (job := dist.broadcast(job)) == WAITING:
        pass
    if job is None:
        return "stopped"
    # A background run takes the machine's CPU turn only once it is the run store's turn: the other order
    # deadlocks two runs (each holding what the other waits for). Parallel and data-parallel runs take none.
    queued = exclusive and dist.world == 1 and os.environ.get(BACKGROUND_ENV)
    with cpu_turn(f"pruning train --run-id {run_id}", BACKGROUND, progress=progress) if queued \
            else contextlib.nullcontext():
        return train(TrainConfig.from_dict(job.config), store, job, progress, teacher=teacher, dist=dist)
