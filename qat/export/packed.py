"""Packed checkpoint: a converted model's integer tensors in one safetensors file, with the
quantization metadata (resolved plan and per-layer records) as JSON in the file's metadata.

Layout (all safetensors metadata values are strings):

* ``format``: ``"lightning-qat.packed"``; ``format_version``: ``"1"``.
* ``plan``: the :class:`~qat.QuantPlan` as JSON (``null`` if the model had none).
* ``layers``: qualified layer name -> layer record (type, weight / input spec, shapes, scale dtype),
  as :meth:`qat.convert.IntModuleMixin.layer_info` writes it.
* tensors: the converted model's ``state_dict`` (``qweight``, ``weight_scale``, ...; biases, norms
  and every float layer as they are).

Loading needs no training code: give the float architecture (``load_packed(path, MyNet())``) and
get the converted model back, or give nothing and get a :class:`PackedCheckpoint` whose
:meth:`~PackedCheckpoint.float_state_dict` loads straight into the float architecture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..convert import is_converted
from ..granularity import dequantize
from ..int_modules import IntModuleMixin, check_int_state_finite
from ..modules import LAYER_TYPES
from .packing import unpack_codes
from ..errors import QATConfigError
from ..plan import QuantPlan
from ..spec import QuantSpec

__all__ = ["FORMAT", "PackedFormatError", "PackedCheckpoint", "save_packed", "load_packed", "read_packed"]

FORMAT = "lightning-qat.packed"
FORMAT_VERSION = "1"

PathLike = Union[str, os.PathLike]

#: float type name in a layer record -> integer layer class
_BY_FLOAT_NAME = {t.name: t.int for t in LAYER_TYPES}


class PackedFormatError(ValueError):
    """A file that is not a lightning-qat packed checkpoint, or one that does not fit the model."""


def save_packed(model: nn.Module, path: PathLike, extra_metadata: Optional[dict[str, str]] = None) -> str:
    """Write a converted model (see :func:`qat.convert`) as a packed safetensors checkpoint.

    Args:
        model: a converted model.
        path: the ``.safetensors`` file to write.
        extra_metadata: more string key / values for the file's metadata.

    Returns:
        the path written.

    Raises:
        QATConfigError: ``model`` is not converted, or an integer layer's scales, zero points or
            smoothing factors hold NaN / Inf (the message names the layers).

    Example::

        >>> import torch, torch.nn as nn, tempfile, os
        >>> from qat import prepare, convert
        >>> m = prepare(nn.Sequential(nn.Linear(8, 4)), "w4a8"); _ = m(torch.randn(2, 8))
        >>> p = save_packed(convert(m), os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> type(load_packed(p, nn.Sequential(nn.Linear(8, 4)))[0]).__name__
        'IntLinear'
    """
    from safetensors.torch import save_file

    if not is_converted(model):
        raise QATConfigError("save_packed() needs a converted model: call qat.convert(model) first")
    check_int_state_finite(model, "save_packed()")
    layers = {n: m.layer_info() for n, m in model.named_modules() if isinstance(m, IntModuleMixin)}
    plan = getattr(model, "qat_plan", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plan": json.dumps(plan.to_dict() if isinstance(plan, QuantPlan) else None),
        "layers": json.dumps(layers),
    }
    meta.update(extra_metadata or {})
    # tied / shared tensors are stored once per name: safetensors refuses shared storage
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, os.fspath(path), metadata=meta)
    return os.fspath(path)


@dataclass
class PackedCheckpoint:
    """The contents of a packed checkpoint, read without a model.

    Attributes:
        tensors: name -> tensor, as stored.
        layers: qualified layer name -> layer record.
        plan: the resolved plan (``None`` if the model had none).
        metadata: the raw safetensors metadata.
    """

    tensors: dict[str, torch.Tensor]
    layers: dict[str, dict[str, Any]]
    plan: Optional[QuantPlan]
    metadata: dict[str, str]

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """A state dict for the float architecture: every integer weight dequantized to float32
        (``(q - z) * s``, the fake-quantized weight), quantization buffers dropped."""
        out = {k: v for k, v in self.tensors.items()}
        for name, rec in self.layers.items():
            prefix = f"{name}." if name else ""
            if rec.get("weight") is None:
                continue
            spec = QuantSpec.from_dict(rec["weight"])
            shape = tuple(rec["weight_shape"])
            view = shape
            if spec.granularity.value == "per_group" and len(shape) > 2:
                view = (shape[0], int(torch.Size(shape[1:]).numel()))
            q = unpack_codes(out.pop(prefix + "qweight"), spec, view)
            zp = out.pop(prefix + "weight_zero_point", None)
            w = dequantize(q, out.pop(prefix + "weight_scale"), zp, spec).reshape(shape)
            if rec.get("input_smooth"):  # codes of W * s: the float layer (no smoothing) gets (W * s)_q / s
                w = w / out[prefix + "input_smooth"].float()
            out[prefix + "weight"] = w
        for name, rec in self.layers.items():
            prefix = f"{name}." if name else ""
            out.pop(prefix + "input_scale", None)
            out.pop(prefix + "input_zero_point", None)
            sm = out.pop(prefix + "input_smooth", None)
            if sm is not None and rec.get("weight") is None:  # a float weight stored as W * s
                out[prefix + "weight"] = out[prefix + "weight"] / sm.float()
        return out


def read_packed(path: PathLike) -> PackedCheckpoint:
    """Read a packed checkpoint's tensors and metadata (no model needed).

    Raises:
        PackedFormatError: the file is missing, not safetensors, or not written by :func:`save_packed`.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackedFormatError(f"packed checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise PackedFormatError(f"{path!r} is not a safetensors file ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise PackedFormatError(
            f"{path!r} is a safetensors file but not a lightning-qat packed checkpoint "
            f"(metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}); write one with qat.export.save_packed"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackedFormatError(f"{path!r}: packed format version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION!r})")
    try:
        layers = json.loads(meta["layers"])
        plan_d = json.loads(meta.get("plan", "null"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise PackedFormatError(f"{path!r}: malformed quantization metadata ({exc})") from None
    plan = None if plan_d is None else QuantPlan.from_dict(plan_d)
    return PackedCheckpoint(tensors=tensors, layers=layers, plan=plan, metadata=meta)


def load_packed(path: PathLike, model: Optional[nn.Module] = None) -> Union[nn.Module, PackedCheckpoint]:
    """Load a packed checkpoint.

    Args:
        path: a file written by :func:`save_packed`.
        model: the float architecture (fresh weights are fine: all are overwritten). Its layers named
            in the checkpoint are replaced by integer layers, in place, and the state is loaded
            (strictly). ``None``: return the :class:`PackedCheckpoint` itself.

    Returns:
        the converted ``model``, or a :class:`PackedCheckpoint`.

    Raises:
        PackedFormatError: not our file, or it does not fit ``model`` (a missing layer, another
            layer type, missing or unexpected tensors, other shapes), or its scales / zero points
            hold NaN / Inf (a file an older version wrote from a poisoned model).
    """
    ckpt = read_packed(path)
    if model is None:
        return ckpt
    if not isinstance(model, nn.Module):
        raise PackedFormatError(f"load_packed(path, model): model must be the float nn.Module architecture, got {type(model).__name__}")
    for name, rec in ckpt.layers.items():
        try:
            float_mod = model.get_submodule(name)
        except AttributeError:
            raise PackedFormatError(f"{os.fspath(path)!r}: the model has no layer {name!r} (the checkpoint quantizes it)") from None
        cls = _BY_FLOAT_NAME.get(rec.get("type"))
        if cls is None:
            raise PackedFormatError(f"layer {name!r}: unknown layer type {rec.get('type')!r} in the checkpoint; known: {sorted(_BY_FLOAT_NAME)}")
        if tuple(float_mod.weight.shape) != tuple(rec["weight_shape"]):
            raise PackedFormatError(
                f"layer {name!r}: the model's weight has shape {tuple(float_mod.weight.shape)}, the checkpoint's {tuple(rec['weight_shape'])}"
            )
        try:
            new = cls.from_float(float_mod, rec)
        except QATConfigError as exc:
            raise PackedFormatError(f"layer {name!r}: {exc}") from None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    missing, unexpected = model.load_state_dict(ckpt.tensors, strict=False)
    if missing or unexpected:
        raise PackedFormatError(
            f"{os.fspath(path)!r} does not fit the model: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}"
        )
    try:
        check_int_state_finite(model, "load_packed()")
    except QATConfigError as exc:
        raise PackedFormatError(f"{os.fspath(path)!r}: {exc}") from None
    if ckpt.plan is not None:
        model.qat_plan = ckpt.plan
    model.qat_int_layers = ckpt.layers
    return model
