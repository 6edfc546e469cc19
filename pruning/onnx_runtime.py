"""Where an export's ONNX model lives and how HeadLab opens it in onnxruntime (CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

ONNX_FILE = "model.onnx"


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for `path` (`threads` intra-op threads; default torch's count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
