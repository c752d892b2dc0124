"""GPTQ (Frantar et al. 2022): post-training weight quantization with second-order error compensation.

For each ``QuantLinear`` with a weight spec, GPTQ quantizes the weight one input column at a time
and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian ``H = 2 X^T X / n`` of the layer's inputs ``X``, so the layer's *outputs* move as
little as possible. The result lives in the prepared model itself: the weight becomes the
quantized values, and the weight quantizer keeps the scales GPTQ chose (its observer is switched
off), so evaluation, QAT from there, ``convert`` and export all see exactly GPTQ's model.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .errors import QATConfigError
from .granularity import Layout
from .modules import QuantLinear
from .observers import qparams_from_range
from .prepare import quant_layers
from .ptq import default_forward, float_pass
from .spec import QuantSpec, round_with_mode

__all__ = ["gptq"]


def _qdq(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize a column ``w`` (rows,) with per-row ``s``, ``z``: the fake-quant op's math."""
    q = torch.clamp(round_with_mode(w * (1.0 / s), spec.round_mode.value) + z, spec.qmin, spec.qmax)
    return (q - z) * s


def _row_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min / max qparams of a (rows, cols) block."""
    mn, mx = torch.aminmax(w, dim=1)
    return qparams_from_range(mn, mx, spec)


@torch.no_grad()
def _gptq_layer(layer: QuantLinear, H: torch.Tensor, damp: float, block_size: int) -> float:
    spec = layer.weight_quantizer.spec
    W = layer.weight.detach().float().clone()  # (out, in)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    layout = Layout.of(spec)
    g = layout.group_size
    if g is not None:
        block_size = g * max(1, block_size // g)  # groups never straddle blocks
        scales = torch.empty(rows, cols // g)
        zps = torch.empty(rows, cols // g)
    elif layout.axis is not None:  # per output row (axis 0: gptq() refuses others)
        s_row, z_row = _row_qparams(W, spec)
    else:  # per tensor: one range over the whole weight
        s1, z1 = qparams_from_range(W.min().reshape(1), W.max().reshape(1), spec)
        s_row, z_row = s1.expand(rows), z1.expand(rows)

    Q = torch.zeros_like(W)
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if g is not None and col % g == 0:
                s_row, z_row = _row_qparams(W1[:, i : i + g], spec)  # this group, errors so far included
                scales[:, col // g], zps[:, col // g] = s_row, z_row
            w = W1[:, i]
            d = Hinv1[i, i]
            q = _qdq(w, s_row, z_row, spec)
            Q1[:, i] = q
            loss += float(((w - q) ** 2 / d**2).sum()) / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # spread over the rest of the block
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # and over the later blocks

    fq = layer.weight_quantizer
    if g is not None:
        s_final, z_final = scales, zps
    elif layout.axis is not None:
        s_final, z_final = s_row, z_row
    else:
        s_final, z_final = s1, z1
    layer.weight.data.copy_(Q.to(layer.weight.dtype))
    fq.scale.data.copy_(s_final.reshape(fq.scale.shape))
    fq.zero_point.data.copy_(z_final.reshape(fq.zero_point.shape))
    fq.mark_initialized()
    fq.enable_observer(False)  # keep GPTQ's scales: the weight is already on their grid
    return loss


def gptq(
    model: nn.Module,
    calibration: Iterable[Any],
    num_batches: Optional[int] = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    damp: float = 0.01,
    block_size: int = 128,
) -> dict[str, float]:
    """Run GPTQ on every ``QuantLinear`` weight of a prepared model, in place.

    Hessians come from one calibration pass over the model with fake quantization off (each
    layer's float inputs); every layer is then quantized with its plan's weight spec (bits,
    symmetric / affine, per-tensor, per-channel along axis 0, or per-group) and min / max ranges.
    Conv and Embedding layers keep round-to-nearest.

    Args:
        model: a model returned by :func:`qat.prepare`.
        calibration: batches (a DataLoader).
        num_batches: how many to use (all if None).
        forward_fn: how a batch runs through the model.
        damp: Hessian dampening, a fraction of its mean diagonal.
        block_size: columns updated together (lazy batch updates).

    Returns:
        ``{layer name: GPTQ's proxy loss}`` for the layers it quantized.

    Raises:
        QATConfigError: the model has no prepared Linear layer with a weight spec, a weight is
            quantized per channel along an axis other than 0, or a layer is smoothed.

    Example::

        >>> import torch, torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(64, 32)), {"rules": [{"match": "*", "weight": {"bits": 4}}]})
        >>> sorted(gptq(model, [torch.randn(128, 64)]))
        ['0']
    """
    layers = [(n, m) for n, m in quant_layers(model) if isinstance(m, QuantLinear) and m.weight_quantizer is not None]
    if not layers:
        raise QATConfigError("gptq: the model has no prepared Linear layer with a weight spec; call qat.prepare first")
    if not 0.0 <= damp < 1.0:
        raise QATConfigError(f"gptq: damp must be in [0, 1), got {damp}")
    for name, layer in layers:
        spec = layer.weight_quantizer.spec
        if Layout.of(spec).axis is not None and spec.axis % 2 != 0:
            raise QATConfigError(f"gptq: layer {name!r} weight is per_channel along axis {spec.axis}; GPTQ needs axis 0 (output rows)")
        if spec.learned:
            raise QATConfigError(f"gptq: layer {name!r} weight uses estimator {spec.estimator.value}; GPTQ sets fixed scales, use ste")
        if layer.input_smooth is not None:
            raise QATConfigError(f"gptq: layer {name!r} is smoothed (qat.smooth_inputs); GPTQ rounds the plain weight, "
                                 "so run it on a model without smoothing")

    hessians = {name: torch.zeros(l.in_features, l.in_features, dtype=torch.float32) for name, l in layers}
    counts = {name: 0 for name, _ in layers}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu()  # (..., in) -> (n, in)
            n = x.shape[0]
            total = counts[name] + n
            hessians[name].mul_(counts[name] / total).addmm_(x.t(), x, alpha=2.0 / total)
            counts[name] = total

        return fn

    float_pass(model, calibration, [(layer, hook(name)) for name, layer in layers],
               [q for _, l in layers for _, q in l.quantizers()], num_batches, forward_fn)
    if not any(counts.values()):
        raise QATConfigError("gptq: the calibration data produced no batch")
    return {name: _gptq_layer(layer, hessians[name], damp, block_size) for name, layer in layers}
