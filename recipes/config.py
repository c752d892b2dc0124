"""The Hydra schema of ``qat-train`` / ``qat-ptq`` (registered in the ConfigStore by
:func:`register_configs`) and the helpers that turn config nodes into objects: the Lightning
``Trainer`` of the ``trainer`` group (:func:`build_trainer`) and the callbacks of the
``callbacks`` group (:func:`instantiate_callbacks`).

The model and data nodes are any ``LightningModule`` / ``LightningDataModule`` by ``_target_``
(:func:`instantiate_node`); the ``trainer`` node is a ``Trainer`` by ``_target_`` (either Lightning
namespace, :func:`trainer_class`), completed per stage by :func:`build_trainer`.

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
    "TrainConfig", "FloatStartConfig", "FPStage", "PTQStage", "QATStage", "register_configs", "build_trainer", "instantiate_callbacks",
    "check_int", "check_lr", "check_trainer_node", "check_data_node", "validate_train_config",
    "check_output_dir", "check_plan_fits", "RESERVED_TRAINER_KEYS", "DEFAULT_TRAINER", "METRIC_MODES",
    "trainer_class", "instantiate_node", "check_metric_keys",
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
class FloatStartConfig:
    """The keys an entry point that starts from the float model shares with ``qat-train``
    (``qat-ptq``, ``qat-sensitivity``): the ``quant`` / ``model`` / ``data`` / ``trainer`` /
    ``logger`` groups, ``seed``, ``module_attr``, ``checkpoint`` (a float state dict of the
    LightningModule; ``null``: train ``fp.epochs`` as ``qat-train`` does), the ``fp`` / ``ptq``
    stages, ``progress`` (bars: true / false; null: only when stderr is a terminal) and
    ``overwrite`` (write into a directory that already holds a finished run's results).

    Example::

        >>> FloatStartConfig().module_attr, FloatStartConfig().fp.epochs
        ('auto', 15)
    """

    quant: Any = None
    model: Any = None
    data: Any = None
    trainer: Any = None
    logger: Any = None
    seed: int = 0
    module_attr: Optional[str] = "auto"  # the quantized network inside the model, as in qat-train / qat-export
    checkpoint: Optional[str] = None  # a float state_dict (.pt) of the LightningModule; else train fp.epochs
    fp: FPStage = field(default_factory=FPStage)
    ptq: PTQStage = field(default_factory=PTQStage)
    progress: Any = None  # true / false; null: bars only when stderr is a terminal
    overwrite: bool = False  # true: write into a directory that already holds a finished run's results


@dataclass
class TrainConfig:
    """The top level of ``configs/train.yaml`` (``train_schema``).

    ``quant`` / ``model`` / ``data`` / ``trainer`` / ``logger`` / ``callbacks`` come from their
    config groups; ``callbacks`` maps a name to a Lightning callback's ``_target_`` node (``null``:
    off). ``model`` is any ``LightningModule`` by ``_target_``, ``data`` any ``LightningDataModule``,
    ``trainer`` a Lightning ``Trainer``. ``module_attr`` names the quantized network inside the
    model (``auto``: ``net`` when the model has one, else the whole model; ``null``: the whole
    model; as in ``qat-export``), ``metric`` / ``mode`` what the table
    and a sweep's objective report (a key the model logs in ``test_step`` or ``validation_step``;
    ``max`` or ``min``), ``fp_cache`` where trained float models are kept for reuse (``null``: the
    sweep directory in a multirun, none in a single run; ``false``: off).

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
    module_attr: Optional[str] = "auto"  # the quantized network inside the model: auto (net if it has one), a name, null (all)
    metric: str = "test/acc"  # what the table and the sweep objective report (logged by the model)
    mode: str = "max"  # max or min: which way the metric is better
    fp_cache: Any = None  # null: <sweep dir>/fp_cache in a multirun; a directory; false: off
    fp: FPStage = field(default_factory=FPStage)
    ptq: PTQStage = field(default_factory=PTQStage)
    qat: QATStage = field(default_factory=QATStage)
    resume: Optional[str] = None  # a run directory of an interrupted run: continue it from its stage checkpoints
    overwrite: bool = False  # true: write into a directory that already holds a finished run's results.json


def register_configs(**schemas: Any) -> None:
    """Register the schemas: ``train_schema`` (the top level) and ``schema/quant_spec``, the
    ``qat_first`` resolver (``${qat_first:a,b}``: the first non-null argument) of the run directories
    and ``qat_direction`` (``${qat_direction:${mode}}``: ``maximize`` / ``minimize``, the Optuna
    sweeper's direction); and each of ``schemas`` (``name=dataclass``: the top level of another
    entry point that shares these groups, e.g. ``register_configs(ptq_schema=PTQConfig)``).

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
    # ${qat_direction:max} -> maximize: an Optuna sweeper's direction from the config's mode
    OmegaConf.register_new_resolver("qat_direction", _direction, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="schema", name="quant_spec", node=QuantSpec)
    for name, node in schemas.items():
        cs.store(name=name, node=node)


#: the ``Trainer`` of a ``trainer`` node without ``_target_``
DEFAULT_TRAINER = "pytorch_lightning.Trainer"
#: the values of ``mode``
METRIC_MODES = ("max", "min")


def _direction(mode: Any) -> str:
    if mode not in METRIC_MODES:
        raise QATConfigError(f"mode must be one of {list(METRIC_MODES)}, got {mode!r}")
    return "maximize" if mode == "max" else "minimize"


def _namespace_of(obj_or_cls: Any, kind: str) -> Any:
    """The Lightning namespace module (``pytorch_lightning`` / ``lightning.pytorch``) whose ``kind``
    class (``Trainer``, ``LightningModule``, ``LightningDataModule``) ``obj_or_cls`` is, or ``None``."""
    from qat.callbacks.base import NAMESPACES

    for ns in NAMESPACES:
        base = getattr(ns, kind)
        if (isinstance(obj_or_cls, type) and issubclass(obj_or_cls, base)) or isinstance(obj_or_cls, base):
            return ns
    return None


def _stock_trainers() -> dict[str, type]:
    from qat.callbacks.base import NAMESPACES

    return {f"{ns.__name__}.Trainer": ns.Trainer for ns in NAMESPACES}


def trainer_class(node: Any, model: Any = None, where: str = "trainer") -> type:
    """The ``Trainer`` class of a ``trainer`` node: its ``_target_`` (``pytorch_lightning.Trainer``
    when it has none), a ``Trainer`` of either Lightning namespace or a subclass.

    A stock ``Trainer`` follows ``model``'s namespace: a ``lightning.pytorch.LightningModule`` gets
    ``lightning.pytorch.Trainer`` even from the default ``_target_: pytorch_lightning.Trainer``
    (the two namespaces refuse each other's modules); a ``Trainer`` subclass must match it.

    Raises:
        QATConfigError: a ``_target_`` that is not importable or not a Lightning ``Trainer``, or a
            ``Trainer`` subclass of the other namespace than the model's.

    Example::

        >>> import pytorch_lightning as pl
        >>> trainer_class({"_target_": "pytorch_lightning.Trainer"}) is pl.Trainer
        True
        >>> trainer_class({"_target_": "torch.nn.Linear"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: trainer._target_='torch.nn.Linear' is not a Lightning Trainer; valid: ['pytorch_lightning.Trainer', ...
    """
    from hydra.utils import get_class

    stock = _stock_trainers()
    target = (node.get("_target_") if node is not None and hasattr(node, "get") else None) or DEFAULT_TRAINER
    try:
        cls = get_class(str(target))
    except Exception as exc:
        raise QATConfigError(f"{where}._target_={target!r} is not an importable class ({exc}); valid: {list(stock)} "
                             "or a subclass") from None
    ns = _namespace_of(cls, "Trainer")
    if ns is None:
        raise QATConfigError(f"{where}._target_={target!r} is not a Lightning Trainer; valid: {list(stock)} or a subclass")
    if model is None:
        return cls
    model_ns = _namespace_of(model, "LightningModule")
    if model_ns is None or model_ns is ns:
        return cls
    if cls in stock.values():
        return model_ns.Trainer
    raise QATConfigError(
        f"{where}._target_={target!r} is a {ns.__name__} Trainer but the model ({type(model).__name__}) is a "
        f"{model_ns.__name__}.LightningModule; set {where}._target_ to a {model_ns.__name__} Trainer"
    )


def build_trainer(cfg: Any, max_epochs: int, logger: Any, callbacks: list, root: str, model: Any = None, **overrides: Any):
    """The ``Trainer`` of the ``trainer`` config node for one stage, instantiated with
    ``hydra.utils.instantiate``: the node's keys plus the stage's ``max_epochs``, logger, callbacks
    and ``default_root_dir`` (keys the node may not set, :data:`RESERVED_TRAINER_KEYS`).

    Args:
        cfg: the composed config (its ``trainer`` node: ``_target_`` and ``Trainer`` keyword arguments).
        max_epochs: the stage's epochs.
        logger: a Lightning logger, or ``False``.
        callbacks: the stage's callbacks.
        root: ``default_root_dir``.
        model: the module it will train; a stock ``Trainer`` follows its Lightning namespace
            (:func:`trainer_class`).
        overrides: more ``Trainer`` arguments (over the node's).

    Example::

        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"trainer": {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu",
        ...                                     "enable_progress_bar": False}})
        >>> build_trainer(cfg, 2, False, [], "/tmp").max_epochs
        2
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = cfg.get("trainer") if hasattr(cfg, "get") else None
    kwargs = (OmegaConf.to_container(node, resolve=True) if node is not None else None) or {}
    cls = trainer_class(kwargs, model)
    kwargs.pop("_target_", None)
    check_trainer_node(kwargs, trainer_cls=cls)
    ns = _namespace_of(cls, "Trainer")
    if any(isinstance(cb, ns.callbacks.ModelCheckpoint) for cb in callbacks):  # the stage checkpoints of qat-train
        kwargs["enable_checkpointing"] = True
    kwargs.update(overrides)
    try:
        return instantiate({"_target_": f"{cls.__module__}.{cls.__qualname__}", **kwargs}, max_epochs=max_epochs,
                           logger=logger, callbacks=callbacks, default_root_dir=root)
    except InstantiationException as exc:
        raise QATConfigError(f"trainer: {exc.__cause__ or exc}") from exc


def _accepted(target: Any) -> tuple[list[str], bool]:
    """The keyword arguments ``target`` takes, and whether it takes ``**kwargs`` too."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _group_defaults(group: str) -> list[dict]:
    """The nodes of the options of the config group ``group`` shipped in ``configs/`` (unresolved)."""
    import glob
    import os

    from omegaconf import OmegaConf

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", group)
    if not os.path.isdir(here):  # installed: qat/configs beside qat/recipes
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", group)
    out = []
    for path in sorted(glob.glob(os.path.join(here, "*.yaml"))):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(node, dict) and "_target_" in node:
            out.append(node)
    return out


def instantiate_node(node: Any, where: str, kinds: tuple[str, ...] = (), quiet: bool = False, **kwargs: Any) -> Any:
    """Instantiate a ``_target_`` node (``model``, ``data``) with ``hydra.utils.instantiate``, its
    arguments checked against the target's signature first.

    A key the target does not take is an error naming the target's arguments, except one that the
    shipped defaults of the same config group (``configs/<where>/*.yaml``, another ``_target_``)
    left behind with their value: ``qat-train model._target_=mymodel.MyModule`` keeps the digits
    model's ``net`` / ``num_classes`` in the node, and they are dropped (logged) when ``MyModule``
    does not take them. ``kwargs`` go to the target only when it takes them and the node does not
    set them itself.

    Args:
        node: the config node (``_target_`` and the constructor's arguments).
        where: its key (``model``, ``data``), for messages and the config group.
        kinds: the Lightning base classes the object must be (``"LightningModule"``,
            ``"LightningDataModule"``) in either namespace; empty: anything.
        quiet: do not log the dropped keys (an object instantiated again).
        kwargs: extra arguments offered to the target (``lr=``).

    Returns:
        ``(obj, used)``: the object and the names of ``kwargs`` that were passed.

    Raises:
        QATConfigError: a ``_target_`` that is missing or not importable (with the working directory
            it was looked up from), an argument it does not take, an error of its constructor, or
            an object of the wrong kind.

    Example::

        >>> obj, used = instantiate_node({"_target_": "collections.Counter", "a": 1}, "data")
        >>> obj["a"], used
        (1, [])
        >>> instantiate_node({"_target_": "qat.recipes.digits.DigitsDataModule", "batch_sise": 8}, "data")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: data.batch_sise: qat.recipes.digits.DigitsDataModule takes no argument 'batch_sise'; its arguments: ['batch_size', 'seed', 'val_fraction', 'test_fraction']
    """
    import logging
    import os

    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate
    from omegaconf import DictConfig, OmegaConf

    log = logging.getLogger("qat.recipes")
    if node is None or not hasattr(node, "keys") or "_target_" not in node:
        raise QATConfigError(f"{where} must be a mapping with a _target_ (the class to instantiate), got {node!r}")
    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    raw = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else dict(node)
    target = spec["_target_"]
    try:
        obj_cls = get_object(str(target))
    except Exception as exc:
        raise QATConfigError(
            f"{where}._target_={target!r} is not importable ({' '.join(str(exc).split())}); a module of your own must be "
            "importable from "
            f"the working directory ({os.getcwd()}) or installed"
        ) from None
    names, var_kw = _accepted(obj_cls)
    if not var_kw:
        unknown = [k for k in spec if not str(k).startswith("_") and k not in names]
        leftovers = []
        for default in _group_defaults(where):
            if default.get("_target_") == target:
                continue
            leftovers += [k for k in unknown if k in default and default[k] == raw.get(k) and k not in leftovers]
        if leftovers and not quiet:
            log.info("%s: %s (left by the default %s config) dropped: %s takes no such argument", where,
                     ", ".join(f"{where}.{k}" for k in leftovers), where, target)
        for k in leftovers:
            spec.pop(k)
        unknown = [k for k in unknown if k not in leftovers]
        if unknown:
            raise QATConfigError(f"{where}.{unknown[0]}: {target} takes no argument {unknown[0]!r}; its arguments: {names}")
    used = [k for k in kwargs if k not in spec and (var_kw or k in names) and kwargs[k] is not None]
    try:
        obj = instantiate(spec, **{k: kwargs[k] for k in used})
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, QATConfigError):
            raise cause from None
        raise QATConfigError(f"{where}: {target}: {cause or exc}") from exc
    if kinds and not any(_namespace_of(obj, kind) is not None for kind in kinds):
        raise QATConfigError(f"{where}._target_={target!r} built a {type(obj).__name__}, not a {' / '.join(kinds)} "
                             "(pytorch_lightning or lightning.pytorch)")
    return obj, used


def check_metric_keys(metric: Any, mode: Any, module_attr: Any = None) -> None:
    """Check ``metric`` (a non-empty string: a key the model logs), ``mode`` (``max`` / ``min``) and
    ``module_attr`` (an attribute name or ``None``).

    Example::

        >>> check_metric_keys("val_loss", "min")
        >>> check_metric_keys("test/acc", "maximum")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: mode must be one of ['max', 'min'], got 'maximum'
    """
    if not isinstance(metric, str) or not metric:
        raise QATConfigError(f"metric must be the name of a value the model logs (e.g. test/acc, val_loss), got {metric!r}")
    _direction(mode)
    if module_attr is not None and (not isinstance(module_attr, str) or not module_attr.isidentifier()):
        raise QATConfigError(f"module_attr must be an attribute name of the model or null (the whole model), got {module_attr!r}")


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
    "max_epochs": "fp.epochs / qat.epochs (one value a stage)",
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


def check_trainer_node(kwargs: Any, where: str = "trainer", trainer_cls: Any = None) -> None:
    """Check the ``trainer`` node: a mapping of ``Trainer`` keyword arguments (and its ``_target_``),
    none of them one the recipes set themselves (:data:`RESERVED_TRAINER_KEYS`).

    Args:
        kwargs: the node as a mapping.
        where: its key, for messages.
        trainer_cls: the ``Trainer`` class (default: :func:`trainer_class` of the node).

    Raises:
        QATConfigError: a reserved key (naming the key that sets it instead) or an argument
            the ``Trainer`` does not take.

    Example::

        >>> check_trainer_node({"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu"})
        >>> check_trainer_node({"max_epochs": 1})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: trainer.max_epochs is set by the recipe per stage; set fp.epochs / qat.epochs ...
    """
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise QATConfigError(f"{where} must be a mapping of Trainer arguments (and its _target_), got {kwargs!r}")
    for key in kwargs:
        if key in RESERVED_TRAINER_KEYS:
            raise QATConfigError(
                f"{where}.{key} is set by the recipe per stage; set {RESERVED_TRAINER_KEYS[key]} instead"
            )
    cls = trainer_cls or trainer_class(kwargs, where=where)
    name = next((k for k, v in _stock_trainers().items() if v is cls), f"{cls.__module__}.{cls.__qualname__}")
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = [k for k in kwargs if not str(k).startswith("_") and k not in params]
    if unknown:
        valid = [p for p in params if p not in RESERVED_TRAINER_KEYS]
        raise QATConfigError(f"{where}.{unknown[0]} is not a {name} argument; valid keys: {valid}")


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
    an integer, ``overwrite`` a boolean, ``metric`` / ``mode`` / ``module_attr``
    (:func:`check_metric_keys`), ``fp_cache`` (null, false or a directory), and a ``trainer`` node
    without the keys the recipe sets (:func:`check_trainer_node`).

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
    if "metric" in cfg:
        check_metric_keys(cfg.get("metric"), cfg.get("mode", "max"), cfg.get("module_attr"))
    fp_cache = cfg.get("fp_cache")
    if fp_cache is not None and fp_cache is not False and not (isinstance(fp_cache, str) and fp_cache):
        raise QATConfigError(f"fp_cache must be null (the sweep directory in a multirun), false (off) or a directory, got {fp_cache!r}")
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
