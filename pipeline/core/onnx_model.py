"""Running models/model.onnx with onnxruntime: what the export stage's parity check and
``predict --onnx`` share. Needs the ``export`` extra (onnx, onnxscript, onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.checkpoints import ONNX_OUTPUT
from pipeline.core.errors import StageError


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise StageError(
            "ONNX needs the export extra (onnx, onnxscript, onnxruntime): pip install -e '.[export]'"
        ) from None
    return onnxruntime


def onnx_session(path: Path | str) -> Any:
    """An onnxruntime session on the CPU; a clear error for a file onnxruntime cannot load."""
    onnxruntime = require_onnxruntime()
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StageError(
            f"{path}: not an ONNX model that onnxruntime can load ({reason}); rerun: dvc repro export"
        ) from None


def onnx_logits(session: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The logits for one batch, given as its modality's ``onnx_feed`` names the inputs."""
    return session.run([ONNX_OUTPUT], feed)[0]
