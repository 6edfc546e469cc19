"""Facts about other processes and signals to them: is a pid alive, stop / continue a process's group."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` ("R", "S", "T" = stopped, "Z" = zombie, ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return None


def pid_alive(pid: int | None) -> bool:
    """True if process `pid` exists and is not a zombie (a finished child not yet reaped)."""
    return bool(pid) and process_state(pid) not in (None, "Z")


def signal_work(pid: int, sig: int) -> bool:
    """Send `sig` to the work of process `pid`: its whole process group when it leads one (HeadLab starts
    every background process in its own session, so torchrun's workers stop with their agent), else the
    process alone (never the group of a shell or test runner it merely belongs to). False if it is gone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_work(pid: int) -> bool:
    """Freeze process `pid`'s work (SIGSTOP): it uses no CPU until `continue_work`."""
    return signal_work(pid, signal.SIGSTOP)


def continue_work(pid: int) -> bool:
    """Let work frozen by `stop_work` go on (SIGCONT)."""
    return signal_work(pid, signal.SIGCONT)

