"""Lightning callbacks of lightning-qat.

Example::

    from qat.callbacks import QuantizationAwareTraining
    trainer = Trainer(callbacks=[QuantizationAwareTraining("w4a8")])
"""

from .qat import QuantizationAwareTraining
from .telemetry import QuantizationTelemetry

__all__ = ["QuantizationAwareTraining", "QuantizationTelemetry"]
