"""ONNX export of a converted model with ``QuantizeLinear`` / ``DequantizeLinear`` (opset 21).

How: the converted model is traced by PyTorch's TorchScript ONNX exporter with each integer
layer's weight and input routed through a placeholder op (``qat::Weight`` / ``qat::Input``); the
placeholders are then replaced in the ONNX graph:

* weight -> ``DequantizeLinear`` of an integer initializer holding the trained codes: ``INT4`` /
  ``UINT4`` for widths up to 4 bits, ``INT8`` / ``UINT8`` up to 8, ``INT16`` / ``UINT16`` above;
  per-tensor (scalar scale), per-channel (``axis``) or per-group (opset-21 ``block_size`` along the
  last axis; a conv weight is dequantized as its ``(O, I*k)`` view and reshaped). Signed 8-bit
  codes are stored as ``UINT8`` offset by 128, zero point too (``(q + 128) - (z + 128) = q - z``:
  the same weights): see below.
* input activation -> ``Mul(x, 1/s)``, ``QuantizeLinear`` with scale 1, ``DequantizeLinear`` with
  scale ``s`` where ONNX's own semantics equal the spec (round half to even, static per-tensor or
  per-channel range, the full ``INT8`` / ``UINT8`` range); otherwise (narrow or other bit ranges,
  ``half_away`` / ``half_up`` rounding) the same math written out in float ops:
  ``(Clip(rnd(x * inv_s) + z, qmin, qmax) - z) * s``. Dynamic (per-batch) activation ranges are not
  exported (a clear error says so).

Why this form (measured with ONNX Runtime 1.32's default session, ``ORT_ENABLE_ALL``, which fuses
the QDQ nodes into ``MatMulIntegerToFloat`` / ``QLinearMatMul`` / ``QGemm`` / ``QLinearConv``):

* On x86 CPUs with AVX2 but without AVX512-VNNI / AVX-VNNI, ORT's u8 x s8 integer kernels sum
  pairs of products with ``VPMADDUBSW``, which saturates at 16 bits: with 8-bit weights and
  activation codes near 255 a W8A8 Linear's outputs were off by up to 6% of their range. A
  ``UINT8`` weight makes the product u8 x u8, a kernel without that saturation (signed
  activations do not help: ORT converts them to u8 and keeps the u8 x s8 kernel).
* ``QuantizeLinear`` divides by the scale, the fake-quant op multiplies by the float32 reciprocal;
  the two round differently in about one element in 10^5 (an exact tie one way, not the other).
  ``Mul(x, 1/s)`` then a division by 1 (exact) gives the op's codes in every element, and keeps a
  ``QGemm`` from requantizing a Gemm's output with its own rounding.

With both, a layer run by ORT's default session agrees with the fake-quantized layer to float
rounding (within 1e-5 of its output's range), on AVX2 and AVX512-VNNI CPUs alike
(``tests/qat/test_export_onnx.py::test_default_session_matches_fake_quant_w8a8_linear``). Across
layers, ORT's integer accumulation and torch's float GEMM round a layer's output differently in
the last bits, which can move a rare element of the next layer's input to the neighbouring code
(one row in thousands in those tests).

The model's IR version is 10 (ONNX Runtime 1.31+ reads IR <= 13).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..convert import is_converted
from ..int_modules import IntConv1d, IntConv2d, IntModuleMixin, check_int_state_finite
from ..errors import QATConfigError
from ..granularity import Layout
from ..spec import RoundMode

__all__ = ["export_onnx", "export_float_onnx", "OPSET", "IR_VERSION"]

OPSET = 21
_NATIVE_QDQ = True  # False: every input quantizer in float ops (debugging)
IR_VERSION = 10


class _WeightPlaceholder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, index: int) -> torch.Tensor:
        return w.clone()

    @staticmethod
    def symbolic(g, w, index: int):
        out = g.op("qat::Weight", w, index_i=index)
        out.setType(w.type())
        return out


class _InputPlaceholder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: int) -> torch.Tensor:
        return x.clone()  # only shapes matter while tracing: the node is replaced afterwards

    @staticmethod
    def symbolic(g, x, index: int):
        out = g.op("qat::Input", x, index_i=index)
        out.setType(x.type())
        return out


@contextlib.contextmanager
def _placeholders(layers: list[tuple[str, IntModuleMixin]]):
    """Route each integer layer's weight and input through the placeholder ops while tracing."""
    for k, (_, mod) in enumerate(layers):
        orig_w, orig_in = mod.dequantized_weight, mod.quantize_input

        def weight(k=k, orig=orig_w):
            return _WeightPlaceholder.apply(orig().detach(), k)

        def quant_in(x, k=k, orig=orig_in, mod=mod):
            return x if mod.input_spec is None else _InputPlaceholder.apply(x, k)

        if mod.weight_spec is not None:
            mod.dequantized_weight = weight
        mod.quantize_input = quant_in
    try:
        yield
    finally:
        for _, mod in layers:
            mod.__dict__.pop("dequantized_weight", None)
            mod.__dict__.pop("quantize_input", None)


def trace_onnx(model, args, path, input_names, output_names, dynamic_axes, opset) -> None:
    """``torch.onnx.export`` (TorchScript exporter) as this package's ONNX exporters call it: the
    ``qat`` custom domain for the placeholder ops that are replaced afterwards, constants folded,
    warnings silenced. Used by :func:`export_onnx` and :func:`qat.export.onnx_float.export_onnx_float`.

    Example::

        trace_onnx(model.eval(), (torch.randn(1, 8),), "raw.onnx", ["x"], ["y"], None, OPSET)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            path,
            dynamo=False,
            opset_version=opset,
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
            dynamic_axes=dynamic_axes,
            custom_opsets={"qat": 1},
            do_constant_folding=True,
        )


def _qtype(bits: int, signed: bool) -> tuple[int, Any]:
    """ONNX element type and numpy storage type for integer codes of ``bits`` bits."""
    from onnx import TensorProto

    if bits <= 4:
        return (TensorProto.INT4 if signed else TensorProto.UINT4), (np.int8 if signed else np.uint8)
    if bits <= 8:
        return (TensorProto.INT8 if signed else TensorProto.UINT8), (np.int8 if signed else np.uint8)
    return (TensorProto.INT16 if signed else TensorProto.UINT16), (np.int16 if signed else np.uint16)


def _as_unsigned_byte(spec) -> bool:
    """Signed 8-bit codes are written as UINT8 + 128 (see the module docstring); up to 7 bits they
    stay INT8 (codes within [-64, 63] cannot saturate a 16-bit pair sum of u8 x s8 products)."""
    return spec.signed and spec.bits == 8


def _int_tensor(name: str, values: np.ndarray, bits: int, signed: bool):
    from onnx import helper, numpy_helper

    onnx_type, np_type = _qtype(bits, signed)
    values = np.ascontiguousarray(values).astype(np_type)
    if bits <= 4:
        return helper.make_tensor(name, onnx_type, values.shape, values.reshape(-1).tolist())
    return numpy_helper.from_array(values, name)


def _f32(name: str, values) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(np.asarray(values, dtype=np.float32)), name)


def _weight_nodes(prefix: str, mod: IntModuleMixin, out_name: str):
    """(nodes, initializers) that produce the float weight ``out_name`` from the integer codes."""
    from onnx import helper

    spec = mod.weight_spec
    q = mod.codes().cpu().numpy()  # view_shape
    s = mod.weight_scale.detach().float().cpu().numpy()
    z = np.zeros(s.shape, dtype=np.int64) if mod.weight_zero_point is None else mod.weight_zero_point.cpu().numpy().astype(np.int64)
    attrs: dict[str, Any] = {}
    signed = spec.signed
    if _as_unsigned_byte(spec):  # u8 x u8 in ORT's integer kernels: no 16-bit saturation on AVX2
        q, z, signed = q.astype(np.int64) + 128, z + 128, False
    layout = Layout.of(spec)
    if layout.is_per_tensor:
        s, z = s.reshape(()), z.reshape(())
    elif layout.axis is not None:
        attrs["axis"] = layout.axis
    else:  # per group: ONNX's blocked DequantizeLinear along the last axis
        attrs["axis"] = q.ndim - 1
        attrs["block_size"] = layout.group_size
    inits = [
        _int_tensor(f"{prefix}qweight", q, spec.bits, signed),
        _f32(f"{prefix}weight_scale", s),
        _int_tensor(f"{prefix}weight_zero_point", z, spec.bits, signed),
    ]
    dq_out = out_name if tuple(mod.view_shape) == tuple(mod.weight_shape) else f"{prefix}weight_view"
    nodes = [
        helper.make_node(
            "DequantizeLinear",
            [f"{prefix}qweight", f"{prefix}weight_scale", f"{prefix}weight_zero_point"],
            [dq_out],
            name=f"{prefix}weight_dq",
            **attrs,
        )
    ]
    if dq_out != out_name:  # (O, I*k) -> (O, I, *k)
        inits.append(helper.make_tensor(f"{prefix}weight_shape", 7, [len(mod.weight_shape)], list(mod.weight_shape)))
        nodes.append(helper.make_node("Reshape", [dq_out, f"{prefix}weight_shape"], [out_name], name=f"{prefix}weight_reshape"))
    return nodes, inits


def _input_param_shape(mod: IntModuleMixin, n: int) -> tuple[int, ...]:
    """Broadcast shape of per-channel activation parameters (``C`` elements)."""
    if isinstance(mod, IntConv2d):
        return (n, 1, 1)
    if isinstance(mod, IntConv1d):
        return (n, 1)
    return (n,)


def _input_nodes(prefix: str, mod: IntModuleMixin, in_name: str, out_name: str, name: str):
    from onnx import helper

    spec = mod.input_spec
    if spec.dynamic:
        raise QATConfigError(
            f"layer {name!r}: ONNX export of dynamic ({spec.granularity.value}) activation quantization is not supported; "
            "use a static input spec (observer ranges) or export to GGUF"
        )
    s = mod.input_scale.detach().float().cpu().numpy()
    z = mod.input_zero_point.detach().float().cpu().numpy()
    layout = Layout.of(spec)
    per_channel = layout.axis is not None
    # 8-bit only: ONNX Runtime's graph optimizer (ORT_ENABLE_ALL) moves a UINT4 activation
    # QuantizeLinear across MaxPool and then rejects its own graph; 4-bit inputs use the float form
    full = {(8, True): (-128, 127), (8, False): (0, 255)}
    native = (
        _NATIVE_QDQ
        and spec.round_mode is RoundMode.HALF_EVEN
        and full.get((spec.bits, spec.signed)) == (spec.qmin, spec.qmax)
        and (layout.is_per_tensor or per_channel)
    )
    if native:
        # x * (1/s) as the op computes it, QuantizeLinear by 1 (exact), DequantizeLinear by s
        attrs = {"axis": 1 if isinstance(mod, (IntConv1d, IntConv2d)) else -1} if per_channel else {}
        ss, zz = (s, z) if per_channel else (s.reshape(()), z.reshape(()))
        inv_s = (np.float32(1.0) / s.astype(np.float32)).reshape(_input_param_shape(mod, s.size) if per_channel else ())
        inits = [
            _f32(f"{prefix}input_inv_scale", inv_s),
            _f32(f"{prefix}input_unit_scale", np.ones_like(ss)),
            _f32(f"{prefix}input_scale", ss),
            _int_tensor(f"{prefix}input_zero_point", zz.astype(np.int64), spec.bits, spec.signed),
        ]
        nodes = [
            helper.make_node("Mul", [in_name, f"{prefix}input_inv_scale"], [f"{prefix}input_v"], name=f"{prefix}input_mul"),
            helper.make_node(
                "QuantizeLinear", [f"{prefix}input_v", f"{prefix}input_unit_scale", f"{prefix}input_zero_point"],
                [f"{prefix}input_q"], name=f"{prefix}input_q", **attrs,
            ),
            helper.make_node(
                "DequantizeLinear", [f"{prefix}input_q", f"{prefix}input_scale", f"{prefix}input_zero_point"],
                [out_name], name=f"{prefix}input_dq", **attrs,
            ),
        ]
        return nodes, inits
    # the fake-quant math in float ops, exactly as the reference computes it
    shape = _input_param_shape(mod, s.size) if per_channel else ()
    inv_s = (np.float32(1.0) / s.astype(np.float32)).reshape(shape)
    p = prefix
    inits = [
        _f32(f"{p}input_inv_scale", inv_s),
        _f32(f"{p}input_scale", s.reshape(shape)),
        _f32(f"{p}input_zero_point", z.reshape(shape)),
        _f32(f"{p}input_qmin", np.float32(spec.qmin)),
        _f32(f"{p}input_qmax", np.float32(spec.qmax)),
        _f32(f"{p}half", np.float32(0.5)),
    ]
    nodes = [helper.make_node("Mul", [in_name, f"{p}input_inv_scale"], [f"{p}v"])]
    if spec.round_mode is RoundMode.HALF_EVEN:
        nodes.append(helper.make_node("Round", [f"{p}v"], [f"{p}r"]))
    elif spec.round_mode is RoundMode.HALF_UP:
        nodes += [helper.make_node("Add", [f"{p}v", f"{p}half"], [f"{p}vh"]), helper.make_node("Floor", [f"{p}vh"], [f"{p}r"])]
    else:  # half away from zero: sign(v) * floor(|v| + 0.5)
        nodes += [
            helper.make_node("Abs", [f"{p}v"], [f"{p}va"]),
            helper.make_node("Add", [f"{p}va", f"{p}half"], [f"{p}vh"]),
            helper.make_node("Floor", [f"{p}vh"], [f"{p}fl"]),
            helper.make_node("Sign", [f"{p}v"], [f"{p}sg"]),
            helper.make_node("Mul", [f"{p}sg", f"{p}fl"], [f"{p}r"]),
        ]
    nodes += [
        helper.make_node("Add", [f"{p}r", f"{p}input_zero_point"], [f"{p}qz"]),
        helper.make_node("Clip", [f"{p}qz", f"{p}input_qmin", f"{p}input_qmax"], [f"{p}q"]),
        helper.make_node("Sub", [f"{p}q", f"{p}input_zero_point"], [f"{p}qc"]),
        helper.make_node("Mul", [f"{p}qc", f"{p}input_scale"], [out_name]),
    ]
    for i, n in enumerate(nodes):
        n.name = f"{p}input_fq_{i}"
    return nodes, inits


def prune_unused(graph) -> None:
    """Drop initializers and Constant nodes nothing reads any more (the traced float weights).

    Example::

        >>> import numpy as np
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> keep, drop = numpy_helper.from_array(np.ones(2, np.float32), "a"), numpy_helper.from_array(np.ones(2, np.float32), "b")
        >>> g = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "g", [],
        ...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], initializer=[keep, drop])
        >>> prune_unused(g); [i.name for i in g.initializer]
        ['a']
    """
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Constant" and not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def replace_placeholders(path: str, layers: list, replace: Callable) -> str:
    """Turn the traced ``path`` into the exported model: each ``qat``-domain placeholder node (its
    ``index`` attribute points into ``layers``, ``(name, module)`` pairs) becomes the nodes
    ``replace(node, name, module, prefix)`` returns as ``(nodes, initializers, first)``, ``first``
    for nodes that read initializers only (a weight's dequantization: put before all others, so the
    graph stays in topological order); then what nothing reads any more is dropped
    (:func:`prune_unused`) and the model checked and saved (:func:`finish_onnx`). The tail of
    :func:`export_onnx` and :func:`qat.export.onnx_float.export_onnx_float`; returns ``path``.
    """
    import onnx

    proto = onnx.load(path)
    graph = proto.graph
    head, body, inits = [], [], []
    for node in graph.node:
        if node.domain != "qat":
            body.append(node)
            continue
        k = next(a.i for a in node.attribute if a.name == "index")
        name, mod = layers[k]
        nodes, new, first = replace(node, name, mod, f"{name}." if name else "model.")
        (head if first else body).extend(nodes)
        inits += new
    del graph.node[:]
    graph.node.extend(head + body)
    graph.initializer.extend(inits)
    prune_unused(graph)
    return finish_onnx(proto, path)


def finish_onnx(model_proto, path: str) -> str:
    """Set the IR version and opset (:data:`IR_VERSION`, :data:`OPSET`), check and save ``model_proto``
    to ``path``; returns ``path``.

    Example::

        finish_onnx(onnx.load("raw.onnx"), "model.onnx")
    """
    import onnx

    model_proto.ir_version = IR_VERSION
    del model_proto.opset_import[:]
    model_proto.opset_import.extend([onnx.helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, path)
    return path


def export_onnx(
    model: nn.Module,
    args: Union[torch.Tensor, tuple],
    path: Union[str, os.PathLike],
    *,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_axes: Optional[dict] = None,
) -> str:
    """Export a converted model to ONNX with QuantizeLinear / DequantizeLinear (opset 21).

    Args:
        model: a model returned by :func:`qat.convert` (or :func:`qat.export.load_packed`).
        args: example input(s) for tracing (a tensor or a tuple of positional tensors).
        path: the ``.onnx`` file to write.
        input_names / output_names / dynamic_axes: as ``torch.onnx.export`` takes them.

    Returns:
        the path written.

    Raises:
        QATConfigError: ``model`` is not converted, a layer's spec has no ONNX form (dynamic
            activations), or a layer's scales / zero points hold NaN / Inf.

    Example::

        export_onnx(convert(model).eval(), torch.randn(1, 1, 8, 8), "digits_int.onnx",
                    input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
    """
    import onnx  # noqa: F401 - fail before tracing, not after, when onnx is missing

    if not is_converted(model):
        raise QATConfigError("export_onnx() needs a converted model (integer layers): call qat.convert(model) first")
    check_int_state_finite(model, "export_onnx()")
    path = os.fspath(path)
    args = args if isinstance(args, tuple) else (args,)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, IntModuleMixin)]
    for name, mod in layers:
        if mod.input_spec is not None and mod.input_spec.dynamic:
            _input_nodes("", mod, "", "", name)  # raises the clear error before tracing
    was_training = model.training
    model.eval()
    try:
        with _placeholders(layers), torch.no_grad():
            trace_onnx(model, args, path, input_names, output_names, dynamic_axes, OPSET)
    finally:
        model.train(was_training)

    def replace(node, name, mod, prefix):
        if node.op_type == "Weight":
            return (*_weight_nodes(prefix, mod, node.output[0]), True)
        return (*_input_nodes(prefix, mod, node.input[0], node.output[0], name), False)

    return replace_placeholders(path, layers, replace)


def export_float_onnx(
    model: nn.Module,
    args: Union[torch.Tensor, tuple],
    path: Union[str, os.PathLike],
    *,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_axes: Optional[dict] = None,
) -> str:
    """The float model with the same exporter and settings (the baseline to compare against)."""
    import onnx

    path = os.fspath(path)
    args = args if isinstance(args, tuple) else (args,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            trace_onnx(model, args, path, input_names, output_names, dynamic_axes, OPSET)
    finally:
        model.train(was_training)
    return finish_onnx(onnx.load(path), path)
