"""Integer inference layers: :class:`IntLinear`, :class:`IntConv1d`, :class:`IntConv2d` and
:class:`IntEmbedding`, made by :func:`qat.convert` from the fake-quantized layers. Their state is

* ``qweight``: the integer codes the fake quantizer produced, ``q = clamp(rnd(w / s) + z, qmin, qmax)``,
  bit-packed as :mod:`qat.export.packing` lays them out (8-bit codes one a byte, 4-bit two a byte, ...).
* ``weight_scale``: float16 when the spec asks for float16 scales (GGUF) and the trained values are
  float16 exactly, else float32; shaped like the fake quantizer's scale.
* ``weight_zero_point``: only for affine (``symmetric: false``) or LSQ+ specs, in the smallest integer
  dtype that holds ``[qmin, qmax]``; symmetric specs have ``z = 0`` and store none.
* ``input_scale`` / ``input_zero_point``: the input activation's float32 quantization parameters; the
  converted layer still quantize-dequantizes its input, so it computes what the fake-quantized layer
  computed. Dynamic specs recompute them from each batch, as in training.

The dequantized weight ``(q - z) * s`` (float32) equals the fake-quantized weight bit for bit, so a
converted float32 model gives the very outputs of the fake-quantized one (tested with ``atol=0``).
Cast to float16 / bfloat16 (``.half()``, ``.to(dtype)``), the layers keep their scales and zero
points as they are and compute in the input's dtype, as the fake-quantized layers do.
:meth:`IntModuleMixin.nonfinite_state` names the quantization tensors that hold NaN / Inf (what
``qat.export.save_packed`` and ``export_onnx`` refuse).

Example::

    >>> import torch, torch.nn as nn
    >>> from qat import convert, prepare
    >>> plan = {"rules": [{"match": "*", "weight": {"bits": 4, "granularity": "per_group", "group_size": 27}}]}
    >>> model = prepare(nn.Sequential(nn.Conv2d(3, 8, 3)), plan)
    >>> x = torch.randn(2, 3, 8, 8); _ = model(x)
    >>> conv = convert(model.eval())[0]
    >>> type(conv).__name__, conv.view_shape, tuple(conv.dequantized_weight().shape)   # groups along I*k*k
    ('IntConv2d', (8, 27), (8, 3, 3, 3))
    >>> torch.equal(conv(x), model(x))
    True
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from qat.kernels import fake_quantize

from .errors import QATConfigError
from .export.packing import packed_numel, unpack_codes
from .fake_quant import fake_quantize_dynamic
from .granularity import Layout, dequantize, weight_view_shape
from .spec import QuantSpec

__all__ = ["IntModuleMixin", "IntLinear", "IntConv1d", "IntConv2d", "IntEmbedding", "zero_point_dtype", "check_int_state_finite"]


def zero_point_dtype(spec: QuantSpec) -> torch.dtype:
    """The smallest integer dtype that holds ``[qmin, qmax]`` (a stored zero point's)."""
    if spec.qmin >= 0 and spec.qmax <= 255:
        return torch.uint8
    if spec.qmin >= -128 and spec.qmax <= 127:
        return torch.int8
    if spec.qmin >= -(2**15) and spec.qmax < 2**15:
        return torch.int16
    return torch.int32


def check_int_state_finite(model: nn.Module, what: str) -> None:
    """Raise a :class:`~qat.QATConfigError` naming every integer layer of ``model`` whose scales,
    zero points or smoothing factors hold NaN / Inf (``what`` names the caller in the message).

    Example::

        >>> import torch.nn as nn
        >>> from qat import convert, prepare
        >>> m = prepare(nn.Sequential(nn.Linear(4, 2)), "w8a8"); _ = m(torch.randn(3, 4))
        >>> c = convert(m); check_int_state_finite(c, "save_packed()")
        >>> _ = c[0].weight_scale.fill_(float("inf")); check_int_state_finite(c, "save_packed()")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: save_packed() refuses a model whose quantization state is not finite (NaN or Inf): layer '0': weight_scale; convert a healthy model (qat.fake_quant.nonfinite_quantizers lists the bad quantizers)
    """
    bad = {}
    for name, mod in model.named_modules():
        if isinstance(mod, IntModuleMixin):
            names = mod.nonfinite_state()
            if names:
                bad[name] = names
    if bad:
        where = "; ".join(f"layer {n!r}: {', '.join(v)}" for n, v in bad.items())
        raise QATConfigError(
            f"{what} refuses a model whose quantization state is not finite (NaN or Inf): {where}; "
            "convert a healthy model (qat.fake_quant.nonfinite_quantizers lists the bad quantizers)"
        )


class IntModuleMixin:
    """Shared state and math of the integer layers (see the module docstring for the layout).

    Attributes:
        weight_spec / input_spec: the :class:`~qat.QuantSpec` of the weight / input (``None``: float).
        weight_shape: the float weight's shape; ``view_shape`` the shape the codes are laid out in
            (``(O, I*k)`` for per-group conv weights, else ``weight_shape``).
    """

    _FLOAT: type[nn.Module]
    _FLOAT_ATTRS: tuple[str, ...] = ()
    #: quantization tensors that keep their dtype when the layer is cast (scales are stored as the
    #: format asks: float32, or float16 for GGUF; integer tensors never change anyway)
    _KEEP_DTYPE = ("weight_scale", "input_scale", "input_zero_point")
    #: the float tensors that must be finite for the layer to mean anything
    _QUANT_STATE = ("weight_scale", "input_scale", "input_zero_point", "input_smooth")

    # -------------------------------------------------------------- construction
    def _init_int(self, float_mod: nn.Module, info: dict[str, Any]) -> None:
        nn.Module.__init__(self)
        for a in self._FLOAT_ATTRS:
            setattr(self, a, copy.copy(getattr(float_mod, a)))
        self.weight_spec = None if info.get("weight") is None else QuantSpec.from_dict(info["weight"])
        self.input_spec = None if info.get("input") is None else QuantSpec.from_dict(info["input"])
        self.weight_shape = tuple(float_mod.weight.shape)
        ws = self.weight_spec
        self.view_shape = self.weight_shape if ws is None else weight_view_shape(self.weight_shape, ws)
        dev = float_mod.weight.device
        self._dtype = float_mod.weight.dtype if float_mod.weight.is_floating_point() else torch.float32
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
                self.register_buffer("weight_zero_point", torch.zeros(pshape, dtype=zero_point_dtype(ws), device=dev))
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
            w = dequantize(self.codes(), self.weight_scale, zp, self.weight_spec).reshape(self.weight_shape)
        self._cache = (key, w)
        return w

    def compute_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """:meth:`dequantized_weight` in ``dtype`` (default: the layer's float dtype), as the
        fake-quantized layer casts its weight back; the float32 tensor itself in float32."""
        w = self.dequantized_weight()
        dtype = getattr(self, "_dtype", torch.float32) if dtype is None else dtype
        return w if w.dtype == dtype else w.to(dtype)

    def nonfinite_state(self) -> list[str]:
        """Names of this layer's quantization tensors (scales, zero points, smoothing factors) that
        hold a NaN or Inf; empty when all are finite. One device sync.

        Example::

            >>> import torch.nn as nn
            >>> from qat import convert, prepare
            >>> m = prepare(nn.Sequential(nn.Linear(4, 2)), "w8a8"); _ = m(torch.randn(3, 4))
            >>> layer = convert(m)[0]
            >>> layer.nonfinite_state()
            []
            >>> _ = layer.input_scale.fill_(float("nan")); layer.nonfinite_state()
            ['input_scale']
        """
        tensors = {n: t for n in self._QUANT_STATE if isinstance(t := getattr(self, n, None), torch.Tensor)}
        if not tensors:
            return []
        ok = torch.stack([torch.isfinite(t.detach()).all() for t in tensors.values()]).tolist()
        return [n for n, good in zip(tensors, ok) if not good]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize the input as the fake-quantized layer did (static or dynamic range)."""
        spec = self.input_spec
        if spec is None:
            return x
        if spec.dynamic:
            return fake_quantize_dynamic(x, spec)
        axis, group = Layout.of(spec).op_args(x)
        return fake_quantize(x, self.input_scale, self.input_zero_point, spec.qmin, spec.qmax, axis, group, spec.round_mode.value)

    def _apply(self, fn, recurse=True):
        self._cache = None
        keep = {id(b) for n, b in self._buffers.items() if n in self._KEEP_DTYPE and b is not None}

        def keep_dtype(t):
            out = fn(t)
            if id(t) in keep and isinstance(out, torch.Tensor) and out.dtype != t.dtype:
                return out.to(t.dtype)  # scales and zero points stay as stored; devices move
            return out

        probe = fn(torch.empty(0, dtype=getattr(self, "_dtype", torch.float32)))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self._dtype = probe.dtype  # the dtype the layer now computes in
        return super()._apply(keep_dtype, recurse)

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
        return F.linear(self.quantize_input(x), self.compute_weight(x.dtype), self.bias)


_CONV_ATTRS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
    "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
)


class IntConv1d(IntModuleMixin, nn.Module):
    """``nn.Conv1d`` with integer weights."""

    _FLOAT = nn.Conv1d
    _FLOAT_ATTRS = _CONV_ATTRS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv1d._conv_forward(self, self.quantize_input(x), self.compute_weight(x.dtype), self.bias)


class IntConv2d(IntModuleMixin, nn.Module):
    """``nn.Conv2d`` with integer weights."""

    _FLOAT = nn.Conv2d
    _FLOAT_ATTRS = _CONV_ATTRS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv2d._conv_forward(self, self.quantize_input(x), self.compute_weight(x.dtype), self.bias)


class IntEmbedding(IntModuleMixin, nn.Module):
    """``nn.Embedding`` with an integer table."""

    _FLOAT = nn.Embedding
    _FLOAT_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.compute_weight(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
