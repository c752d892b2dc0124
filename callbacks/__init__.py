"""Lightning callbacks of lightning-qat.

Example::

    from qat.callbacks import QuantizationAwareTraining
    trainer = Trainer(callbacks=[QuantizationAwareTraining("w4a8")])
"""

from .export import QuantizedExport
from .qat import QuantizationAwareTraining
from .telemetry import QuantizationTelemetry

__all__ = ["QuantizationAwareTraining", "QuantizationTelemetry", "QuantizedExport"]
