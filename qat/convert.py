"""`convert`: fake-quantized layers -> inference layers that hold real integer weights.

Each fake-quantized layer becomes the integer layer :data:`qat.modules.LAYER_TYPES` pairs it with
(:mod:`qat.int_modules`: codes bit-packed, scales, and the input's quantization parameters). The
dequantized weight ``(q - z) * s`` (float32) equals the fake-quantized weight bit for bit, so a
converted float32 model gives the very outputs of the fake-quantized one (tested with ``atol=0``).

Example::

    >>> import torch, torch.nn as nn
    >>> from qat import prepare, convert
    >>> model = prepare(nn.Sequential(nn.Linear(64, 32)), "w4a8")
    >>> _ = model(torch.randn(8, 64)); _ = model.eval()
    >>> int_model = convert(model)
    >>> type(int_model[0]).__name__, int_model[0].qweight.dtype, tuple(int_model[0].qweight.shape)
    ('IntLinear', torch.uint8, (1024,))
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .bn_fold import QuantConvBn2d, fold_bn
from .errors import QATConfigError
from .export.packing import pack_codes
from .granularity import quantize_codes, weight_view
from .int_modules import IntModuleMixin
from .modules import LAYER_TYPES, QuantModuleMixin
from .microscaling import is_microscaling
from .spec import Estimator, QuantSpec, ScaleDtype, WeightFormat

__all__ = ["convert", "is_converted", "int_layers"]

#: fake-quantized type -> integer layer (from the one table, :data:`qat.modules.LAYER_TYPES`)
_INT_OF = {t.quant: t.int for t in LAYER_TYPES}


def _stored_scale(s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """float16 where the spec asks for it and the values survive the round trip exactly."""
    s = s.detach().float()
    if spec.scale_dtype is ScaleDtype.FLOAT16:
        h = s.half()
        if torch.isfinite(h).all() and torch.equal(h.float(), s):
            return h
    return s.clone()


def _check_finite(name: str, which: str, q) -> None:
    """A quantizer whose state holds NaN / Inf cannot become integer codes and scales."""
    if q.spec.dynamic:  # no state of its own: ranges come from each batch
        return
    bad = q.nonfinite_state()
    if bad:
        raise QATConfigError(
            f"layer {name!r} {which} quantizer: {', '.join(bad)} not finite (NaN or Inf), so the layer has no valid "
            f"quantization; recalibrate it (qat.ptq.calibrate) or restore a checkpoint from before the values went bad "
            f"(qat.fake_quant.nonfinite_quantizers(model) lists every such quantizer)"
        )


@torch.no_grad()
def _convert_layer(name: str, mod: QuantModuleMixin) -> IntModuleMixin:
    cls = _INT_OF[type(mod)]
    wq = mod.weight_quantizer if mod.weight_quantizer is not None and bool(mod.weight_quantizer.fake_quant_enabled) else None
    iq = mod.input_quantizer if mod.input_quantizer is not None and bool(mod.input_quantizer.fake_quant_enabled) else None
    info: dict[str, Any] = {"weight": None, "input": None}
    if getattr(mod, "input_smooth", None) is not None:
        info["input_smooth"] = True
    for q, what in ((wq, "weight"), (iq, "input")):
        if q is not None and is_microscaling(q.spec.format):
            raise QATConfigError(
                f"layer {name!r}: a {q.spec.format.value} {what} is a float format, not integer codes: it has no "
                f"integer layer; export the prepared model (qat.export.gguf.export_gguf for mxfp4 weights, "
                f"qat.export.onnx_float.export_onnx_float for fp8 / mxfp8)"
            )
    if wq is not None and wq.spec.format is not WeightFormat.AFFINE:
        raise QATConfigError(
            f"layer {name!r}: a {wq.spec.format.value} (llama.cpp k-quant) weight has no integer layer; write the "
            f"prepared model with qat.export.gguf.export_gguf, which stores its codes and scales as trained"
        )
    if wq is not None:
        try:
            mod.quantized_weight()  # refresh the scale exactly as the next forward would (observers track the weight)
        except RuntimeError as exc:
            raise QATConfigError(f"layer {name!r}: weight quantizer has no range: {exc}") from None
        except ValueError:
            _check_finite(name, "weight", wq)  # the op refused a NaN / Inf parameter: name the quantizer
            raise
        if not bool(torch.isfinite(mod.weight.detach()).all()):
            raise QATConfigError(f"layer {name!r}: the weight holds NaN or Inf values; integer codes need a finite weight")
        _check_finite(name, "weight", wq)
        s, z = wq.current_qparams()
        spec = wq.spec
        info.update(
            weight=spec.to_dict(),
            weight_scale_shape=list(s.shape),
            weight_scale_dtype="float16" if _stored_scale(s, spec).dtype == torch.float16 else "float32",
            weight_zero_point=(not spec.symmetric) or spec.estimator is Estimator.LSQ_PLUS or bool((z != 0).any()),
        )
    if iq is not None:
        spec = iq.spec
        if not spec.dynamic and not bool(iq.initialized):
            raise QATConfigError(
                f"layer {name!r}: input quantizer never saw data, so it has no range; run a forward pass or "
                f"qat.ptq.calibrate(model, batches) before convert()"
            )
        _check_finite(name, "input", iq)
        if not spec.dynamic and not spec.learned and iq.observer is not None and not bool(iq.observer.seen.any()):
            raise QATConfigError(
                f"layer {name!r}: input quantizer saw only empty or non-finite (NaN / Inf) batches, so it has no "
                f"range; calibrate it on batches with finite values (qat.ptq.calibrate) before convert()"
            )
        info["input"] = spec.to_dict()
        if not spec.dynamic:
            info["input_scale_shape"] = list(iq.current_qparams()[0].shape)
    out = cls.from_float(mod, info)
    if wq is not None:
        w = mod.weight if mod.input_smooth is None else mod.weight * mod.input_smooth
        q = quantize_codes(weight_view(w, wq.spec), s, z, wq.spec)
        out.qweight.copy_(pack_codes(q, wq.spec))
        out.weight_scale.copy_(_stored_scale(s, wq.spec))
        if out.weight_zero_point is not None:
            out.weight_zero_point.copy_(z.to(out.weight_zero_point.dtype))
    if iq is not None and not iq.spec.dynamic:
        s, z = iq.current_qparams()
        out.input_scale.copy_(s)
        out.input_zero_point.copy_(z)
    out.train(mod.training)
    return out


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every fake-quantized layer by its integer inference layer.

    Conv-BatchNorm pairs trained with ``fold_bn=True`` are folded first. Quantizers switched off
    (``fake_quant_enabled`` false) leave their tensor in float, as the forward pass did.

    Args:
        model: a model returned by :func:`qat.prepare` (and trained / calibrated).
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is untouched.

    Returns:
        the converted model, with ``qat_plan`` (if the prepared model had one) and ``qat_int_layers``
        (qualified name -> layer record, as :meth:`IntModuleMixin.layer_info` writes it) set.

    Raises:
        QATConfigError: the model is not prepared, is already converted, holds a fake-quantized layer
            type convert has no integer twin for, an input quantizer that never saw data, a weight
            with NaN / Inf values, or a quantizer whose state (scale, zero point, observed range,
            PACT clip) is not finite; the message names the layer and the quantizer.

    Example::

        >>> import torch, torch.nn as nn
        >>> from qat import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(8, 4)), "w8a8")
        >>> _ = m(torch.randn(2, 8))
        >>> convert(m)[0].qweight.dtype
        torch.int8
    """
    if not isinstance(model, nn.Module):
        raise QATConfigError(f"convert() expects an nn.Module prepared with qat.prepare, got {type(model).__name__}")
    if is_converted(model) and not any(isinstance(m, QuantModuleMixin) for m in model.modules()):
        raise QATConfigError("model is already converted (it holds integer layers and no fake-quantized ones)")
    if not any(isinstance(m, QuantModuleMixin) for m in model.modules()):
        raise QATConfigError(
            f"model ({type(model).__name__}) is not prepared for QAT: it has no fake-quantized layers; "
            "call qat.prepare(model, plan) (and train or calibrate it) before convert()"
        )
    if not inplace:
        model = copy.deepcopy(model)
    if any(isinstance(m, QuantConvBn2d) for m in model.modules()):
        model = fold_bn(model, inplace=True)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModuleMixin)]
    for name, mod in layers:
        if type(mod) not in _INT_OF:
            raise QATConfigError(
                f"layer {name!r}: convert() has no integer layer for {type(mod).__name__}; "
                f"supported types: {sorted(t.__name__ for t in _INT_OF)}"
            )
    records: dict[str, dict[str, Any]] = {}
    for name, mod in layers:
        new = _convert_layer(name, mod)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        records[name] = new.layer_info()
    model.__dict__.pop("qat_layers", None)
    model.qat_int_layers = records
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` holds integer layers (made by :func:`convert` or ``qat.export.load_packed``)."""
    return any(isinstance(m, IntModuleMixin) for m in model.modules())


def int_layers(model: nn.Module):
    """``(qualified name, integer layer)`` for every integer layer of a converted model."""
    for name, mod in model.named_modules():
        if isinstance(mod, IntModuleMixin):
            yield name, mod
