"""``qat-train``: full precision -> PTQ -> QAT on one model, with a table of accuracy and size.

    qat-train                                   # digits CNN, W2A4, W&B offline
    qat-train quant=w8a8 logger=csv             # another preset, CSV logs
    qat-train callbacks.qat.freeze_bn_epoch=3 callbacks.oscillation.dampen=1e-3   # callback arguments
    qat-train -m quant=w8a8,w4a8,w4a4,w2a2      # Hydra multirun + summary table (float model trained once)
    qat-train model._target_=mymodel.MyModule data._target_=mymodel.MyData metric=val_loss mode=min
    qat-train -m hydra/sweeper=qat_optuna 'qat.lr=tag(log, interval(1e-4, 1e-2))'   # Optuna on the QAT metric

Any ``LightningModule`` / ``LightningDataModule`` is a ``model`` / ``data`` node by ``_target_``
(the working directory is importable), the ``Trainer`` comes from the ``trainer`` node, and
``metric`` / ``mode`` name what the table reports and the job returns to a sweeper.

The QAT stage's Lightning callbacks are the ``callbacks`` group's ``_target_`` nodes
(``configs/callbacks/default.yaml``), instantiated with ``hydra.utils.instantiate``
(:func:`qat.recipes.config.instantiate_callbacks`); the plan comes from the ``quant`` group.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Optional

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from qat import QATConfigError, load_plan, prepare
from qat.callbacks import QuantizationAwareTraining, QuantizationTelemetry
from qat.callbacks.loggers import close_logger, log_artifact, log_figure, stage_logger_kwargs
from qat.callbacks.base import NAMESPACES
from qat.ptq import calibrate, default_forward
from qat.size import float_size_bytes, model_size_bytes

from .atomic import atomic_path, check_checkpoint_file, save_torch, write_json
from .config import (
    build_trainer, check_output_dir, check_plan_fits, instantiate_callbacks, instantiate_node, register_configs,
    trainer_class, validate_train_config,
)
from .ptq import with_observer
from .summary import SWEEP_ID_ENV

__all__ = ["main", "run", "print_results", "objective", "fp_cache_key", "resolve_module_attr"]

log = logging.getLogger(__name__)


_STAGE_CHECKPOINTS: dict[str, type] = {}


def _stage_checkpoint_class(namespace: Any) -> type:
    """``ModelCheckpoint`` of ``namespace`` writing ``last.ckpt`` atomically (temporary name, then
    ``os.replace``), so a run killed while saving keeps its previous complete checkpoint."""
    if namespace.__name__ not in _STAGE_CHECKPOINTS:
        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            tmp = f"{filepath}.tmp"
            namespace.callbacks.ModelCheckpoint._save_checkpoint(self, trainer, tmp)
            if trainer.is_global_zero and os.path.exists(tmp):
                os.replace(tmp, filepath)

        _STAGE_CHECKPOINTS[namespace.__name__] = type(
            "_StageCheckpoint", (namespace.callbacks.ModelCheckpoint,), {"_save_checkpoint": _save_checkpoint}
        )
    return _STAGE_CHECKPOINTS[namespace.__name__]


def _stage_checkpoint(output_dir: str, stage: str, trainer_cls: type = pl.Trainer) -> Any:
    # one file a stage, replaced at the end of every epoch: the latest state is the one to resume from
    namespace = next(ns for ns in NAMESPACES if issubclass(trainer_cls, ns.Trainer))
    return _stage_checkpoint_class(namespace)(
        dirpath=os.path.join(output_dir, "checkpoints", stage), filename="last", monitor=None, save_top_k=1,
        save_last=False, save_on_train_epoch_end=True, enable_version_counter=False,
    )


def _last_checkpoint(output_dir: str, stage: str, resume: bool) -> Optional[str]:
    path = os.path.join(output_dir, "checkpoints", stage, "last.ckpt")
    if not resume or not os.path.exists(path):
        return None
    return check_checkpoint_file(path, "resume")


_RUN_KEYS_NOT_COMPARED = ("resume", "overwrite")


def _check_resume(cfg: DictConfig, output_dir: str) -> None:
    """The resumed run's directory exists and was started with the same config (but resume / overwrite)."""
    if not os.path.isdir(output_dir):
        raise QATConfigError(f"resume={cfg.resume!r}: no such run directory")
    saved_path = os.path.join(output_dir, "run_config.yaml")
    if not os.path.isfile(saved_path):
        raise QATConfigError(
            f"resume={cfg.resume!r}: {saved_path} is missing; give the directory of a qat-train run (hydra.run.dir)"
        )
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    now = OmegaConf.to_container(cfg, resolve=False)
    diff = sorted(k for k in set(saved) | set(now) if k not in _RUN_KEYS_NOT_COMPARED and saved.get(k) != now.get(k))
    if diff:
        raise QATConfigError(
            f"resume={cfg.resume!r}: the config differs from the interrupted run's ({saved_path}) in {diff}; "
            "resume with the same overrides"
        )


def _field(metric: str) -> str:
    """The key of a stage's metric value in ``results.json``: ``test/acc`` -> ``test_acc``."""
    return metric.replace("/", "_")


def _overrides(module: Any, name: str) -> bool:
    """Whether ``module``'s class defines the hook ``name`` (``test_step``) itself."""
    for ns in NAMESPACES:
        if isinstance(module, ns.LightningModule):
            return getattr(type(module), name, None) is not getattr(ns.LightningModule, name)
    return hasattr(module, name)


_LOOPS = (("test", "test_step"), ("validate", "validation_step"))


def _logged(trainer: Any, module: Any, dm: Any, loop: str) -> dict[str, float]:
    out = (trainer.test if loop == "test" else trainer.validate)(module, datamodule=dm, verbose=False)
    merged: dict[str, float] = {}
    for d in out:
        merged.update(d)
    return merged


def _metric_loop(cfg: DictConfig, module: Any, dm: Any, root: str) -> str:
    """The loop (``test`` / ``validate``) in which the model logs ``cfg.metric``, found on one batch
    of each before any training; an error names the metrics it does log."""
    seen: dict[str, Any] = {}
    for loop, hook in _LOOPS:
        if not _overrides(module, hook):
            seen[loop] = f"no {hook}"
            continue
        trainer = build_trainer(cfg, 1, False, [], root, model=module, limit_test_batches=1, limit_val_batches=1)
        try:
            keys = _logged(trainer, module, dm, loop)
        except QATConfigError:
            raise
        except Exception as exc:  # e.g. a data module without that loader
            seen[loop] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        if cfg.metric in keys:
            return loop
        seen[loop] = sorted(keys)
    raise QATConfigError(
        f"metric={cfg.metric!r}: {type(module).__name__} does not log it in trainer.test or trainer.validate "
        f"(it logs {seen}); set metric=<one of them> (and mode=max|min)"
    )


def _evaluate(trainer: Any, module: Any, dm: Any, metric: str, loop: str) -> float:
    return float(_logged(trainer, module, dm, loop)[metric])


def _container(node: Any) -> Any:
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # an interpolation that needs Hydra's runtime (outside a Hydra app)
        return OmegaConf.to_container(node, resolve=False)


def fp_cache_key(cfg: DictConfig) -> str:
    """The key of a trained float model in the float cache: a hash of every config part that affects
    the float stage (``model``, ``data``, ``trainer``, ``fp``, ``seed``, ``metric``), resolved.

    Example::

        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"model": {"_target_": "m.M"}, "data": {"_target_": "m.D", "seed": "${seed}"},
        ...                         "trainer": {}, "fp": {"epochs": 2, "lr": 0.003}, "seed": 0, "metric": "test/acc",
        ...                         "quant": {"name": "w4a4"}})
        >>> key = fp_cache_key(cfg)
        >>> cfg.quant.name = "w8a8"                 # not part of the float stage: the same key
        >>> fp_cache_key(cfg) == key
        True
        >>> cfg.seed = 1                            # part of it: another key
        >>> fp_cache_key(cfg) == key
        False
    """
    parts = {k: _container(cfg.get(k)) for k in ("model", "data", "trainer", "fp", "seed", "metric")}
    parts["version"] = _FP_CACHE_VERSION
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


_FP_CACHE_VERSION = 1


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_fp_cache(path: str) -> Optional[dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    try:
        check_checkpoint_file(path, "fp_cache")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged entry is retrained (and replaced), not trusted
        log.warning("fp_cache: %s is unreadable (%s); training the float model again", path, exc)
        return None


def resolve_module_attr(model: Any, module_attr: Optional[str]) -> Optional[str]:
    """The ``module_attr`` of a run: ``auto`` is ``net`` when the model has a ``net`` submodule (the
    digits ``ClassifierModule``) and ``None`` (the whole model) otherwise; a name must be a submodule.

    Raises:
        QATConfigError: a name the model has no submodule of, listing its submodules.

    Example::

        >>> import torch.nn as nn
        >>> from qat.recipes.digits import ClassifierModule, DigitsCNN
        >>> resolve_module_attr(ClassifierModule(DigitsCNN(channels=4)), "auto")
        'net'
        >>> resolve_module_attr(nn.Sequential(nn.Linear(2, 2)), "auto") is None
        True
        >>> resolve_module_attr(ClassifierModule(DigitsCNN(channels=4)), "backbone")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: module_attr='backbone': ClassifierModule has no such submodule; its submodules are ['net', ...]; ...
    """
    if module_attr == "auto":
        return "net" if isinstance(getattr(model, "net", None), torch.nn.Module) else None
    if module_attr is not None and not isinstance(getattr(model, module_attr, None), torch.nn.Module):
        children = [n for n, _ in model.named_children()]
        raise QATConfigError(
            f"module_attr={module_attr!r}: {type(model).__name__} has no such submodule; its submodules are {children}; "
            "set module_attr=<one of them>, module_attr=null (the whole model) or module_attr=auto"
        )
    return module_attr


def _net(module: Any, module_attr: Optional[str]) -> Any:
    return module if module_attr is None else getattr(module, module_attr)


def run(cfg: DictConfig, output_dir: Optional[str] = None, fp_cache: Optional[str] = None) -> dict[str, Any]:
    """Run the three stages; returns (and writes to ``results.json``) the results.

    1. Full precision: ``cfg.model`` (any ``LightningModule`` by ``_target_``) trained
       ``cfg.fp.epochs`` on ``cfg.data`` (any ``LightningDataModule``) by the ``cfg.trainer``
       ``Trainer``; ``fp.lr`` / ``qat.lr`` go to the model's ``lr`` argument when it has one and
       the node does not set it.
    2. PTQ: a copy whose network (``getattr(model, cfg.module_attr)``, the whole model when null)
       is prepared with the ``quant`` plan (``cfg.ptq.observer`` / ``fold_bn`` applied) and
       calibrated on ``cfg.ptq.calibration_batches`` training batches.
    3. QAT: a copy trained ``cfg.qat.epochs`` with the ``cfg.callbacks`` (telemetry only with a
       logger).

    Each stage reports ``cfg.metric`` (a value the model logs in ``test_step``, or in
    ``validation_step`` when it does not log it in test) and the network's size.

    Every value is checked before any training: the numbers by type and range
    (:func:`qat.recipes.config.validate_train_config`), the model / data / trainer nodes against
    their classes, the plan and callback arguments, the plan against the model
    (:func:`qat.recipes.config.check_plan_fits`), and the metric on one test / validation batch.
    A directory that holds another run's ``results.json`` is refused unless ``cfg.overwrite``.

    Each training stage checkpoints every epoch (``checkpoints/{fp,qat}/last.ckpt``, written
    atomically); with ``cfg.resume`` (the run directory) a killed run continues where it stopped:
    a finished FP stage (``fp_model.pt``) is not retrained, the QAT stage resumes from its last
    checkpoint with the quantizer and callback state. Besides ``results.json`` the output directory
    gets ``qat_model.pt`` (``{plan, state_dict}`` of the quantized network) and ``run_config.yaml``;
    all are written atomically.

    With ``fp_cache`` (a directory; default ``cfg.fp_cache`` when that is a path) the trained float
    model is kept there under :func:`fp_cache_key` with the random state after it, and a later run
    with the same float config loads it instead of training: its results equal a run that trained.

    Example::

        >>> import tempfile
        >>> from hydra import compose, initialize_config_module
        >>> register_configs()
        >>> with initialize_config_module("qat.configs", version_base="1.3"):
        ...     cfg = compose("train", ["logger=none", "fp.epochs=1", "qat.epochs=1", "model.net.channels=4",
        ...                             "callbacks.qat.calibration_batches=1", "ptq.calibration_batches=1"])
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):     # the results table
        ...     res = run(cfg, tempfile.mkdtemp())
        >>> res["plan"], res["metric"], sorted(k for k in res if k in ("fp", "ptq", "qat"))
        ('w2a4', 'test/acc', ['fp', 'ptq', 'qat'])
    """
    resume = cfg.get("resume")
    if resume:
        if output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(resume):
            raise QATConfigError(
                f"resume={resume!r} continues the run in its own directory, but the output directory is {output_dir!r}; "
                "leave hydra.run.dir at its default when resuming"
            )
        output_dir = resume
    output_dir = os.path.abspath(output_dir or os.getcwd())
    validate_train_config(cfg)  # numbers by type and range, trainer keys, metric / mode: before any work
    check_output_dir(output_dir, overwrite=bool(cfg.get("overwrite")), resume=resume)
    if resume:
        _check_resume(cfg, output_dir)
    if fp_cache is None and isinstance(cfg.get("fp_cache"), str):
        fp_cache = cfg.fp_cache
    metric = str(cfg.metric)
    field = _field(metric)
    plan = load_plan(cfg.quant)  # a bad plan fails here, before any training
    ptq_plan = with_observer(plan, cfg.ptq.observer)
    probe, used = instantiate_node(cfg.model, "model", ("LightningModule",), lr=cfg.fp.lr)  # ... the model node
    if not used:
        log.warning("fp.lr / qat.lr are not passed to %s (it takes no lr argument, or model.lr sets it): its own "
                    "optimizer settings hold", type(probe).__name__)
    module_attr = resolve_module_attr(probe, cfg.get("module_attr"))
    cb_cfg = copy.deepcopy(cfg)  # the callbacks' ${module_attr}, resolved (cfg itself stays as given, for resume)
    cb_cfg.module_attr = module_attr
    named = instantiate_callbacks(cb_cfg.get("callbacks"))  # so do bad callback arguments
    qat_cb = next((cb for cb in named.values() if isinstance(cb, QuantizationAwareTraining)), None)
    if qat_cb is not None and qat_cb.module_attr != module_attr:
        raise QATConfigError(
            f"callbacks.qat.module_attr={qat_cb.module_attr!r} differs from module_attr={module_attr!r}; set "
            f"module_attr={qat_cb.module_attr} (the callbacks follow it)"
        )

    def new_model(lr: Optional[float]) -> Any:
        return instantiate_node(cfg.model, "model", ("LightningModule",), quiet=True, lr=lr)[0]

    trainer_cls = trainer_class(cfg.get("trainer"), probe)  # ... a Trainer of the model's namespace
    check_plan_fits(probe, ptq_plan, module_attr, fold_bn=cfg.ptq.fold_bn)  # ... and the plan vs the model
    if qat_cb is not None:
        check_plan_fits(probe, qat_cb.plan, module_attr, fold_bn=qat_cb.fold_bn, smooth=qat_cb.smooth)
    instantiate_node(cfg.data, "data", ("LightningDataModule",))  # ... the data node
    callbacks = list(named.values())
    os.makedirs(output_dir, exist_ok=True)
    if not resume:
        with atomic_path(os.path.join(output_dir, "run_config.yaml")) as tmp:
            OmegaConf.save(cfg, tmp)
    pl.seed_everything(cfg.seed, workers=True)
    t0 = time.time()
    dm, _ = instantiate_node(cfg.data, "data", ("LightningDataModule",), quiet=True)
    dm.prepare_data()
    dm.setup("fit")
    loop = _metric_loop(cfg, probe, dm, output_dir)  # ... and the metric, on one batch
    del probe
    pl.seed_everything(cfg.seed, workers=True)
    if not cfg.get("logger"):  # nothing to send per-layer statistics to
        callbacks = [cb for cb in callbacks if not isinstance(cb, QuantizationTelemetry)]
    # the run's stages share a W&B group: the run directory's name (and a hash of its path, for sweeps)
    group = f"{os.path.basename(output_dir.rstrip(os.sep)) or 'run'}-{hashlib.sha1(output_dir.encode()).hexdigest()[:6]}"

    def stage_logger(stage: str) -> Any:
        """The logger of one stage: its own W&B run in the group of this run (job_type = stage), or its
        own version folder for CSV / TensorBoard; the run's config as hyperparameters."""
        if not cfg.get("logger"):
            return False
        lg = instantiate(cfg.logger, **stage_logger_kwargs(str(cfg.logger.get("_target_", "")), stage, group))
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True) | {"stage": stage})
        return lg

    def eval_trainer() -> Any:
        return build_trainer(cfg, 1, False, [], output_dir, model=fp)

    # 1. full precision: a finished stage is not retrained on resume, nor one a float cache holds
    fp = new_model(cfg.fp.lr)
    fp_model_path = os.path.join(output_dir, "fp_model.pt")
    cache_path = os.path.join(os.path.abspath(fp_cache), f"fp_{fp_cache_key(cfg)}.pt") if fp_cache else None
    cached = _load_fp_cache(cache_path) if cache_path and not (resume and os.path.exists(fp_model_path)) else None
    if resume and os.path.exists(fp_model_path):
        check_checkpoint_file(fp_model_path, "resume")
        fp.load_state_dict(torch.load(fp_model_path, map_location="cpu", weights_only=True))
        log.info("resume: the full-precision stage finished before (%s); not retrained", fp_model_path)
        fp_value, fp_source = _evaluate(eval_trainer(), fp, dm, metric, loop), "resume"
    elif cached is not None:
        fp.load_state_dict(cached["state_dict"])
        fp_value, fp_source = float(cached["value"]), "cache"
        _set_rng_state(cached["rng"])  # as if it had just been trained here: the later stages equal a run that trained
        save_torch(fp.state_dict(), fp_model_path)
        log.info("fp_cache: the float model comes from %s; not retrained", cache_path)
    else:
        fp_logger = stage_logger("fp")
        trainer = build_trainer(cfg, cfg.fp.epochs, fp_logger, [_stage_checkpoint(output_dir, "fp", trainer_cls)],
                                output_dir, model=fp)
        trainer.fit(fp, datamodule=dm, ckpt_path=_last_checkpoint(output_dir, "fp", bool(resume)))
        save_torch(fp.state_dict(), fp_model_path)
        fp_value, fp_source = _evaluate(trainer, fp, dm, metric, loop), "trained"
        if fp_logger:
            close_logger(fp_logger)
        if cache_path:
            save_torch({"state_dict": fp.state_dict(), "value": fp_value, "rng": _rng_state(),
                        "config": json.dumps({k: _container(cfg.get(k)) for k in ("model", "data", "trainer", "fp", "seed")},
                                             default=str)}, cache_path)
            log.info("fp_cache: the float model is kept in %s", cache_path)
    fp_state = {k: v.detach().clone() for k, v in fp.state_dict().items()}

    # 2. post-training quantization: calibrate the observers, no training
    ptq = new_model(cfg.fp.lr)
    ptq.load_state_dict(fp_state)
    prepare(_net(ptq, module_attr), ptq_plan, fold_bn=cfg.ptq.fold_bn)
    forward_fn = qat_cb.forward_fn if qat_cb is not None else default_forward
    calibrate(_net(ptq, module_attr), dm.train_dataloader(), num_batches=cfg.ptq.calibration_batches,
              forward_fn=forward_fn if module_attr is not None else (lambda _m, b: forward_fn(ptq, b)))
    ptq_value = _evaluate(eval_trainer(), ptq, dm, metric, loop)

    # 3. quantization-aware training, starting from the full-precision weights
    qat_module = new_model(cfg.qat.lr)
    qat_module.load_state_dict(fp_state)
    logger = stage_logger("qat")
    trainer = build_trainer(cfg, cfg.qat.epochs, logger, [*callbacks, _stage_checkpoint(output_dir, "qat", trainer_cls)],
                            output_dir, model=qat_module)
    trainer.fit(qat_module, datamodule=dm, ckpt_path=_last_checkpoint(output_dir, "qat", bool(resume)))
    qat_value = _evaluate(trainer, qat_module, dm, metric, loop)
    qat_net = _net(qat_module, module_attr)
    qat_plan = getattr(qat_net, "qat_plan", plan)  # the plan the callback prepared the network with
    save_torch({"plan": qat_plan.to_dict(), "state_dict": qat_net.state_dict()}, os.path.join(output_dir, "qat_model.pt"))

    fp_bytes = float_size_bytes(_net(fp, module_attr))
    q_bytes = model_size_bytes(qat_net)
    results = {
        "plan": plan.name,
        "metric": metric,
        "mode": cfg.mode,
        "fp": {field: fp_value, "bytes": fp_bytes, "source": fp_source},
        "ptq": {field: ptq_value, "bytes": q_bytes},
        "qat": {field: qat_value, "bytes": q_bytes},
        "seconds": round(time.time() - t0, 1),
        "output_dir": output_dir,
    }
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    if sweep_id:
        results["sweep_id"] = sweep_id
    write_json(results, os.path.join(output_dir, "results.json"))
    if logger:
        logger.log_metrics(
            {f"{k}/{field}_final": results[k][field] for k in ("fp", "ptq", "qat")}
            | {"fp/bytes": fp_bytes, "qat/bytes": q_bytes}
        )
        if hasattr(logger, "log_table"):
            rows = [[k.upper(), plan.name, results[k][field], results[k]["bytes"]] for k in ("fp", "ptq", "qat")]
            logger.log_table(key="results", columns=["method", "plan", field, "bytes"], data=rows)
        _log_size_figure(logger, results, field)
        log_artifact([logger], [os.path.join(output_dir, "qat_model.pt")], f"{plan.name}-qat-model", "model",
                     {"plan": plan.name, metric: qat_value})  # the plan and state dict qat-export reads (W&B)
        close_logger(logger)  # the CSV logger writes its metrics here: the final results are kept
    print_results([results])
    return results


def _log_size_figure(logger: Any, results: dict[str, Any], field: str) -> None:
    """The metric against model size for FP / PTQ / QAT, as a figure to the logger (``qat/size_vs_metric``);
    skipped with a log line where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no size figure (pip install 'lightning-qat[recipes]')")
        return
    fig, ax = plt.subplots(figsize=(4, 3))
    for k, marker in (("fp", "o"), ("ptq", "s"), ("qat", "^")):
        ax.scatter(results[k]["bytes"] / 1024, results[k][field], marker=marker, label=k.upper())
    ax.set_xlabel("model size (KiB)")
    ax.set_ylabel(results["metric"])
    ax.set_title(f"{results['plan']}: {results['metric']} against size")
    ax.legend()
    log_figure([logger], "qat/size_vs_metric", fig)


def objective(results: dict[str, Any]) -> float:
    """The value a sweep optimizes: the QAT stage's ``metric`` (what :func:`run` returns it in).

    Example::

        >>> objective({"metric": "val/loss", "qat": {"val_loss": 0.25, "bytes": 1}})
        0.25
    """
    return float(results["qat"][_field(results.get("metric", "test/acc"))])


def print_results(all_results: list[dict[str, Any]], title: str = "lightning-qat: full precision vs PTQ vs QAT") -> None:
    """Print a rich table of one or more runs' results (what :func:`run` returns).

    Each run's ``metric`` (``test/acc`` when a result has none) is shown in percent when it is a
    ``max`` metric within [0, 1] (an accuracy), as it is otherwise.

    Example::

        >>> r = {"plan": "w4a4", "fp": {"test_acc": 0.99, "bytes": 4096}, "ptq": {"test_acc": 0.98, "bytes": 1024},
        ...      "qat": {"test_acc": 0.985, "bytes": 1024}}
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     print_results([r], title="demo")
        >>> "demo" in out.getvalue() and "99.00" in out.getvalue() and "test acc (%)" in out.getvalue()
        True
    """
    from rich.console import Console
    from rich.table import Table

    metrics = {res.get("metric", "test/acc") for res in all_results}
    metric = metrics.pop() if len(metrics) == 1 else "metric"
    values = [res[k].get(_field(res.get("metric", "test/acc"))) for res in all_results for k in ("fp", "ptq", "qat")]
    percent = all(res.get("mode", "max") == "max" for res in all_results) and all(
        isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in values)
    scale = 100.0 if percent else 1.0
    name = metric.replace("/", " ").replace("_", " ")
    table = Table(title=title)
    for col in ("plan", "method", f"{name} (%)" if percent else name, "vs FP (pts)" if percent else "vs FP",
                "size (KiB)", "compression"):
        table.add_column(col, justify="right" if col not in ("plan", "method") else "left")
    for res in all_results:
        field = _field(res.get("metric", "test/acc"))
        fp = res["fp"]
        for key in ("fp", "ptq", "qat"):
            r = res[key]
            table.add_row(
                res["plan"] if key == "fp" else "",
                key.upper(),
                f"{scale * r[field]:.2f}" if percent else f"{r[field]:.4g}",
                "" if key == "fp" else (f"{scale * (r[field] - fp[field]):+.2f}" if percent else f"{r[field] - fp[field]:+.4g}"),
                f"{r['bytes'] / 1024:.1f}",
                f"{fp['bytes'] / r['bytes']:.2f}x",
            )
        table.add_section()
    Console(width=100).print(table)


def _importable(directory: str) -> Optional[str]:
    """Put ``directory`` first on ``sys.path`` (once): a ``_target_`` of the user's own module resolves.
    Returns it when it was added (for :func:`_forget`), else ``None``."""
    directory = os.path.abspath(directory)
    if directory in (os.path.abspath(p or os.curdir) for p in sys.path):
        return None
    sys.path.insert(0, directory)
    return directory


def _forget(directory: Optional[str]) -> None:
    """Take back what :func:`_importable` added (a process that goes on after the app, e.g. a test,
    keeps its own import path: the checkout's ``kernels/`` folder would shadow the PyPI package)."""
    if directory is not None and directory in sys.path:
        sys.path.remove(directory)


def _task(cfg: DictConfig) -> float:
    from hydra.types import RunMode

    hc = HydraConfig.get()
    added = _importable(hc.runtime.cwd)  # a job started elsewhere (a SLURM node) imports from the launch directory too
    try:
        fp_cache = cfg.get("fp_cache")
        if fp_cache is None and hc.mode == RunMode.MULTIRUN:  # the float model once a sweep
            fp_cache = os.path.join(os.path.abspath(hc.sweep.dir), "fp_cache")
        return objective(run(cfg, hc.runtime.output_dir, fp_cache=fp_cache or None))
    finally:
        _forget(added)


def main() -> None:
    """Console entry point ``qat-train`` (Hydra app over ``configs/train.yaml``).

    The working directory goes first on ``sys.path``, so ``model._target_=mymodel.MyModule`` finds
    ``./mymodel.py``. The job returns the QAT stage's ``metric`` (:func:`objective`): a sweeper
    such as Optuna's (``hydra/sweeper=qat_optuna``) optimizes it.

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-m", "qat.recipes.train", "--help"], capture_output=True, text=True)
        >>> "callbacks: default" in out.stdout
        True
    """
    added = _importable(os.getcwd())
    try:
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        register_configs()
        hydra.main(version_base="1.3", config_path="../configs", config_name="train")(_task)()
    finally:
        _forget(added)


if __name__ == "__main__":
    main()
