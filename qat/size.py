"""Model size as the bit-widths say: what a converted model's weights take."""

from __future__ import annotations

import torch.nn as nn

from .fake_quant import FakeQuantizer
from .modules import QuantModuleMixin
from .observers import Observer

__all__ = ["model_size_bytes", "float_size_bytes"]


def float_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer at its own dtype (float32 -> 4 bytes an element)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def model_size_bytes(model: nn.Module) -> int:
    """Bytes the model takes once converted: quantized weights at their bit-width plus their
    float32 scales and zero points (float formats: one byte a block for MX / NVFP4 block scales, float32
    tensor or channel scales, no zero point), every other parameter at its dtype. Observer statistics and
    quantizer flags, which conversion drops, are not counted; neither are non-persistent buffers.

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> m = prepare(nn.Sequential(nn.Linear(64, 64, bias=False)), "w4a8")
        >>> model_size_bytes(m)  # 64*64 4-bit weights + 64 scales and 64 zero points + 1+1 input qparams
        2568
    """
    total = 0
    counted: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, QuantModuleMixin):
            for name, q in mod.quantizers():
                micro = getattr(q, "micro", None)  # a float format (qat.microscaling)
                if name == "weight":
                    total += (mod.weight.numel() * q.spec.bits + 7) // 8
                    if micro is not None and micro.block_size:  # one 8-bit scale a block (E8M0 / E4M3)
                        total += mod.weight.numel() // micro.block_size
                    counted.add(id(mod.weight))
                if micro is None:
                    total += 4 * (q.scale.numel() + q.zero_point.numel())
                elif micro.block_scale != "e8m0":  # float32 scales (FP8, NVFP4's tensor scale), no zero point
                    total += 4 * q.scale.numel()
                if hasattr(q, "alpha"):
                    counted.add(id(q.alpha))
                counted.update((id(q.scale), id(q.zero_point)))
    for p in model.parameters():
        if id(p) not in counted:
            total += p.numel() * p.element_size()
    for mod in model.modules():
        if isinstance(mod, (FakeQuantizer, Observer)):
            continue  # scales counted above; statistics and flags are dropped by conversion
        for bname, b in mod.named_buffers(recurse=False):
            if bname not in mod._non_persistent_buffers_set:
                total += b.numel() * b.element_size()
    return total
