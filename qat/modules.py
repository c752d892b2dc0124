"""Fake-quantized twins of ``nn.Linear``, ``nn.Conv1d/2d`` and ``nn.Embedding``.

Each subclasses its float layer (so ``isinstance`` checks, hooks and ``state_dict`` keys for
``weight`` / ``bias`` stay the same), adds ``weight_quantizer`` and ``input_quantizer``
(:class:`~qat.FakeQuantizer` or ``None``), and shares its parameters with the float layer it came
from, so an optimizer built afterwards trains the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from qat.kernels import IDENTITY

from .fake_quant import FakeQuantizer
from .granularity import weight_view, weight_view_shape
from .int_modules import IntConv1d, IntConv2d, IntEmbedding, IntLinear, IntModuleMixin
from .kquant_quantizer import weight_quantizer_class
from .spec import LayerQuant, QuantSpec

__all__ = ["set_fused_linear", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantModuleMixin", "LayerType", "LAYER_TYPES", "layer_type"]


def _autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast casts ``t`` to before a matmul or convolution on ``t``'s device (None where
    autocast is off or leaves ``t`` as it is: float64, or already that dtype)."""
    device = t.device.type
    if t.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == t.dtype else dtype


_FUSED_LINEAR = True


def set_fused_linear(enabled: bool) -> bool:
    """Whether :class:`QuantLinear` runs as one autograd node in eager mode (default ``True``; the
    values are the same either way, bit for bit); returns the previous setting. ``False`` gives the
    three-node graph (input quantizer, weight quantizer, linear), which
    ``benchmarks/train_step.py --rows ste_unfused`` times against the fused node.

    Example::

        >>> previous = set_fused_linear(False)
        >>> set_fused_linear(previous)
        False
    """
    global _FUSED_LINEAR
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fused_linear: enabled must be a bool, got {enabled!r}")
    previous, _FUSED_LINEAR = _FUSED_LINEAR, enabled
    return previous


def _fusable(q: Optional[FakeQuantizer]) -> bool:
    """Whether a layer may run ``q`` inside its fused node: no hooks would miss a call of it."""
    return q is None or not (q._forward_hooks or q._forward_pre_hooks)


def _eager(x: torch.Tensor) -> bool:
    """Whether this call runs eagerly: no torch.compile / export / JIT trace, no functorch transform,
    no meta tensor (where the layer keeps its unfused form, which every tracer takes)."""
    return not (
        torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing() or x.is_meta
        or torch._C._are_functorch_transforms_active()
    )


class _QuantLinearFn(torch.autograd.Function):
    """``F.linear`` of the fake-quantized input and weight as one autograd node, in eager mode.

    The forward runs both quantizers' bound ops (:meth:`qat.FakeQuantizer.bind`) and the matmul;
    the backward the matmul's gradients (as autograd computes them for ``addmm``: ``grad @ W`` and
    ``grad.T @ x``, the bias's ``grad.sum(0)`` in the matmul's dtype) and then each bound op's own
    backward, given those products as its own (``owned``: a clipped STE in the product's dtype zeroes
    the clipped elements in place rather than copying the gradient). The values are those of the three-node graph (quantizer, quantizer, linear), bit for
    bit; the host pays for one node instead of three, the step's largest fixed cost per layer on a
    GPU (``benchmarks/results/train_step_*.md``, eager rows).
    """

    @staticmethod
    def forward(ctx, x, w, bias, bx, bw, x_out, w_out, *learned):
        xq, sx = bx.forward(x, x_out)
        wq, sw = bw.forward(w, w_out)
        y = F.linear(xq, wq, bias)  # under the caller's autocast, which casts the bias as it would
        ctx.bound = (bx, bw, len(sx), len(bx.learned))
        ctx.dtypes = (x.dtype, w.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(xq, wq, *sx, *sw)
        return y

    @staticmethod
    def backward(ctx, gy):
        xq, wq, *saved = ctx.saved_tensors
        bx, bw, nsx, nlx = ctx.bound
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        g2 = gy.reshape(-1, gy.shape[-1])
        dx = dw = db = None
        dlx, dlw = (None,) * nlx, (None,) * len(bw.learned)
        if need[0] or any(need[7 : 7 + nlx]):
            dx, *dlx = bx.backward((g2 @ wq).view(xq.shape), tuple(saved[:nsx]), x_dtype, owned=True)
        if need[1] or any(need[7 + nlx :]):
            dw, *dlw = bw.backward(g2.t() @ xq.reshape(-1, xq.shape[-1]), tuple(saved[nsx:]), w_dtype, owned=True)
        if need[2]:
            db = g2.sum(0).to(b_dtype)
        return dx, dw, db, None, None, None, None, *dlx, *dlw


def _run(q: FakeQuantizer, t: torch.Tensor, out_dtype: Optional[torch.dtype], owned: bool = False) -> torch.Tensor:
    # owned: the result feeds only this layer's matmul / convolution, whose gradient is a fresh
    # tensor: in a traced graph the quantizer's bound op may write its gradient in place
    # (BoundQuant.apply's owned_grad); a quantizer with hooks runs as a module, as in eager mode
    if owned and not _eager(t) and _fusable(q) and not (_global_forward_hooks or _global_forward_pre_hooks):
        b = q.bind(t)
        if b is not None:
            return b.apply(t, out_dtype, owned_grad=True)
    # a quantizer with forward hooks (telemetry) keeps t's dtype, so they see the quantization alone
    # and not autocast's rounding as well
    return q(t) if out_dtype is None or q._forward_hooks else q(t, out_dtype)


class QuantModuleMixin:
    """Shared machinery: building quantizers from a :class:`LayerQuant`, weight fake-quant.

    Under autocast, the quantizers of a linear or convolution write their results in the dtype the
    layer computes in (``bfloat16`` for a float32 input and weight under ``bf16-mixed``): the value
    autocast's cast would give, in the fake-quant pass itself, and the gradient back in float32 in the
    backward pass, so neither cast costs a pass over the tensor of its own."""

    _FLOAT: type[nn.Module]
    layer_quant: LayerQuant

    def _build_quantizers(self, lq: LayerQuant, input_shape: Optional[tuple[int, ...]]) -> None:
        self.layer_quant = lq
        # per-input-channel smoothing factors s (set by qat.smooth_inputs): x / s meets s * W
        self.register_parameter("input_smooth", None)
        self._qat_weight_shape = tuple(self.weight.shape)  # what the weight quantizer was built for
        self.weight_quantizer = None if lq.weight is None else weight_quantizer_class(lq.weight)(
            lq.weight, weight_view_shape(self.weight.shape, lq.weight), track_history=False
        )
        self.input_quantizer = (
            None if lq.input is None or input_shape is None else FakeQuantizer(lq.input, input_shape, sync=True)
        )

    def latent_weight(self, detach_smooth: bool = False) -> torch.Tensor:
        """The float weight the weight quantizer sees, in the quantizer's view
        (:func:`qat.granularity.weight_view`): ``weight``, its input channels multiplied by
        ``input_smooth`` when the layer is smoothed (detached with ``detach_smooth``)."""
        w = self.weight
        if self.input_smooth is not None:
            w = w * (self.input_smooth.detach() if detach_smooth else self.input_smooth)
        return w if self.weight_quantizer is None else weight_view(w, self.weight_quantizer.spec)

    @torch.no_grad()
    def init_weight_quantizer(self) -> bool:
        """Initialize the weight quantizer from the current weight now, where it is not yet
        (:meth:`FakeQuantizer.init_from`), rather than at the first forward pass; returns whether it
        holds a range. A weight that is not a whole, materialized tensor of the shape the quantizer
        was built for (meta, or sharded by FSDP) is left to the first forward pass."""
        wq = self.weight_quantizer
        if wq is None:
            return False
        if not wq.is_initialized:
            w = self.weight
            if w.is_meta or type(w.data) is not torch.Tensor or tuple(w.shape) != self._qat_weight_shape:
                return False
            wq.init_from(self.latent_weight())
        return wq.is_initialized

    def quantized_weight(self, out_dtype: Optional[torch.dtype] = None, *, _owned: bool = False) -> torch.Tensor:
        """The weight as the forward pass sees it (fake-quantized when a weight spec is set; its
        input channels multiplied by ``input_smooth`` first when the layer is smoothed), in
        ``out_dtype`` when given (:meth:`FakeQuantizer.forward`)."""
        w = self.latent_weight()
        if self.weight_quantizer is None:
            return w
        y = _run(self.weight_quantizer, w, out_dtype, _owned)
        return y if y.dim() == self.weight.dim() else y.view_as(self.weight)  # (O, I*k) -> (O, I, *k)

    def quantize_input(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None, *, _owned: bool = False) -> torch.Tensor:
        """The input as the layer computes with it: divided by ``input_smooth`` when smoothed, then
        fake-quantized (in ``out_dtype`` when given)."""
        if self.input_smooth is not None:
            x = x / self.input_smooth
        return x if self.input_quantizer is None else _run(self.input_quantizer, x, out_dtype, _owned)

    def autocast_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, weight)`` as the matmul / convolution takes them: fake-quantized, and in
        autocast's dtype where autocast would cast them (written so by the quantizers). The caller
        feeds them to its matmul / convolution alone (their gradients are the caller's own)."""
        return (self.quantize_input(x, _autocast_dtype(x), _owned=True),
                self.quantized_weight(_autocast_dtype(self.weight), _owned=True))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint of a smoothed layer (qat.smooth_inputs) holds input_smooth: make room for it
        key = prefix + "input_smooth"
        if self.input_smooth is None and key in state_dict:
            self.input_smooth = nn.Parameter(torch.ones_like(state_dict[key], device=self.weight.device), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def quantizers(self):
        """``(name, FakeQuantizer)`` pairs of this layer: ``weight`` and / or ``input``."""
        for name in ("weight", "input"):
            q = getattr(self, f"{name}_quantizer")
            if q is not None:
                yield name, q

    def to_float(self) -> nn.Module:
        """The float layer (same parameter tensors, no quantizers, no smoothing)."""
        float_mod = self._FLOAT.__new__(self._FLOAT)
        nn.Module.__init__(float_mod)
        for k, v in self.__dict__.items():
            if k not in ("_modules", "layer_quant", "_parameters", "_buffers", "weight_quantizer", "input_quantizer"):
                float_mod.__dict__[k] = v
        # (s * W)(x / s) is W x: the float layer drops the smoothing and keeps W
        float_mod._parameters = {k: v for k, v in self._parameters.items() if k != "input_smooth"}
        float_mod._buffers = dict(self._buffers)
        float_mod._modules = {k: m for k, m in self._modules.items() if k not in ("weight_quantizer", "input_quantizer")}
        return float_mod

    @classmethod
    def _adopt(cls, float_mod: nn.Module, lq: LayerQuant, input_shape) -> "QuantModuleMixin":
        if type(float_mod) is not cls._FLOAT:
            raise TypeError(f"{cls.__name__}.from_float expects an {cls._FLOAT.__name__}, got {type(float_mod).__name__}")
        mod = cls.__new__(cls)
        mod.__dict__.update({k: v for k, v in float_mod.__dict__.items()})
        mod._parameters = dict(float_mod._parameters)
        mod._buffers = dict(float_mod._buffers)
        mod._modules = dict(float_mod._modules)
        # quantizer state lives on the weight's device
        mod._build_quantizers(lq, input_shape)
        mod.to(float_mod.weight.device)
        if mod.weight_quantizer is not None and mod.weight_quantizer.tracks_current_weight:
            # its range now, from the weight (every forward pass sets it again): a compiled graph then
            # branches on no first observation (one graph from the first step, no flag writes a step)
            mod.init_weight_quantizer()
        return mod

    def extra_repr(self) -> str:
        base = super().extra_repr()
        lq = self.layer_quant
        w = "float" if lq.weight is None else f"{lq.weight.bits}b"
        a = "float" if lq.input is None else f"{lq.input.bits}b"
        return f"{base}, W{w} A{a}"


class QuantLinear(QuantModuleMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input.

    Example::

        >>> from qat import LayerQuant
        >>> lin = QuantLinear.from_float(nn.Linear(8, 4), LayerQuant(QuantSpec(bits=4), QuantSpec(bits=8)))
        >>> lin(torch.randn(2, 8)).shape
        torch.Size([2, 4])
        >>> type(lin.to_float()).__name__
        'Linear'
    """

    _FLOAT = nn.Linear

    @classmethod
    def from_float(cls, mod: nn.Linear, lq: LayerQuant) -> "QuantLinear":
        return cls._adopt(mod, lq, (mod.in_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        iq, wq = self.input_quantizer, self.weight_quantizer
        if (
            _FUSED_LINEAR and _eager(x) and self.input_smooth is None and (iq is not None or wq is not None)
            and _fusable(iq) and _fusable(wq) and not (_global_forward_hooks or _global_forward_pre_hooks)
        ):
            return self._fused(x, iq, wq)
        return F.linear(*self.autocast_inputs(x), self.bias)

    def _fused(self, x: torch.Tensor, iq: Optional[FakeQuantizer], wq: Optional[FakeQuantizer]) -> torch.Tensor:
        """The forward as one autograd node (:class:`_QuantLinearFn`); a quantizer whose op does not
        bind (:meth:`qat.FakeQuantizer.bind` gives ``None``) runs as its own module first."""
        x_out, w = _autocast_dtype(x), self.weight
        w_out = _autocast_dtype(w)
        bx = IDENTITY if iq is None else iq.bind(x)
        if bx is None:
            x, bx, x_out = _run(iq, x, x_out), IDENTITY, None
        bw = IDENTITY if wq is None else wq.bind(w)
        if bw is None:
            w, bw, w_out = self.quantized_weight(w_out), IDENTITY, None
        return _QuantLinearFn.apply(x, w, self.bias, bx, bw, x_out, w_out, *bx.learned, *bw.learned)


class _QuantConvNd(QuantModuleMixin):
    @classmethod
    def from_float(cls, mod, lq: LayerQuant):
        # activation scales are per tensor or per channel (axis 1): one sample's shape with C first
        return cls._adopt(mod, lq, (1, mod.in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(*self.autocast_inputs(x), self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input (see :class:`QuantLinear`)."""

    _FLOAT = nn.Conv1d


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input.

    Example::

        >>> from qat import LayerQuant
        >>> conv = QuantConv2d.from_float(nn.Conv2d(3, 8, 3), LayerQuant(QuantSpec(bits=4, granularity="per_channel")))
        >>> conv(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 8, 6, 6])
    """

    _FLOAT = nn.Conv2d


class QuantEmbedding(QuantModuleMixin, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (its integer input is not quantized).

    Example::

        >>> from qat import LayerQuant
        >>> spec = QuantSpec(bits=4, granularity="per_group", group_size=8)
        >>> emb = QuantEmbedding.from_float(nn.Embedding(10, 16), LayerQuant(spec))
        >>> emb(torch.tensor([1, 2])).shape
        torch.Size([2, 16])
    """

    _FLOAT = nn.Embedding

    @classmethod
    def from_float(cls, mod: nn.Embedding, lq: LayerQuant) -> "QuantEmbedding":
        return cls._adopt(mod, LayerQuant(lq.weight, None), None)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            idx, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


@dataclass(frozen=True)
class LayerType:
    """One module type the product quantizes: its float layer, fake-quantized twin and integer layer.

    Attributes:
        name: the name plan rules use in ``types`` (``"Linear"``, ...).
        float: the float ``nn.Module`` type :func:`qat.prepare` replaces.
        quant: its fake-quantized twin (training).
        int: its integer layer (:func:`qat.convert`, packed checkpoints).
        quantizes_input: whether the layer's input can be quantized (not an embedding's indices).
    """

    name: str
    float: type[nn.Module]
    quant: type[QuantModuleMixin]
    int: type[IntModuleMixin]
    quantizes_input: bool = True


#: The one table of module types: float -> fake-quantized -> integer. Every dispatch on a module type
#: (plan rules, prepare, convert, packed loading) reads it.
LAYER_TYPES: tuple[LayerType, ...] = (
    LayerType("Linear", nn.Linear, QuantLinear, IntLinear),
    LayerType("Conv1d", nn.Conv1d, QuantConv1d, IntConv1d),
    LayerType("Conv2d", nn.Conv2d, QuantConv2d, IntConv2d),
    LayerType("Embedding", nn.Embedding, QuantEmbedding, IntEmbedding, quantizes_input=False),
)


def layer_type(module: nn.Module) -> Optional[LayerType]:
    """The :class:`LayerType` whose float, fake-quantized or integer layer ``module`` exactly is
    (``None`` for any other module; subclasses do not match).

    Example::

        >>> layer_type(nn.Linear(2, 2)).quant.__name__
        'QuantLinear'
    """
    cls = type(module)
    for t in LAYER_TYPES:
        if cls is t.float or cls is t.quant or cls is t.int:
            return t
    return None
