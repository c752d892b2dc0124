"""`convert`: fake-quantized layers -> inference layers that hold real integer weights.

Each :class:`~qat.QuantLinear` / ``QuantConv1d`` / ``QuantConv2d`` / ``QuantEmbedding`` becomes an
:class:`IntLinear` / :class:`IntConv1d` / :class:`IntConv2d` / :class:`IntEmbedding` whose state is

* ``qweight``: the integer codes the fake quantizer produced, ``q = clamp(rnd(w / s) + z, qmin, qmax)``.
  8-bit codes are stored one a byte (``int8`` signed, ``uint8`` unsigned). Every other width is a
  little-endian bit stream of the offset codes ``q - qmin`` (``uint8``): 4-bit codes two a byte (the
  first element in the low nibble), 2-bit four a byte, 3-bit 8 codes in 3 bytes, and so on, so the
  tensor takes ``ceil(numel * bits / 8)`` bytes.
* ``weight_scale``: float16 when the spec asks for float16 scales (GGUF) and the trained values are
  float16 exactly, else float32; shaped like the fake quantizer's scale.
* ``weight_zero_point``: only for affine (``symmetric: false``) or LSQ+ specs, in the smallest integer
  dtype that holds ``[qmin, qmax]``; symmetric specs have ``z = 0`` and store none.
* ``input_scale`` / ``input_zero_point``: the input activation's float32 quantization parameters; the
  converted layer still quantize-dequantizes its input, so it computes what the fake-quantized layer
  computed. Dynamic specs recompute them from each batch, as in training.

The dequantized weight ``(q - z) * s`` (float32) equals the fake-quantized weight bit for bit, so a
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
import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qat.kernels import fake_quantize
from qat.kernels.reference import broadcast_param, round_with_mode

from .errors import QATConfigError
from .modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, QuantModuleMixin
from .observers import qparams_from_range, reduce_minmax
from .spec import Estimator, Granularity, QuantSpec, ScaleDtype

__all__ = [
    "convert",
    "is_converted",
    "int_layers",
    "IntModuleMixin",
    "IntLinear",
    "IntConv1d",
    "IntConv2d",
    "IntEmbedding",
    "INT_MODULES",
    "pack_codes",
    "unpack_codes",
    "packed_numel",
    "quantize_codes",
]


# ----------------------------------------------------------------------------- packing


def packed_numel(numel: int, bits: int) -> int:
    """Elements of the stored ``qweight`` for ``numel`` codes of ``bits`` bits (bytes, 8-bit: codes)."""
    return numel if bits == 8 else (numel * bits + 7) // 8


def pack_codes(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (any integer-valued tensor in ``[qmin, qmax]``) -> the stored ``qweight``.

    8 bits: ``int8`` / ``uint8`` codes as they are (shape kept). Other widths: a flat ``uint8`` bit
    stream of ``q - qmin``, ``bits`` bits a code, least significant bit first.
    """
    bits = spec.bits
    if bits == 8:
        return q.to(torch.int8 if spec.signed else torch.uint8)
    u = (q.reshape(-1).to(torch.int64) - spec.qmin).cpu().numpy()
    if bits < 8:
        if 8 % bits == 0:  # 2 / 4 bits: whole codes per byte, a shift-and-or is enough
            per = 8 // bits
            u8 = np.zeros(-(-u.size // per) * per, dtype=np.uint8)
            u8[: u.size] = u
            u8 = u8.reshape(-1, per)  # (N,) -> (N / per, per)
            out = np.zeros(u8.shape[0], dtype=np.uint8)
            for j in range(per):
                out |= (u8[:, j] << (bits * j)).astype(np.uint8)
            return torch.from_numpy(out)
        bitmat = np.unpackbits(u.astype(np.uint8)[:, None], axis=1, count=bits, bitorder="little")  # (N, bits)
    else:
        b2 = u.astype("<u2").view(np.uint8).reshape(-1, 2)  # (N,) -> (N, 2) little-endian bytes
        bitmat = np.unpackbits(b2, axis=1, bitorder="little")[:, :bits]  # (N, 16) -> (N, bits)
    return torch.from_numpy(np.packbits(bitmat.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: integer codes (``int32``) of ``shape``."""
    bits = spec.bits
    n = int(math.prod(shape))
    if bits == 8:
        return packed.to(torch.int32).reshape(shape)
    p = packed.cpu().numpy()
    if bits < 8 and 8 % bits == 0:
        per = 8 // bits
        mask = (1 << bits) - 1
        u = np.stack([(p >> (bits * j)) & mask for j in range(per)], axis=1).reshape(-1)[:n]  # (B,) -> (B*per,)
    else:
        bitmat = np.unpackbits(p, count=n * bits, bitorder="little").reshape(n, bits)  # (N, bits)
        weights = (1 << np.arange(bits, dtype=np.int64))
        u = bitmat.astype(np.int64) @ weights
    q = torch.from_numpy(np.ascontiguousarray(u).astype(np.int32)) + spec.qmin
    return q.reshape(shape).to(packed.device)


def _zp_dtype(spec: QuantSpec) -> torch.dtype:
    if spec.qmin >= 0 and spec.qmax <= 255:
        return torch.uint8
    if spec.qmin >= -128 and spec.qmax <= 127:
        return torch.int8
    if spec.qmin >= -(2**15) and spec.qmax < 2**15:
        return torch.int16
    return torch.int32


def _group_args(spec: QuantSpec) -> tuple[Optional[int], Optional[int]]:
    """``(axis, group_size)`` as the fake-quant op takes them."""
    if spec.granularity is Granularity.PER_CHANNEL:
        return spec.axis, None
    if spec.granularity is Granularity.PER_GROUP:
        return None, spec.group_size
    return None, None


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The integer codes the fake-quant op computes for ``w``: ``clamp(rnd(w * (1/s)) + z, qmin, qmax)``,
    float32 math exactly as :mod:`qat.kernels.reference` does it; returned as ``int32``, shaped like ``w``."""
    axis, group = _group_args(spec)
    w32 = w.detach().contiguous().float()
    wg = w32 if group is None else w32.reshape(*w32.shape[:-1], w32.shape[-1] // group, group)  # (.., K) -> (.., K/g, g)
    s = broadcast_param(scale.float(), w32, axis, group)
    z = broadcast_param(zero_point.float(), w32, axis, group)
    q = torch.clamp(round_with_mode(wg * (1.0 / s), spec.round_mode.value) + z, spec.qmin, spec.qmax)
    return q.reshape(w.shape).to(torch.int32)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """``(q - z) * s`` in float32, the fake-quant op's output for the codes ``q``."""
    axis, group = _group_args(spec)
    qf = q.float()
    qg = qf if group is None else qf.reshape(*qf.shape[:-1], qf.shape[-1] // group, group)  # (.., K) -> (.., K/g, g)
    s = broadcast_param(scale.float(), qf, axis, group)
    z = torch.zeros_like(s) if zero_point is None else broadcast_param(zero_point.float(), qf, axis, group)
    return ((qg - z) * s).reshape(q.shape)


# ----------------------------------------------------------------------------- integer layers


class IntModuleMixin:
    """Shared state and math of the integer layers (see the module docstring for the layout).

    Attributes:
        weight_spec / input_spec: the :class:`~qat.QuantSpec` of the weight / input (``None``: float).
        weight_shape: the float weight's shape; ``view_shape`` the shape the codes are laid out in
            (``(O, I*k)`` for per-group conv weights, else ``weight_shape``).
    """

    _FLOAT: type[nn.Module]
    _FLOAT_ATTRS: tuple[str, ...] = ()

    # -------------------------------------------------------------- construction
    def _init_int(self, float_mod: nn.Module, info: dict[str, Any]) -> None:
        nn.Module.__init__(self)
        for a in self._FLOAT_ATTRS:
            setattr(self, a, copy.copy(getattr(float_mod, a)))
        self.weight_spec = None if info.get("weight") is None else QuantSpec.from_dict(info["weight"])
        self.input_spec = None if info.get("input") is None else QuantSpec.from_dict(info["input"])
        self.weight_shape = tuple(float_mod.weight.shape)
        ws = self.weight_spec
        if ws is not None and ws.granularity is Granularity.PER_GROUP and len(self.weight_shape) > 2:
            self.view_shape = (self.weight_shape[0], int(math.prod(self.weight_shape[1:])))  # (O, I, *k) -> (O, I*k)
        else:
            self.view_shape = self.weight_shape
        dev = float_mod.weight.device
        if info.get("input_smooth"):
            if self._FLOAT is not nn.Linear:
                raise QATConfigError(f"{type(self).__name__}: input smoothing is defined for Linear layers only")
            sm = getattr(float_mod, "input_smooth", None)  # a QuantLinear's; a float skeleton gets ones (load fills them)
            sm = torch.ones(self.weight_shape[1]) if sm is None else sm.detach().float().clone()
            self.register_buffer("input_smooth", sm.to(dev))
        else:
            self.input_smooth = None
        if ws is None:
            w = float_mod.weight.detach()
            if getattr(float_mod, "input_smooth", None) is not None and self.input_smooth is not None:
                w = w * self.input_smooth  # the layer divides its input by s: the float weight carries s
            self.weight = nn.Parameter(w.clone(), requires_grad=False)
        else:
            n = int(math.prod(self.view_shape))
            qshape = self.view_shape if ws.bits == 8 else (packed_numel(n, ws.bits),)
            qdtype = (torch.int8 if ws.signed else torch.uint8) if ws.bits == 8 else torch.uint8
            self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype, device=dev))
            pshape = tuple(info["weight_scale_shape"])
            sdtype = torch.float16 if info.get("weight_scale_dtype") == "float16" else torch.float32
            self.register_buffer("weight_scale", torch.ones(pshape, dtype=sdtype, device=dev))
            if info.get("weight_zero_point", False):
                self.register_buffer("weight_zero_point", torch.zeros(pshape, dtype=_zp_dtype(ws), device=dev))
            else:
                self.weight_zero_point = None
        bias = getattr(float_mod, "bias", None)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        elif "bias" in getattr(float_mod, "_parameters", {}):
            self.register_parameter("bias", None)
        if self.input_spec is not None and not self.input_spec.dynamic:
            ishape = tuple(info["input_scale_shape"])
            self.register_buffer("input_scale", torch.ones(ishape, device=dev))
            self.register_buffer("input_zero_point", torch.zeros(ishape, device=dev))
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None

    @classmethod
    def from_float(cls, float_mod: nn.Module, info: dict[str, Any]) -> "IntModuleMixin":
        """An empty integer layer shaped for ``float_mod`` and the layer record ``info`` (as
        :meth:`layer_info` writes it); fill it with ``load_state_dict``.

        Raises:
            QATConfigError: ``float_mod`` is not the float type this layer replaces.
        """
        if not isinstance(float_mod, cls._FLOAT):
            raise QATConfigError(f"{cls.__name__} replaces an {cls._FLOAT.__name__}, got {type(float_mod).__name__}")
        mod = cls.__new__(cls)
        mod._init_int(float_mod, info)
        return mod

    def layer_info(self) -> dict[str, Any]:
        """A JSON-able record of this layer's quantization: enough to rebuild it from the float layer."""
        info: dict[str, Any] = {
            "type": self._FLOAT.__name__,
            "weight": None if self.weight_spec is None else self.weight_spec.to_dict(),
            "input": None if self.input_spec is None else self.input_spec.to_dict(),
            "weight_shape": list(self.weight_shape),
        }
        if self.weight_spec is not None:
            info["weight_scale_shape"] = list(self.weight_scale.shape)
            info["weight_scale_dtype"] = "float16" if self.weight_scale.dtype == torch.float16 else "float32"
            info["weight_zero_point"] = self.weight_zero_point is not None
        if self.input_spec is not None and not self.input_spec.dynamic:
            info["input_scale_shape"] = list(self.input_scale.shape)
        if self.input_smooth is not None:
            info["input_smooth"] = True
        return info

    # -------------------------------------------------------------- math
    def codes(self) -> torch.Tensor:
        """The integer weight codes (``int32``), in ``view_shape``."""
        return unpack_codes(self.qweight, self.weight_spec, self.view_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """``(q - z) * s`` (float32, ``weight_shape``): the fake-quantized weight, bit for bit. Cached
        until the integer state changes."""
        if self.weight_spec is None:
            return self.weight
        zp = self.weight_zero_point
        key = (self.qweight.data_ptr(), self.qweight._version, self.weight_scale._version, None if zp is None else zp._version)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            w = _dequantize(self.codes(), self.weight_scale, zp, self.weight_spec).reshape(self.weight_shape)
        self._cache = (key, w)
        return w

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize the input as the fake-quantized layer did (static or dynamic range)."""
        spec = self.input_spec
        if spec is None:
            return x
        rm = spec.round_mode.value
        if spec.dynamic:
            mn, mx = reduce_minmax(x, spec)
            s, z = qparams_from_range(mn, mx, spec)
            if spec.granularity is Granularity.PER_TOKEN:
                return fake_quantize(x, s, z, spec.qmin, spec.qmax, None, x.shape[-1], rm)
            axis, group = _group_args(spec)
            return fake_quantize(x, s, z, spec.qmin, spec.qmax, axis, group, rm)
        axis, group = _group_args(spec)
        return fake_quantize(x, self.input_scale, self.input_zero_point, spec.qmin, spec.qmax, axis, group, rm)

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        w = "float" if self.weight_spec is None else f"int{self.weight_spec.bits}"
        a = "float" if self.input_spec is None else f"{self.input_spec.bits}b qdq"
        return f"{tuple(self.weight_shape)}, W {w}, A {a}"


class IntLinear(IntModuleMixin, nn.Module):
    """``nn.Linear`` with integer weights (see :class:`IntModuleMixin`)."""

    _FLOAT = nn.Linear
    _FLOAT_ATTRS = ("in_features", "out_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_smooth is not None:  # (x / s) meets the codes of W * s (qat.smooth_inputs)
            x = x / self.input_smooth
        return F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)


_CONV_ATTRS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
    "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
)


class IntConv1d(IntModuleMixin, nn.Module):
    """``nn.Conv1d`` with integer weights."""

    _FLOAT = nn.Conv1d
    _FLOAT_ATTRS = _CONV_ATTRS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv1d._conv_forward(self, self.quantize_input(x), self.dequantized_weight(), self.bias)


class IntConv2d(IntModuleMixin, nn.Module):
    """``nn.Conv2d`` with integer weights."""

    _FLOAT = nn.Conv2d
    _FLOAT_ATTRS = _CONV_ATTRS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv2d._conv_forward(self, self.quantize_input(x), self.dequantized_weight(), self.bias)


class IntEmbedding(IntModuleMixin, nn.Module):
    """``nn.Embedding`` with an integer table."""

    _FLOAT = nn.Embedding
    _FLOAT_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.dequantized_weight(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


#: fake-quantized type -> integer layer; the one dispatch table of :func:`convert`.
INT_MODULES: dict[type[nn.Module], type[IntModuleMixin]] = {
    QuantLinear: IntLinear,
    QuantConv1d: IntConv1d,
    QuantConv2d: IntConv2d,
    QuantEmbedding: IntEmbedding,
}


# ----------------------------------------------------------------------------- convert


def _stored_scale(s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """float16 where the spec asks for it and the values survive the round trip exactly."""
    s = s.detach().float()
    if spec.scale_dtype is ScaleDtype.FLOAT16:
        h = s.half()
        if torch.isfinite(h).all() and torch.equal(h.float(), s):
            return h
    return s.clone()


@torch.no_grad()
def _convert_layer(name: str, mod: QuantModuleMixin) -> IntModuleMixin:
    cls = INT_MODULES[type(mod)]
    wq = mod.weight_quantizer if mod.weight_quantizer is not None and bool(mod.weight_quantizer.fake_quant_enabled) else None
    iq = mod.input_quantizer if mod.input_quantizer is not None and bool(mod.input_quantizer.fake_quant_enabled) else None
    info: dict[str, Any] = {"weight": None, "input": None}
    if getattr(mod, "input_smooth", None) is not None:
        info["input_smooth"] = True
    if wq is not None:
        try:
            mod.quantized_weight()  # refresh the scale exactly as the next forward would (observers track the weight)
        except RuntimeError as exc:
            raise QATConfigError(f"layer {name!r}: weight quantizer has no range: {exc}") from None
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
        info["input"] = spec.to_dict()
        if not spec.dynamic:
            info["input_scale_shape"] = list(iq.current_qparams()[0].shape)
    out = cls.from_float(mod, info)
    if wq is not None:
        w = mod.weight if mod.input_smooth is None else mod.weight * mod.input_smooth
        w = w if not (wq.spec.granularity is Granularity.PER_GROUP and w.dim() > 2) else w.flatten(1)
        q = quantize_codes(w, s, z, wq.spec)
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
            type convert has no integer twin for, or an input quantizer that never saw data.

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
    if any(type(m).__name__ == "QuantConvBn2d" for m in model.modules()):
        from .bn_fold import fold_bn  # only models trained with fold_bn=True hold these

        model = fold_bn(model, inplace=True)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModuleMixin)]
    for name, mod in layers:
        if type(mod) not in INT_MODULES:
            raise QATConfigError(
                f"layer {name!r}: convert() has no integer layer for {type(mod).__name__}; "
                f"supported types: {sorted(t.__name__ for t in INT_MODULES)}"
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
