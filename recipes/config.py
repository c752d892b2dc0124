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
    "check_int", "check_lr", "check_trainer_node", "check_data_node", "validate_train_config",
    "check_output_dir", "check_plan_fits", "RESERVED_TRAINER_KEYS",
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
    resume: Optional[str] = None  # a run directory of an interrupted run: continue it from its stage checkpoints
    overwrite: bool = False  # true: write into a directory that already holds a finished run's results.json


def register_configs() -> None:
    """Register the schemas: ``train_schema`` (the top level) and ``schema/quant_spec``, and the
    ``qat_first`` resolver (``${qat_first:a,b}``: the first non-null argument) of the run directories.

    Called by the entry points before Hydra composes; never at import time.

    Example::

        >>> from hydra.core.config_store import ConfigStore
        >>> register_configs()
        >>> "train_schema.yaml" in ConfigStore.instance().list("")
        True
    """
    from hydra.core.config_store import ConfigStore

    from omegaconf import OmegaConf

    # ${qat_first:a,b,...}: the first argument that is not null (hydra.run.dir: the resumed run's directory, or a new one)
    OmegaConf.register_new_resolver("qat_first", lambda *args: next((a for a in args if a is not None), None), replace=True)
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

    from pytorch_lightning.callbacks import ModelCheckpoint

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) or {}
    check_trainer_node(kwargs)
    if any(isinstance(cb, ModelCheckpoint) for cb in callbacks):  # the stage checkpoints of qat-train
        kwargs["enable_checkpointing"] = True
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


# ---------------------------------------------------------------------- entry-point value checks
#: ``Trainer`` arguments the recipes set themselves, and the key that sets each instead.
RESERVED_TRAINER_KEYS = {
    "max_epochs": "fp.epochs / qat.epochs (qat-train) or fp.epochs / qat_epochs (qat-ptq)",
    "logger": "the logger group (logger=none|csv|wandb)",
    "callbacks": "the callbacks group (callbacks.<name>=...)",
    "default_root_dir": "hydra.run.dir",
}


def check_int(value: Any, key: str, minimum: int = 0, allow_none: bool = False) -> Optional[int]:
    """``value`` if it is an integer >= ``minimum`` (``None`` too with ``allow_none``).

    Raises:
        QATConfigError: naming ``key`` and the valid range (booleans and floats are not integers).

    Example::

        >>> check_int(3, "fp.epochs")
        3
        >>> check_int(-1, "fp.epochs")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: fp.epochs must be an integer >= 0, got -1
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or null" if allow_none else ""
        raise QATConfigError(f"{key} must be an integer >= {minimum}{extra}, got {value!r}")
    return value


def check_lr(value: Any, key: str) -> float:
    """``value`` if it is a finite number > 0 (a learning rate).

    Example::

        >>> check_lr(1e-3, "qat.lr")
        0.001
        >>> check_lr(0, "qat.lr")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: qat.lr must be a finite number > 0, got 0
    """
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise QATConfigError(f"{key} must be a finite number > 0, got {value!r}")
    return float(value)


def check_trainer_node(kwargs: Any, where: str = "trainer") -> None:
    """Check the ``trainer`` node: a mapping of ``pytorch_lightning.Trainer`` keyword arguments,
    none of them one the recipes set themselves (:data:`RESERVED_TRAINER_KEYS`).

    Raises:
        QATConfigError: a reserved key (naming the key that sets it instead) or an argument
            ``Trainer`` does not take.

    Example::

        >>> check_trainer_node({"accelerator": "cpu"})
        >>> check_trainer_node({"max_epochs": 1})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: trainer.max_epochs is set by the recipe per stage; set fp.epochs / qat.epochs ...
    """
    import pytorch_lightning as pl

    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise QATConfigError(f"{where} must be a mapping of pytorch_lightning.Trainer arguments, got {kwargs!r}")
    for key in kwargs:
        if key in RESERVED_TRAINER_KEYS:
            raise QATConfigError(
                f"{where}.{key} is set by the recipe per stage; set {RESERVED_TRAINER_KEYS[key]} instead"
            )
    params = [p for p in inspect.signature(pl.Trainer).parameters if p != "self"]
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        valid = [p for p in params if p not in RESERVED_TRAINER_KEYS]
        raise QATConfigError(f"{where}.{unknown[0]} is not a pytorch_lightning.Trainer argument; valid keys: {valid}")


def check_data_node(data: Any, where: str = "data") -> None:
    """Check the ``data`` node's ``batch_size`` (when it has one): an integer >= 1.

    Example::

        >>> check_data_node({"batch_size": 0})
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: data.batch_size must be an integer >= 1, got 0
    """
    if data is not None and hasattr(data, "get") and "batch_size" in data:
        check_int(data.get("batch_size"), f"{where}.batch_size", 1)


def validate_train_config(cfg: Any) -> None:
    """Check every number of a ``qat-train`` config by type and range, before any work.

    ``fp.epochs`` / ``qat.epochs`` integers >= 0 (0: the stage trains nothing), ``fp.lr`` /
    ``qat.lr`` finite and > 0, ``ptq.calibration_batches`` >= 1, ``data.batch_size`` >= 1, ``seed``
    an integer, ``overwrite`` a boolean, and a ``trainer`` node without the keys the recipe sets
    (:func:`check_trainer_node`).

    Raises:
        QATConfigError: naming the key and its valid range.

    Example::

        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.structured(TrainConfig)
        >>> validate_train_config(cfg)
        >>> cfg.qat.epochs = -1
        >>> validate_train_config(cfg)
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: qat.epochs must be an integer >= 0, got -1
    """
    from omegaconf import OmegaConf

    check_int(cfg.seed, "seed", minimum=-(2**63))
    check_int(cfg.fp.epochs, "fp.epochs", 0)
    check_lr(cfg.fp.lr, "fp.lr")
    check_int(cfg.ptq.calibration_batches, "ptq.calibration_batches", 1)
    if "qat" in cfg and hasattr(cfg.qat, "epochs"):
        check_int(cfg.qat.epochs, "qat.epochs", 0)
        check_lr(cfg.qat.lr, "qat.lr")
    if not isinstance(cfg.get("overwrite", False), bool):
        raise QATConfigError(f"overwrite must be true or false, got {cfg.get('overwrite')!r}")
    check_data_node(cfg.get("data"))
    trainer = cfg.get("trainer")
    check_trainer_node(OmegaConf.to_container(trainer, resolve=False) if trainer is not None else None)


def check_output_dir(output_dir: str, overwrite: bool = False, resume: Optional[str] = None) -> None:
    """Refuse to write a run into a directory that holds another run's ``results.json``.

    Args:
        output_dir: the run's directory.
        overwrite: write there anyway (the old results, model and checkpoints are replaced).
        resume: the run directory being resumed (may hold its own results).

    Raises:
        QATConfigError: naming the path and the ways out (``overwrite=true``, another
            ``hydra.run.dir``, ``resume=<dir>``).

    Example::

        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> check_output_dir(d)
        >>> open(os.path.join(d, "results.json"), "w").close()
        >>> check_output_dir(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: ...results.json already exists: another run wrote there; ...
    """
    import os

    if overwrite or resume:
        return
    path = os.path.join(output_dir, "results.json")
    if os.path.exists(path):
        raise QATConfigError(
            f"{path} already exists: another run wrote there; choose another hydra.run.dir, pass overwrite=true to "
            "replace it, or resume=<that run dir> to continue it"
        )


def check_plan_fits(model: Any, plan: Any, module_attr: Optional[str] = "net", fold_bn: bool = False,
                    smooth: Any = None, where: str = "quant") -> None:
    """Prepare a throw-away copy of ``model`` with ``plan``: every rule value that depends on a
    layer's shape (group size, axis, matching) is checked before any training.

    Args:
        model: a freshly instantiated LightningModule (or network); it is not modified.
        plan: a :class:`qat.QuantPlan` (or what :func:`qat.load_plan` takes).
        module_attr: the attribute holding the network the plan is for (``None``: ``model``).
        fold_bn / smooth: as :func:`qat.prepare` takes them.
        where: the config key of the plan, for the message.

    Raises:
        QATConfigError: the plan does not fit the model (the core's message, prefixed with ``where``).

    Example::

        >>> from qat.recipes.digits import ClassifierModule, DigitsCNN
        >>> check_plan_fits(ClassifierModule(DigitsCNN(channels=4)), "w4a4")
        >>> bad = {"name": "g5", "rules": [{"match": "*", "weight": {"bits": 4, "granularity": "per_group", "group_size": 5}}]}
        >>> check_plan_fits(ClassifierModule(DigitsCNN(channels=4)), bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: quant: layer '0' (Conv2d) weight: group_size=5 does not divide ...
    """
    import copy

    from qat import load_plan, prepare

    net = model if module_attr is None else getattr(model, module_attr, None)
    if net is None:
        raise QATConfigError(f"callbacks.qat.module_attr={module_attr!r}: the model has no such attribute")
    try:
        prepare(copy.deepcopy(net), load_plan(plan), fold_bn=fold_bn, smooth=smooth)
    except QATConfigError as exc:
        raise QATConfigError(f"{where}: {exc}") from None
