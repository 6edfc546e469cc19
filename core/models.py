"""Load a classifier (built-in name or local Hugging Face folder) with its tokenizer and adapter.

Every load is local (`local_files_only=True`), never runs remote code, and reads weights from
safetensors only. Bad folders raise `ModelError` with one line fit for a UI box or the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from core.adapter import DECODER_MODEL_TYPES, Adapter
from core.errors import ModelError, ModelNotPrepared
from core.folder import folder_fingerprint, inspect_folder
from core.gguf_cache import converted_gguf, is_gguf_spec
from core.loaded import LoadedModel
from core.paths import models_dir
from core.prompting import PromptSpec, prompt_classifier
from core.pruned import PRUNING_FILE, load_pruned

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# A fresh head's "MISSING classifier.weight" report and per-load bars would drown the CLI's own output;
# HeadLab states what matters itself (LoadedModel.notes).
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

BUILTIN_MODELS = {
    "default": "all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (6 layers x 12 heads)",
    "minilm-l3": "paraphrase-MiniLM-L3-v2 fine-tuned on Rotten Tomatoes (3 layers x 12 heads)",
    "mpnet": "all-mpnet-base-v2 fine-tuned on Rotten Tomatoes (12 layers x 12 heads x 768; optional: a 404 MB "
             "download and about an hour of fine-tuning per epoch on 2 cores)",
    "smollm2": "SmolLM2-135M-Instruct, a Llama-architecture decoder (30 layers x 9 query / 3 KV heads), converted "
               "once from its GGUF package to fp32 (no fine-tuning)",
    "gemma3": "Gemma-3-270M (base), a Gemma 3 decoder (18 layers x 4 query / 1 KV head; optional: a 240 MB download "
              "under the Gemma Terms of Use, converted once to fp32)",
}
DEFAULT_DECODER_LABELS = ["fresh", "rotten"]  # the default data's labels (Rotten Tomatoes), prompted as words
PREPARED_BY_ALL = ("default", "minilm-l3")  # `prepare all` (run by make); the bigger MPNet only on request


def builtin_dir(name: str) -> Path:
    """Folder where the built-in model `name` is (or will be) saved after fine-tuning."""
    return models_dir() / name


def resolve(spec: str) -> Path:
    """Turn `default`, `minilm-l3` or a path into a model folder; raise if a built-in is not ready. A `.gguf`
    file's folder is its converted cache copy (`core.gguf_cache`; `GGUFNotConverted` until converted)."""
    if is_gguf_spec(spec):
        return converted_gguf(spec)
    if spec in BUILTIN_MODELS:
        path = builtin_dir(spec)
        if not (path / "config.json").exists():
            raise ModelNotPrepared(spec)
        return path
    return Path(spec).expanduser()


def _tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"{path}: tokenizer could not be loaded ({type(exc).__name__}: {exc}).".replace("\n", " ")) \
            from exc


def _pretrained(cls, path: Path, **kwargs):
    try:
        return cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                                   **kwargs)
    except Exception as exc:
        raise ModelError(f"{path} could not be loaded ({type(exc).__name__}: {exc}).".replace("\n", " ")) from exc


def load_decoder(path: Path, folder, *, source: str, attn_implementation: str, label_names: list[str] | None,
                 prompt: PromptSpec | None) -> LoadedModel:
    """A Llama-family causal LM folder as a prompted classifier (`core.prompting`), in eval mode."""
    folder.check(lambda: AutoModelForCausalLM.from_config(folder.config, trust_remote_code=False))
    lm = _pretrained(AutoModelForCausalLM, path, attn_implementation=attn_implementation)
    lm.eval()
    names = list(label_names or (DEFAULT_DECODER_LABELS if prompt is None else
                                 [str(i) for i in range(len(prompt.label_words))]))
    model, tokenizer = prompt_classifier(lm, _tokenizer(path), names, prompt)
    return LoadedModel(
        model=model, tokenizer=tokenizer, adapter=Adapter(model), source=source, path=path, label_names=names,
        has_classifier=True, fingerprint=folder_fingerprint(path, folder.weights), prompt=tokenizer.spec,
        notes=[f"A decoder read as a classifier by prompting: label words {', '.join(tokenizer.spec.label_words)}."],
    )


def load_model(
    spec: str,
    *,
    attn_implementation: str = "eager",
    label_names: list[str] | None = None,
    prompt: PromptSpec | None = None,
) -> LoadedModel:
    """Load a built-in name or a local folder in eval mode: an encoder as a sequence classifier, a
    Llama-family decoder as a classifier by prompting (`prompt`, default: the label names as words).

    An encoder folder without a classification head is loaded with a fresh head sized by `label_names`
    (default two labels) and `has_classifier=False`: it must be fine-tuned before its accuracy
    means anything. Attention is eager so attention maps are available.
    """
    path = resolve(spec)
    if (path / PRUNING_FILE).is_file():  # a HeadLab export: its modules are re-sliced before loading
        return load_pruned(path, attn_implementation=attn_implementation, source=spec)
    folder = inspect_folder(path)
    if folder.config.model_type in DECODER_MODEL_TYPES:
        return load_decoder(path, folder, source=spec, attn_implementation=attn_implementation,
                            label_names=label_names, prompt=prompt)
    has_classifier = folder.has_classifier
    notes: list[str] = []
    kwargs: dict = {}
    if not has_classifier:
        names = label_names or ["0", "1"]
        kwargs = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                  "label2id": {n: i for i, n in enumerate(names)}}
        notes.append("This model has no classification head: fine-tune it before trusting accuracy.")
    folder.check(lambda: AutoModelForSequenceClassification.from_config(folder.config, trust_remote_code=False))
    model = _pretrained(AutoModelForSequenceClassification, path, attn_implementation=attn_implementation, **kwargs)
    tokenizer = _tokenizer(path)
    model.eval()
    id2label = model.config.id2label
    names = [str(id2label[i]) for i in range(model.config.num_labels)]
    return LoadedModel(
        model=model, tokenizer=tokenizer, adapter=Adapter(model), source=spec, path=path,
        label_names=names, has_classifier=has_classifier, fingerprint=folder_fingerprint(path, folder.weights),
        notes=notes,
    )
