"""A local `.gguf` file as a model spec: converted once (`core.gguf.convert_gguf`) into a cache folder under
HEADLAB_HOME (`models/gguf/<stem>-<key>`, the key a hash of the file's resolved path, size and modification
time, so an edited or replaced file is converted again) and loaded from there like any folder.

Until it is converted, resolving the spec raises `GGUFNotConverted` (a `ModelNotPrepared`): the CLI's
`load_or_prepare` then converts it with a progress bar, the Model page in a background job
(`python -m core prepare FILE.gguf`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from core.errors import ModelError, ModelNotPrepared
from core.finetune import Progress
from core.gguf import GGUFConversion, check_gguf_file, conversion_record, convert_gguf
from core.paths import models_dir

SUFFIX = ".gguf"


class GGUFNotConverted(ModelNotPrepared):
    """A `.gguf` spec whose cache folder is not converted yet."""

    def __init__(self, path: Path):
        ModelError.__init__(self, f"{path.name} is converted once into a plain fp32 folder under HEADLAB_HOME "
                                  f"(1-2 min for a 100 MB file on 2 cores): run `python -m core prepare {path}` or "
                                  "open it on the Model page.")
        self.name = str(path)


def is_gguf_spec(spec: str | Path) -> bool:
    """True if model spec `spec` names a `.gguf` file (by its suffix; the file itself is checked on use)."""
    return str(spec).strip().lower().endswith(SUFFIX)


def gguf_cache_dir(spec: str | Path) -> Path:
    """The cache folder of GGUF file `spec` (ModelError if it is not a readable GGUF file)."""
    path = check_gguf_file(spec).resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return models_dir() / "gguf" / f"{path.stem}-{key}"


def converted_gguf(spec: str | Path) -> Path:
    """The converted folder of GGUF file `spec`; `GGUFNotConverted` until `convert_cached` has run."""
    folder = gguf_cache_dir(spec)
    if conversion_record(folder) is None:
        raise GGUFNotConverted(Path(spec).expanduser())
    return folder


def convert_cached(spec: str | Path, progress: Progress | None = None, force: bool = False) -> GGUFConversion:
    """Convert GGUF file `spec` into its cache folder unless that is done (`force`: again); its record."""
    folder = gguf_cache_dir(spec)
    record = None if force else conversion_record(folder)
    return record or convert_gguf(spec, folder, overwrite=True, progress=progress)
