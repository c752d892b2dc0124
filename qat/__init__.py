"""lightning-qat core: quantization specs, plans, fake quantizers, quantized layers.

Plain PyTorch: this package never imports Lightning, Hydra or W&B.

Example::

    >>> import torch.nn as nn
    >>> from qat import prepare
    >>> model = prepare(nn.Sequential(nn.Linear(8, 8)), "w4a8")
"""

from . import _layout

_layout.install()  # before anything imports qat.kernels (see qat/_layout.py)

from .bn_fold import QuantConvBn2d, fold_bn, fuse_conv_bn
from .convert import convert, is_converted
from .errors import QATConfigError
from .fake_quant import FakeQuantizer
from .modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from .observers import MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, Observer, PercentileObserver
from .oscillation import OscillationController, OscillationTracker, dampening_loss
from .plan import LayerQuant, LayerRule, QuantPlan, available_presets, load_plan
from .prepare import (
    enable_fake_quant,
    enable_observers,
    freeze_bn_stats,
    init_weight_quantizers,
    is_prepared,
    prepare,
    quant_layers,
    quantizers,
    unprepare,
)
from .ptq import calibrate
from .reconstruct import reconstruct
from .smooth import SmoothingSpec, fit_smoothing, init_smoothing, smooth_inputs
from .spec import Estimator, Granularity, ObserverKind, QuantSpec, RoundMode

__all__ = [
    "QATConfigError",
    "QuantSpec",
    "Granularity",
    "ObserverKind",
    "Estimator",
    "RoundMode",
    "LayerRule",
    "LayerQuant",
    "QuantPlan",
    "available_presets",
    "load_plan",
    "FakeQuantizer",
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "QuantLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantEmbedding",
    "prepare",
    "smooth_inputs",
    "init_smoothing",
    "fit_smoothing",
    "SmoothingSpec",
    "convert",
    "is_converted",
    "unprepare",
    "is_prepared",
    "quant_layers",
    "quantizers",
    "init_weight_quantizers",
    "enable_observers",
    "enable_fake_quant",
    "freeze_bn_stats",
    "calibrate",
    "reconstruct",
    "QuantConvBn2d",
    "fuse_conv_bn",
    "fold_bn",
    "OscillationController",
    "OscillationTracker",
    "dampening_loss",
]
