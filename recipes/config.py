"""The Hydra schema of ``qat-train``, registered in the ConfigStore by :func:`register_configs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from qat.spec import QuantSpec

__all__ = ["TrainConfig", "FPStage", "PTQStage", "QATStage", "register_configs"]


@dataclass
class FPStage:
    epochs: int = 15
    lr: float = 3e-3


@dataclass
class PTQStage:
    calibration_batches: int = 8


@dataclass
class QATStage:
    epochs: int = 10
    lr: float = 1e-3
    calibration_batches: int = 8
    freeze_observers_epoch: Optional[int] = None
    freeze_bn_epoch: Optional[int] = None
    fold_bn: bool = False  # fold BatchNorm into the conv weights before weight fake-quant
    telemetry_every_n_steps: int = 20  # 0: no per-layer telemetry
    smooth_alpha: Optional[float] = None  # per-input-channel smoothing of quantized Linear layers (qat.smooth_inputs)
    smooth_match: str = "*"
    smooth_learnable: bool = False
    osc_dampen: float = 0.0  # oscillation-dampening lambda_max (qat.oscillation); 0: off
    osc_freeze: Optional[float] = None  # oscillation-frequency threshold of weight freezing; None: off
    osc_momentum: float = 0.99
    osc_freeze_start: float = 0.0  # share of the QAT steps before freezing begins


@dataclass
class TrainConfig:
    quant: Any = None  # a plan: {name, rules}; validated by qat.QuantPlan.from_dict
    model: Any = None
    data: Any = None
    trainer: Any = None
    logger: Any = None
    seed: int = 0
    fp: FPStage = field(default_factory=FPStage)
    ptq: PTQStage = field(default_factory=PTQStage)
    qat: QATStage = field(default_factory=QATStage)


def register_configs() -> None:
    """Register the schemas: ``train_schema`` (the top level) and ``schema/quant_spec``.

    Called by the entry points before Hydra composes; never at import time.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="schema", name="quant_spec", node=QuantSpec)
