"""Export of converted (integer) models: packed safetensors, ONNX (QuantizeLinear /
DequantizeLinear) and GGUF (llama.cpp).

ONNX and GGUF writers import ``onnx`` / ``gguf`` lazily, inside their functions, so
``import qat.export`` needs neither. The writers themselves load on first use of their names
(PEP 562), so the core's integer layers can use :mod:`qat.export.packing` without importing them.

Example::

    from qat import convert
    from qat.export import save_packed, load_packed, export_onnx
    int_model = convert(model)
    save_packed(int_model, "model.safetensors")
    export_onnx(int_model, example_input, "model.onnx")
"""

from importlib import import_module

#: public name -> the submodule that defines it
_EXPORTS = {
    "FORMAT": "packed",
    "PackedCheckpoint": "packed",
    "PackedFormatError": "packed",
    "load_packed": "packed",
    "read_packed": "packed",
    "save_packed": "packed",
    "export_onnx": "onnx",
    "export_float_onnx": "onnx",
    "export_gguf": "gguf",
    "gguf_blocks": "gguf",
    "gguf_type_for": "gguf",
    "check_formats": "formats",
    "export_formats": "formats",
    "pack_codes": "packing",
    "unpack_codes": "packing",
    "packed_numel": "packing",
}

__all__ = [*_EXPORTS, "EXPORT_FORMATS"]


def __getattr__(name: str):
    if name == "EXPORT_FORMATS":
        return import_module(".formats", __name__).FORMATS
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
