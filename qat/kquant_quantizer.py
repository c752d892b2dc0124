"""`KQuantQuantizer`: the weight quantizer of a llama.cpp k-quant spec with ``estimator: lsq``,
whose two levels of scales (super-block ``d`` / ``dmin`` and the block scales and mins) are learned.

A k-quant weight with ``estimator: ste`` searches both levels from the current weight at every step
(:class:`~qat.FakeQuantizer`). With ``estimator: lsq`` the scales are parameters instead: started
from that same search on the first forward pass (so the first step equals the straight-through
quantizer's, bit for bit), then trained through both levels (:func:`qat.kquants.fake_quantize_kquant`
with ``learned``), quantized inside the forward pass to the float16 super-block scales and integer
block codes the GGUF file stores; :func:`qat.export.gguf.export_gguf` writes those very codes.

The parameters (``kq_super``, ``kq_block``; the searched reference ``kq_ref`` a buffer) are in
code units (see :func:`qat.kquants.kquant_learned_init`): one unit of ``kq_block`` is one block
code, one unit of ``kq_super`` 1/64 of the searched ``d``. Their names contain ``quantizer``,
so :func:`qat.recipes.minilm.distill` trains them with its ``scale_lr``; with Adam a ``scale_lr``
around 1e-2 moves a block code by one in about a hundred steps.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from .fake_quant import FakeQuantizer
from .kquants import KQUANTS, fake_quantize_kquant, kquant_learned_init, kquant_learned_shapes, kquant_parts
from .spec import Estimator, QuantSpec

__all__ = ["KQuantQuantizer", "weight_quantizer_class"]


class KQuantQuantizer(FakeQuantizer):
    """A k-quant weight's fake quantizer with learned scales (``format: q2_k .. q6_k``,
    ``estimator: lsq``).

    State (all in ``state_dict``): ``kq_ref`` (the searched scales, a buffer), ``kq_super`` and
    ``kq_block`` (learned parameters), and the flags of :class:`~qat.FakeQuantizer`;
    ``initialized`` turns on at the first forward pass, which sets the three from the weight it
    sees (a loaded checkpoint keeps its own).

    Args:
        spec: a k-quant weight spec with ``estimator: lsq``.
        shape: the weight's shape (rows, K), K a multiple of 256 (or of 32: the fallback type).

    Example::

        >>> from qat import QuantSpec
        >>> spec = QuantSpec(bits=4, signed=False, symmetric=False, granularity="per_group", group_size=32,
        ...                  scale_dtype="float16", format="q4_k", estimator="lsq")
        >>> fq = KQuantQuantizer(spec, (4, 256))
        >>> w = torch.randn(4, 256)
        >>> y = fq(w)
        >>> bool(torch.equal(y, fake_quantize_kquant(w, "q4_k"))), sorted(n for n, _ in fq.named_parameters())
        (True, ['kq_block', 'kq_super'])
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...], sync: bool = False, track_history: bool = False):
        # the base state (flags, an unused observer) of the searched quantizer: no stray LSQ scale parameter
        super().__init__(dataclasses.replace(spec, estimator=Estimator.STE), tuple(shape), sync, track_history)
        self.spec = spec
        self.weight_shape = tuple(shape)
        shapes = kquant_learned_shapes(self.weight_shape, spec.format.value)
        self.register_buffer("kq_ref", torch.zeros(shapes["ref"]))
        self.kq_super = nn.Parameter(torch.zeros(shapes["super"]))
        self.kq_block = nn.Parameter(torch.zeros(shapes["block"]))

    @staticmethod
    def learns(spec: Optional[QuantSpec]) -> bool:
        """Whether ``spec`` is a k-quant weight spec with learned scales (what this class runs).

        Example::

            >>> from qat import QuantSpec
            >>> KQuantQuantizer.learns(QuantSpec(bits=4)), KQuantQuantizer.learns(None)
            (False, False)
        """
        return spec is not None and spec.format.value in KQUANTS and spec.estimator is Estimator.LSQ

    def learned(self) -> dict[str, torch.Tensor]:
        """The learned state as :func:`qat.kquants.fake_quantize_kquant` takes it."""
        return {"ref": self.kq_ref, "super": self.kq_super, "block": self.kq_block}

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Set the learned state from weight ``w`` by the searches of :func:`qat.kquants.kquant_parts`."""
        st = kquant_learned_init(w, self.spec.format.value)
        self.kq_ref.copy_(st["ref"])
        self.kq_super.copy_(st["super"])
        self.kq_block.copy_(st["block"].reshape(self.kq_block.shape))
        self._set_flag("initialized", True)

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``x`` fake-quantized with the learned scales, in ``out_dtype`` (default ``x``'s), as
        :meth:`FakeQuantizer.forward`."""
        if not self._flags["fake_quant_enabled"]:
            y = x
        else:
            if not self._flags["initialized"]:
                self.init_from(x)
            y = fake_quantize_kquant(x, self.spec.format.value, self.learned())
        return y if out_dtype is None else y.to(out_dtype)

    def kquant_parts(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The codes and scales of weight ``w`` the forward pass uses (what the GGUF file stores).

        Example::

            >>> from qat import QuantSpec
            >>> spec = QuantSpec(bits=6, granularity="per_group", group_size=32, scale_dtype="float16",
            ...                  format="q6_k", estimator="lsq")
            >>> fq = KQuantQuantizer(spec, (2, 512)); w = torch.randn(2, 512); _ = fq(w)
            >>> fq.kquant_parts(w)["type"], tuple(fq.kquant_parts(w)["sc"].shape)
            ('Q6_K', (4, 16))
        """
        if not self._flags["initialized"]:
            self.init_from(w)
        return kquant_parts(w, self.spec.format.value, self.learned())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The learned state by name (``kq_ref``, ``kq_super``, ``kq_block``; detached)."""
        return {"kq_ref": self.kq_ref.detach(), "kq_super": self.kq_super.detach(), "kq_block": self.kq_block.detach()}

    def extra_repr(self) -> str:
        return f"format={self.spec.format.value}, estimator=lsq (learned super-block and block scales)"


def weight_quantizer_class(spec: Optional[QuantSpec]) -> type:
    """The quantizer class a weight of ``spec`` gets: :class:`KQuantQuantizer` for a k-quant with
    learned scales, else :class:`~qat.FakeQuantizer`.

    Example::

        >>> from qat import QuantSpec
        >>> weight_quantizer_class(QuantSpec(bits=4)).__name__
        'FakeQuantizer'
    """
    return KQuantQuantizer if KQuantQuantizer.learns(spec) else FakeQuantizer
