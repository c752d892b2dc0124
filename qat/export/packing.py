"""Bit-packing of integer codes: how a converted layer stores its weight codes (``qweight``).

8-bit codes are stored one a byte (``int8`` signed, ``uint8`` unsigned), shape kept. Every other
width is a little-endian bit stream of the offset codes ``q - qmin`` (``uint8``): 4-bit codes two a
byte (the first element in the low nibble), 2-bit four a byte, 3-bit 8 codes in 3 bytes, and so on,
so the tensor takes ``ceil(numel * bits / 8)`` bytes. The packed safetensors checkpoint and the
integer layers share this layout.

Example::

    >>> import torch
    >>> from qat.spec import QuantSpec
    >>> spec = QuantSpec(bits=4)
    >>> packed = pack_codes(torch.tensor([-8, 7, 0]), spec)
    >>> packed, unpack_codes(packed, spec, (3,))
    (tensor([240,   8], dtype=torch.uint8), tensor([-8,  7,  0], dtype=torch.int32))
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..spec import QuantSpec

__all__ = ["pack_codes", "unpack_codes", "packed_numel"]


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
