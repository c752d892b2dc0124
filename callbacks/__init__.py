"""Lightning callbacks of lightning-qat, one job each.

* :class:`QuantizationAwareTraining`: the QAT lifecycle (prepare, calibrate, freeze schedules,
  checkpoint state).
* :class:`OscillationControl`: weight-oscillation dampening and iterative freezing.
* :class:`QuantizationTelemetry`: per-layer quantization health to the logger.
* :class:`QuantizedExport`: integer files (safetensors / ONNX / GGUF) when ``fit`` ends.

Example::

    >>> from qat.callbacks import OscillationControl, QuantizationAwareTraining, QuantizationTelemetry
    >>> callbacks = [QuantizationAwareTraining("w4a8", calibration_batches=8),
    ...              OscillationControl(dampen=1e-3, freeze=0.015),
    ...              QuantizationTelemetry(every_n_steps=50)]
    >>> [type(c).__name__ for c in callbacks]
    ['QuantizationAwareTraining', 'OscillationControl', 'QuantizationTelemetry']
"""

from .export import QuantizedExport
from .oscillation import OscillationControl
from .qat import QuantizationAwareTraining
from .telemetry import QuantizationTelemetry

__all__ = ["QuantizationAwareTraining", "OscillationControl", "QuantizationTelemetry", "QuantizedExport"]
