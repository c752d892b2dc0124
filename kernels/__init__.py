"""Fake-quant ops of lightning-qat: one public op family, a PyTorch reference and a CuPy backend.

Example::

    >>> import torch
    >>> from qat.kernels import fake_quantize
    >>> fake_quantize(torch.tensor([0.3, -1.0]), torch.tensor([0.25]), torch.tensor([0.0]), -8, 7)
    tensor([ 0.2500, -1.0000])
"""

from .ops import (
    IDENTITY, BoundQuant, bind_fake_quantize, bind_lsq, bind_minmax, bind_pact, backend_name, compile_route, fake_quantize, fake_quantize_float, fake_quantize_float_lsq, fake_quantize_lsq, fake_quantize_minmax, fake_quantize_pact, param_checks,
    set_compile_route, set_param_checks,
)

__all__ = ["BoundQuant", "IDENTITY", "bind_fake_quantize", "bind_lsq", "bind_minmax", "bind_pact", "backend_name", "compile_route", "set_compile_route", "fake_quantize", "fake_quantize_float", "fake_quantize_float_lsq", "fake_quantize_lsq", "fake_quantize_minmax", "fake_quantize_pact", "param_checks", "set_param_checks"]
