"""Export of converted (integer) models: packed safetensors, ONNX (QuantizeLinear /
DequantizeLinear) and GGUF (llama.cpp).

ONNX and GGUF writers import ``onnx`` / ``gguf`` lazily, inside their functions, so
``import qat.export`` needs neither.

Example::

    from qat import convert
    from qat.export import save_packed, load_packed, export_onnx
    int_model = convert(model)
    save_packed(int_model, "model.safetensors")
    export_onnx(int_model, example_input, "model.onnx")
"""

from .formats import FORMATS as EXPORT_FORMATS, check_formats, export_formats
from .gguf import export_gguf, gguf_blocks, gguf_type_for
from .onnx import export_float_onnx, export_onnx
from .packed import FORMAT, PackedCheckpoint, PackedFormatError, load_packed, read_packed, save_packed

__all__ = [
    "FORMAT",
    "PackedCheckpoint",
    "PackedFormatError",
    "load_packed",
    "read_packed",
    "save_packed",
    "export_onnx",
    "export_float_onnx",
    "export_gguf",
    "gguf_blocks",
    "gguf_type_for",
    "EXPORT_FORMATS",
    "check_formats",
    "export_formats",
]
