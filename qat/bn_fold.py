"""Conv-BatchNorm folding for QAT: the BatchNorm's scale is folded into the conv weight *before*
the weight is fake-quantized, so training sees the very integer weights a deployed (BN-folded)
model uses, and converting the trained model changes nothing.

The training-time graph is the one of Jacob et al. (2018) and PyTorch's ``_ConvBnNd``::

    f      = gamma / sqrt(running_var + eps)            # per output channel
    y      = conv(x_q, fq(W * f)) / f  (+ conv bias)    # the folded weight is what gets quantized
    out    = bn(y)                                      # batch statistics while BN trains

Dividing by ``f`` and letting the BatchNorm normalize with the batch statistics keeps training
as stable as float BN training. Once BN statistics are frozen (``freeze_bn_stats``, the callback's
``freeze_bn_step`` / ``freeze_bn_epoch``) the BatchNorm uses its running statistics, and then
``out == conv(x_q, fq(W * f)) + (beta - gamma * running_mean / sqrt(running_var + eps))`` exactly
as the folded layer :func:`fold_bn` produces.

Example::

    >>> import torch, torch.nn as nn
    >>> from qat import prepare
    >>> from qat.prepare import enable_observers
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> net = prepare(net, "w8a8", fold_bn=True)
    >>> type(net[0]).__name__, type(net[1]).__name__
    ('QuantConvBn2d', 'Identity')
    >>> _ = net(torch.randn(8, 1, 6, 6)); _ = net.eval(); enable_observers(net, False)
    >>> x = torch.randn(2, 1, 6, 6); before = net(x)
    >>> folded = fold_bn(net)
    >>> type(folded[0]).__name__
    'QuantConv2d'
    >>> bool(torch.allclose(before, folded(x), atol=1e-5))
    True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .granularity import weight_view
from .modules import QuantConv2d

__all__ = ["QuantConvBn2d", "fuse_conv_bn", "fold_bn", "bn_fold_factor", "count_folded"]


def bn_fold_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)``, per channel (``gamma = 1`` without affine)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    return (bn.weight if bn.affine else torch.ones_like(std)) / std


class QuantConvBn2d(QuantConv2d):
    """A :class:`~qat.QuantConv2d` with the following ``BatchNorm2d`` folded into its weight before
    weight fake-quantization (see the module docstring). The BatchNorm lives on as ``self.bn``
    (its parameters train; its statistics update until frozen).

    Built by :func:`fuse_conv_bn` (or ``prepare(..., fold_bn=True)``); undone by :func:`fold_bn`.
    """

    bn: nn.BatchNorm2d

    @classmethod
    def from_quant_conv(cls, conv: QuantConv2d, bn: nn.BatchNorm2d) -> "QuantConvBn2d":
        if type(conv) is not QuantConv2d or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"QuantConvBn2d needs a QuantConv2d and a BatchNorm2d, got {type(conv).__name__}, {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"BatchNorm2d({bn.num_features}) does not follow a conv with {conv.out_channels} output channels")
        if not bn.track_running_stats:
            raise ValueError("BatchNorm2d without running statistics cannot be folded (track_running_stats=False)")
        mod = cls.__new__(cls)
        mod.__dict__.update(conv.__dict__)
        mod._parameters = dict(conv._parameters)
        mod._buffers = dict(conv._buffers)
        mod._modules = dict(conv._modules)
        mod._modules["bn"] = bn
        return mod

    def _fake_quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        q = self.weight_quantizer
        if q is None:
            return w
        return q(weight_view(w, q.spec)).view_as(w)  # per group: (O, I*k*k) back to (O, I, k, k)

    def folded_weight(self) -> torch.Tensor:
        """``W * gamma / sqrt(running_var + eps)`` (float, before fake quantization)."""
        return self.weight * bn_fold_factor(self.bn).reshape(-1, 1, 1, 1)  # (O,) -> (O, 1, 1, 1)

    def quantized_weight(self) -> torch.Tensor:
        """The folded weight as the forward pass quantizes it."""
        return self._fake_quant_weight(self.folded_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = bn_fold_factor(self.bn)
        y = self._conv_forward(self.quantize_input(x), self.quantized_weight(), None)
        y = y / f.reshape(1, -1, 1, 1)  # (O,) -> (1, O, 1, 1): back to the conv's own scale for BN
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return self.bn(y)

    @torch.no_grad()
    def to_folded(self) -> QuantConv2d:
        """A :class:`~qat.QuantConv2d` with the BN folded in: weight ``W * f``, bias
        ``beta + (b - running_mean) * f``; the quantizers (learned scales included) are kept, so
        the result computes what this layer computes with frozen BN statistics."""
        f = bn_fold_factor(self.bn)
        beta = self.bn.bias if self.bn.affine else torch.zeros_like(f)
        b = self.bias if self.bias is not None else torch.zeros_like(f)
        conv = QuantConv2d.__new__(QuantConv2d)
        conv.__dict__.update({k: v for k, v in self.__dict__.items()})
        conv._parameters = dict(self._parameters)
        conv._buffers = dict(self._buffers)
        conv._modules = {k: m for k, m in self._modules.items() if k != "bn"}
        conv.weight = nn.Parameter(self.folded_weight().detach().clone())
        conv.bias = nn.Parameter((beta + (b - self.bn.running_mean) * f).detach().clone())
        return conv

    def extra_repr(self) -> str:
        return super().extra_repr() + ", BN folded"


def _pairs(model: nn.Module):
    """``(parent, conv name, bn name)`` for each conv directly followed by a BatchNorm2d among a
    container's children (``nn.Sequential`` order, or registration order for other modules)."""
    for parent in model.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if type(conv) is QuantConv2d and type(bn) is nn.BatchNorm2d:
                yield parent, a, b


def fuse_conv_bn(model: nn.Module) -> int:
    """Turn each prepared ``QuantConv2d`` that is directly followed by a ``BatchNorm2d`` (in a
    ``Sequential`` or any container's registration order) into a :class:`QuantConvBn2d`, and the
    BatchNorm into ``nn.Identity``. In place; returns the number of pairs fused.

    Call it after :func:`qat.prepare` and before building the optimizer (``prepare(...,
    fold_bn=True)`` does both steps). Parameter tensors are kept, so ``state_dict`` values carry
    over; the BatchNorm's keys move under ``<conv>.bn``.
    """
    n = 0
    for parent, a, b in list(_pairs(model)):
        conv, bn = parent._modules[a], parent._modules[b]
        setattr(parent, a, QuantConvBn2d.from_quant_conv(conv, bn))
        setattr(parent, b, nn.Identity())
        n += 1
    if hasattr(model, "qat_layers"):
        model.qat_bn_folded = n
    return n


def fold_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`QuantConvBn2d` by its folded :class:`~qat.QuantConv2d`: the deployed
    form, with no BatchNorm left. With frozen BN statistics (eval mode) outputs are unchanged.

    Args:
        model: a model with QuantConvBn2d layers.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        the model with BatchNorms folded.
    """
    import copy

    model = model if inplace else copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantConvBn2d):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.to_folded())
    return model


def count_folded(model: nn.Module) -> int:
    """How many :class:`QuantConvBn2d` layers ``model`` holds."""
    return sum(isinstance(m, QuantConvBn2d) for m in model.modules())
