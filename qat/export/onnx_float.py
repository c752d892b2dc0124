"""ONNX export of a *prepared* model whose layers use the FP8 formats (``fp8_e4m3``, ``fp8_e5m2``,
``mxfp8``; :mod:`qat.microscaling`), as ``QuantizeLinear`` / ``DequantizeLinear`` with float8 types
(opset 21, :data:`qat.export.onnx.OPSET`), the trained codes and scales written as they are.

How (as :func:`qat.export.onnx.export_onnx` does for integer layers): the model is traced with each
quantized layer's weight and input routed through placeholder ops, which are then replaced:

* weight -> ``DequantizeLinear`` of a ``FLOAT8E4M3FN`` / ``FLOAT8E5M2`` initializer holding the element
  codes training used: per-tensor (scalar scale), per-channel (``axis``) or, for MXFP8, per block of 32
  along the last axis (``block_size`` 32, the E8M0 scales as float32 powers of two). ``q * S`` in float32
  is the fake-quantized weight exactly.
* FP8 input (a static per-tensor scale ``s``: the observer's ``amax / max``, or a learned one) ->
  ``Mul(x, 1 / s)``, ``QuantizeLinear`` to float8 with scale 1 (saturating), ``DequantizeLinear`` with
  scale ``s``: the fake-quant op's ``rnd(x * (1 / s)) * s`` (it multiplies by the reciprocal;
  ``QuantizeLinear`` would divide).

What ONNX Runtime 1.32 (CPU) runs, measured: float8 ``DequantizeLinear`` per tensor, per channel and
blocked (opset 21) exactly, and float8 ``QuantizeLinear`` with saturation. What it does not:
``FLOAT4E2M1`` (opset 23) ``DequantizeLinear`` has no CPU kernel (``NOT_IMPLEMENTED``), so MXFP4 /
NVFP4 weights are refused here (GGUF writes MXFP4: :func:`qat.export.gguf.export_gguf`); and block
scales computed from each batch (MXFP8 / MXFP4 / NVFP4 inputs, dynamic FP8 inputs) have no
``QuantizeLinear`` form (ONNX has no exponent extraction in opset 21), so those inputs are refused too.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import QATConfigError
from ..microscaling import MICRO_FORMATS, float_codes
from ..modules import QuantModuleMixin
from .onnx import OPSET, replace_placeholders, trace_onnx

__all__ = ["export_onnx_float", "ONNX_FLOAT_FORMATS"]

#: weight formats this exporter writes
ONNX_FLOAT_FORMATS = ("fp8_e4m3", "fp8_e5m2", "mxfp8")
_ONNX_INPUT_FORMATS = ("fp8_e4m3", "fp8_e5m2")


class _Marker(torch.autograd.Function):
    """Identity while tracing; exported as ``qat::Float{kind}`` with the layer index (replaced afterwards)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, kind: str, index: int) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def symbolic(g, t, kind: str, index: int):
        out = g.op(f"qat::Float{kind}", t, index_i=index)
        out.setType(t.type())
        return out


def _active(q) -> bool:
    return q is not None and bool(q.fake_quant_enabled)


def _check_layer(name: str, mod: QuantModuleMixin) -> None:
    where = f"layer {name!r}"
    if getattr(mod, "input_smooth", None) is not None:
        raise QATConfigError(f"{where}: smoothed layers (qat.smooth_inputs) are not exported to float8 ONNX")
    wq, iq = mod.weight_quantizer, mod.input_quantizer
    if _active(wq) and wq.spec.format.value not in ONNX_FLOAT_FORMATS:
        fmt = wq.spec.format.value
        why = (
            "FLOAT4E2M1 DequantizeLinear (opset 23) has no ONNX Runtime CPU kernel (NOT_IMPLEMENTED in 1.32); "
            "export MXFP4 to GGUF (qat.export.gguf.export_gguf)" if fmt in ("mxfp4", "nvfp4") else
            "integer and k-quant layers export through qat.convert + qat.export.onnx.export_onnx / export_gguf"
        )
        raise QATConfigError(f"{where}: weight format {fmt!r} is not a float8 format {list(ONNX_FLOAT_FORMATS)}; {why}")
    if _active(iq):
        spec = iq.spec
        if spec.format.value not in _ONNX_INPUT_FORMATS or spec.dynamic or iq.scale.numel() != 1:
            raise QATConfigError(
                f"{where}: input spec (format {spec.format.value!r}, dynamic={spec.dynamic}, "
                f"{spec.granularity.value}) has no float8 QuantizeLinear form; inputs export as fp8_e4m3 / fp8_e5m2 "
                f"with one static scale (dynamic and block-scaled inputs compute their scales from each batch)"
            )


@contextlib.contextmanager
def _markers(layers):
    # the markers take the float weight (an initializer, dropped once unused) and the raw input, so
    # nothing of the fake quantization itself is traced
    for k, (_, mod) in enumerate(layers):

        # the layer's signatures (out_dtype: autocast's; _owned: the traced clipped STE's; both unused)
        def weight(out_dtype=None, *, _owned=False, k=k, mod=mod):
            return _Marker.apply(mod.weight.detach(), "Weight", k)

        def quant_in(x, out_dtype=None, *, _owned=False, k=k, mod=mod):
            return _Marker.apply(x, "Input", k) if _active(mod.input_quantizer) else x

        if _active(mod.weight_quantizer):
            mod.quantized_weight = weight
        mod.quantize_input = quant_in
    try:
        yield
    finally:
        for _, mod in layers:
            mod.__dict__.pop("quantized_weight", None)
            mod.__dict__.pop("quantize_input", None)


def _float8_tensor(name: str, q: torch.Tensor, element: str):
    from onnx import TensorProto, helper

    dtype, ttype = (torch.float8_e4m3fn, TensorProto.FLOAT8E4M3FN) if element == "e4m3" else (
        torch.float8_e5m2, TensorProto.FLOAT8E5M2)
    raw = q.contiguous().to(dtype).view(torch.uint8).cpu().numpy()  # on the grid: the cast is exact
    return helper.make_tensor(name, ttype, list(q.shape), vals=raw.tobytes(), raw=True)


def _weight_nodes(prefix: str, mod: QuantModuleMixin, out: str):
    from onnx import helper, numpy_helper

    wq = mod.weight_quantizer
    f = MICRO_FORMATS[wq.spec.format.value]
    w = mod.latent_weight().detach()
    view = tuple(w.shape)
    scale = None if f.block_scale == "e8m0" else wq.scale.detach()
    q, s = float_codes(w, f.name, scale, wq.axis)
    codes, sname, dq = f"{prefix}weight_q", f"{prefix}weight_scale", f"{prefix}weight_dq"
    attrs = {}
    if f.block_size:  # (rows..., K/32, 32) codes with (rows..., K/32, 1) scales -> blocked along the last axis
        q = q.reshape(view)
        s = s.reshape(*view[:-1], view[-1] // f.block_size)
        attrs = {"axis": len(view) - 1, "block_size": f.block_size}
    elif wq.axis is not None:
        s = s.reshape(-1)
        attrs = {"axis": wq.axis % len(view)}
    else:
        s = s.reshape(())
    nodes = [helper.make_node("DequantizeLinear", [codes, sname], [dq if view != tuple(mod.weight.shape) else out],
                              name=dq, **attrs)]
    inits = [_float8_tensor(codes, q, f.element), numpy_helper.from_array(s.float().cpu().numpy(), sname)]
    if view != tuple(mod.weight.shape):  # a per-group conv weight, (O, I*k) -> (O, I, *k)
        shape = f"{prefix}weight_shape"
        inits.append(numpy_helper.from_array(np.array(mod.weight.shape, dtype=np.int64), shape))
        nodes.append(helper.make_node("Reshape", [dq, shape], [out], name=f"{prefix}weight_reshape"))
    return nodes, inits


def _input_nodes(prefix: str, mod: QuantModuleMixin, x: str, out: str):
    from onnx import TensorProto, helper, numpy_helper

    iq = mod.input_quantizer
    f = MICRO_FORMATS[iq.spec.format.value]
    s = iq.scale.detach().float().reshape(())
    inv = (1.0 / s).cpu().numpy()  # the op's float32 reciprocal
    ttype = TensorProto.FLOAT8E4M3FN if f.element == "e4m3" else TensorProto.FLOAT8E5M2
    names = {k: f"{prefix}input_{k}" for k in ("inv", "one", "zp", "scale", "scaled", "q")}
    inits = [
        numpy_helper.from_array(inv.astype(np.float32), names["inv"]),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), names["one"]),
        helper.make_tensor(names["zp"], ttype, [], vals=b"\x00", raw=True),
        numpy_helper.from_array(s.cpu().numpy().astype(np.float32), names["scale"]),
    ]
    nodes = [
        helper.make_node("Mul", [x, names["inv"]], [names["scaled"]], name=f"{prefix}input_mul"),
        helper.make_node("QuantizeLinear", [names["scaled"], names["one"], names["zp"]], [names["q"]],
                         name=f"{prefix}input_q", saturate=1),
        helper.make_node("DequantizeLinear", [names["q"], names["scale"]], [out], name=f"{prefix}input_dq"),
    ]
    return nodes, inits


def export_onnx_float(
    model: nn.Module,
    args: Union[torch.Tensor, tuple],
    path: Union[str, os.PathLike],
    *,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_axes: Optional[dict] = None,
) -> str:
    """Export a prepared model with FP8 / MXFP8 layers to ONNX float8 QDQ (opset 21) that ONNX
    Runtime runs; the weights' float8 codes and scales are the ones training used.

    Args:
        model: a model prepared (:func:`qat.prepare`) with float8 weight formats (``fp8_e4m3``,
            ``fp8_e5m2``, ``mxfp8``) and inputs either unquantized or ``fp8_*`` with a static
            per-tensor scale (the ``fp8_e4m3`` preset); calibrate, then freeze the observers.
        args: example input(s) for tracing.
        path: the ``.onnx`` file to write.
        input_names / output_names / dynamic_axes: as ``torch.onnx.export`` takes them.

    Returns:
        the path written.

    Raises:
        QATConfigError: a quantized layer whose weight or input format has no float8 QDQ form here
            (FP4, integer, k-quant, dynamic or block-scaled inputs), naming the layer and why.

    Example::

        model = prepare(model, "fp8_e4m3"); ...train, calibrate...
        model.apply(lambda m: m.enable_observer(False) if isinstance(m, FakeQuantizer) else None)
        export_onnx_float(model.eval(), torch.randn(1, 64), "model_fp8.onnx")
    """
    import onnx  # noqa: F401 - fail before tracing, not after, when onnx is missing

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModuleMixin)]
    for name, mod in layers:
        _check_layer(name, mod)
    path = os.fspath(path)
    args = args if isinstance(args, tuple) else (args,)
    was_training = model.training
    model.eval()
    try:
        with _markers(layers), torch.no_grad():
            trace_onnx(model, args, path, input_names, output_names, dynamic_axes, OPSET)
    finally:
        model.train(was_training)

    def replace(node, name, mod, prefix):
        if node.op_type == "FloatWeight":
            return (*_weight_nodes(prefix, mod, node.output[0]), True)
        return (*_input_nodes(prefix, mod, node.input[0], node.output[0]), False)

    return replace_placeholders(path, layers, replace)
