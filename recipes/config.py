"""The Hydra schema of ``qat-train`` / ``qat-ptq`` (registered in the ConfigStore by
:func:`register_configs`) and the helpers that turn config nodes into objects: the Lightning
``Trainer`` of the ``trainer`` group (:func:`build_trainer`) and the callbacks of the
``callbacks`` group (:func:`instantiate_callbacks`).

The callbacks are not copied field by field into a stage: ``configs/callbacks/default.yaml`` holds
each one as a ``_target_`` node whose keys are its constructor's arguments, so every argument is a
CLI key (``qat-train callbacks.qat.freeze_bn_epoch=3 callbacks.oscillation.dampen=1e-3``) and a
new callback is one more node (``+callbacks.export={_target_: qat.callbacks.QuantizedExport}``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from qat import QATConfigError
from qat.spec import QuantSpec

__all__ = [
    "TrainConfig", "FPStage", "PTQStage", "QATStage", "register_configs", "build_trainer", "instantiate_callbacks",
]


@dataclass
class FPStage:
    """The full-precision stage: ``epochs`` of training at learning rate ``lr``.

    Example::

        >>> FPStage()
        FPStage(epochs=15, lr=0.003)
    """

    epochs: int = 15
    lr: float = 3e-3


@dataclass
class PTQStage:
    """The post-training-quantization stage of ``qat-train`` and ``qat-ptq``.

    Args:
        calibration_batches: training batches the observers see (``qat.ptq.calibrate``).
        observer: override every quantizer's observer (``minmax``, ``moving_average``,
            ``percentile``, ``mse``); ``None``: the plan's.
        fold_bn: fold BatchNorm into the preceding conv weights before calibrating.

    Example::

        >>> PTQStage(observer="mse")
        PTQStage(calibration_batches=8, observer='mse', fold_bn=False)
    """

    calibration_batches: int = 8
    observer: Optional[str] = None
    fold_bn: bool = False


@dataclass
class QATStage:
    """The QAT stage of ``qat-train``: ``epochs`` of training at learning rate ``lr``. What the
    callbacks do (calibration, freeze schedules, smoothing, oscillation control, telemetry) is set
    on their nodes under ``callbacks``.

    Example::

        >>> QATStage()
        QATStage(epochs=10, lr=0.001)
    """

    epochs: int = 10
    lr: float = 1e-3


@dataclass
class TrainConfig:
    """The top level of ``configs/train.yaml`` (``train_schema``).

    ``quant`` / ``model`` / ``data`` / ``trainer`` / ``logger`` / ``callbacks`` come from their
    config groups; ``callbacks`` maps a name to a Lightning callback's ``_target_`` node (``null``:
    off).

    Example::

        >>> TrainConfig().qat
        QATStage(epochs=10, lr=0.001)
    """

    quant: Any = None  # a plan: {name, rules}; validated by qat.QuantPlan.from_dict
    model: Any = None
    data: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None  # {name: {_target_: <callback class>, **its arguments}}
    seed: int = 0
    fp: FPStage = field(default_factory=FPStage)
    ptq: PTQStage = field(default_factory=PTQStage)
    qat: QATStage = field(default_factory=QATStage)


def register_configs() -> None:
    """Register the schemas: ``train_schema`` (the top level) and ``schema/quant_spec``.

    Called by the entry points before Hydra composes; never at import time.

    Example::

        >>> from hydra.core.config_store import ConfigStore
        >>> register_configs()
        >>> "train_schema.yaml" in ConfigStore.instance().list("")
        True
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="schema", name="quant_spec", node=QuantSpec)


def build_trainer(cfg: Any, max_epochs: int, logger: Any, callbacks: list, root: str):
    """The ``pytorch_lightning.Trainer`` that the ``trainer`` config group describes, for one stage.

    Args:
        cfg: the composed config (its ``trainer`` node: ``Trainer`` keyword arguments).
        max_epochs: the stage's epochs.
        logger: a Lightning logger, or ``False``.
        callbacks: the stage's callbacks.
        root: ``default_root_dir``.

    Example::

        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "enable_progress_bar": False}})
        >>> build_trainer(cfg, 2, False, [], "/tmp").max_epochs
        2
    """
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) or {}
    return pl.Trainer(max_epochs=max_epochs, logger=logger, callbacks=callbacks, default_root_dir=root, **kwargs)


def instantiate_callbacks(node: Any, where: str = "callbacks") -> dict[str, Any]:
    """Instantiate each ``_target_`` node of a ``callbacks`` mapping (``hydra.utils.instantiate``), in order.

    Args:
        node: ``{name: {_target_: ..., **arguments}}``; a ``null`` entry is skipped (a callback
            turned off from the CLI: ``callbacks.telemetry=null``).
        where: the node's path, for error messages.

    Returns:
        ``{name: callback}``.

    Raises:
        QATConfigError: an entry without ``_target_``, an argument the callback does not take
            (naming the valid ones), or the callback's own argument error.

    Example::

        >>> from omegaconf import OmegaConf
        >>> node = OmegaConf.create({"osc": {"_target_": "qat.callbacks.OscillationControl", "dampen": 1e-3},
        ...                          "telemetry": None})
        >>> instantiate_callbacks(node)["osc"].dampen
        0.001
        >>> instantiate_callbacks(OmegaConf.create({"osc": {"_target_": "qat.callbacks.OscillationControl", "damp": 1}}))
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: callbacks.osc: OscillationControl takes no argument 'damp'; its arguments: ['dampen', 'freeze', 'momentum', 'freeze_start', 'module_attr']
    """
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate

    out: dict[str, Any] = {}
    if node is None:
        return out
    for name, sub in node.items():
        if sub is None:
            continue
        if not hasattr(sub, "keys") or "_target_" not in sub:
            raise QATConfigError(f"{where}.{name} must be a mapping with a _target_ (the callback's class) or null, got {sub!r}")
        try:
            cls = get_class(sub["_target_"])
        except Exception as exc:  # an import / attribute error of a mistyped class path
            raise QATConfigError(f"{where}.{name}._target_={sub['_target_']!r} is not an importable class ({exc})") from None
        params = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        unknown = [k for k in sub.keys() if not str(k).startswith("_") and k not in params]
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values()):
            raise QATConfigError(f"{where}.{name}: {cls.__name__} takes no argument {unknown[0]!r}; its arguments: {params}")
        try:
            out[name] = instantiate(sub)
        except InstantiationException as exc:
            cause = exc.__cause__
            if isinstance(cause, QATConfigError):
                raise cause from None
            raise QATConfigError(f"{where}.{name}: {cause or exc}") from exc
    return out
