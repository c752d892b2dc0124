"""One call for every export format: ``export_formats(int_model, ["safetensors", "onnx"], out_dir)``."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch.nn as nn

from ..errors import QATConfigError

__all__ = ["FORMATS", "check_formats", "export_formats"]

#: format name -> file suffix
FORMATS = {"safetensors": "safetensors", "onnx": "onnx", "gguf": "gguf"}


def check_formats(formats: Sequence[str]) -> list[str]:
    """Lower-cased format names, or :class:`~qat.QATConfigError` naming the valid ones."""
    if isinstance(formats, str):
        formats = [formats]
    formats = [str(f).lower() for f in (formats or [])]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise QATConfigError(f"export formats must be a non-empty list of {sorted(FORMATS)}, got {list(formats)}")
    return formats


def export_formats(
    int_model: nn.Module,
    formats: Sequence[str],
    out_dir: str,
    example_input=None,
    tokenizer_dir: Optional[str] = None,
    stem: str = "model",
) -> dict[str, str]:
    """Write a converted model as ``<out_dir>/<stem>.<suffix>`` in each format; returns format -> path.

    Raises:
        QATConfigError: an unknown format, or ONNX without an example input.
    """
    from .gguf import export_gguf
    from .onnx import export_onnx
    from .packed import save_packed

    formats = check_formats(formats)
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}
    for fmt in formats:
        path = os.path.join(out_dir, f"{stem}.{FORMATS[fmt]}")
        if fmt == "safetensors":
            save_packed(int_model, path)
        elif fmt == "onnx":
            if example_input is None:
                raise QATConfigError("ONNX export needs an example input to trace")
            export_onnx(int_model, example_input, path, input_names=["input"], output_names=["output"],
                        dynamic_axes={"input": {0: "batch"}})
        else:
            export_gguf(int_model, path, tokenizer_dir=tokenizer_dir)
        paths[fmt] = path
    return paths
