"""Quantization telemetry: how well each quantizer represents its tensor (plain PyTorch)."""

from __future__ import annotations

import math

import torch

from .fake_quant import FakeQuantizer
from .granularity import quantize_codes
from .microscaling import float_scale, microscaling_forward
from .spec import Estimator

__all__ = ["quantizer_stats", "sqnr_db"]


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB
    (``inf`` when the two are equal).

    Example::

        >>> round(sqnr_db(torch.tensor([1.0, -1.0]), torch.tensor([0.9, -1.1])), 1)
        20.0
    """
    x, x_hat = x.detach().float(), x_hat.detach().float()
    noise = (x - x_hat).pow(2).sum().item()
    signal = x.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


@torch.no_grad()
def quantizer_stats(fq: FakeQuantizer, x: torch.Tensor, x_hat: torch.Tensor | None = None) -> dict[str, float]:
    """Statistics of ``fq`` applied to ``x`` with its current parameters (nothing is updated).

    ``x_hat``, if given, is ``fq``'s output for ``x`` already computed (from a forward hook).

    Returns ``bits``, ``scale_mean``, ``clip_rate`` (fraction of elements outside the
    representable range) and ``sqnr_db``.

    Example::

        >>> from qat import QuantSpec
        >>> fq = FakeQuantizer(QuantSpec(bits=8), (16,))
        >>> _ = fq(torch.randn(4, 16))
        >>> sorted(quantizer_stats(fq, torch.randn(4, 16)))
        ['bits', 'clip_rate', 'scale_mean', 'sqnr_db']
    """
    if not fq.is_initialized and not fq.spec.dynamic:
        return {"bits": float(fq.spec.bits), "scale_mean": float("nan"), "clip_rate": float("nan"), "sqnr_db": float("nan")}
    if x_hat is None:
        was_obs = fq.flag("observer_enabled")
        fq.enable_observer(False)
        try:
            x_hat = fq.forward(x)  # not fq(x): skips hooks
        finally:
            fq.enable_observer(was_obs)
    s, z = fq.current_qparams()
    spec = fq.spec
    if spec.estimator is Estimator.PACT:
        clipped = (x < 0) | (x > fq.alpha.detach())
    elif fq.micro is not None:  # a float format: the elements that saturate (|x / S| > max)
        f = fq.micro
        axis = None if f.block_size else fq.axis
        scale = None if f.block_scale == "e8m0" else (float_scale(x, f.name, axis) if spec.dynamic else s)
        clipped = ~microscaling_forward(x, f.element, f.block_size, f.block_scale, scale, axis)[1]
    elif spec.dynamic:
        clipped = torch.zeros((), dtype=torch.bool)  # dynamic ranges cover each batch
    else:
        q = quantize_codes(x, s, z, spec, clamp=False)
        clipped = (q < spec.qmin) | (q > spec.qmax)
    return {
        "bits": float(spec.bits),
        "scale_mean": float(s.float().mean()),
        "clip_rate": float(clipped.float().mean()),
        "sqnr_db": sqnr_db(x, x_hat),
    }
