"""The one exception type for user errors in configuration and preparation."""

from __future__ import annotations

__all__ = ["QATConfigError"]


class QATConfigError(ValueError):
    """A quantization config or plan that cannot be applied.

    Raised before any training step, naming the field or layer at fault and the valid choices.

    Example::

        >>> from qat import QuantSpec
        >>> QuantSpec(bits=1)
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: QuantSpec.bits must be in 2..16, got 1
    """
