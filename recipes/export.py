"""``qat-export``: a trained quantized model -> packed safetensors / ONNX / GGUF.

Nothing is trained. ``checkpoint`` is either

* a Lightning checkpoint (``.ckpt``) written by a ``Trainer`` that ran the
  :class:`qat.callbacks.QuantizationAwareTraining` callback (``ModelCheckpoint``'s ``last.ckpt``,
  ``qat-train``'s ``checkpoints/qat/last.ckpt``): the plan comes from the callback's state in it,
  the weights and quantizer state from its ``state_dict``, the LightningModule from the ``model``
  node (``_target_`` and arguments, as ``qat-train`` takes it), with the checkpoint's
  ``hyper_parameters`` (``save_hyperparameters()``) for the arguments the node does not set, as
  ``LightningModule.load_from_checkpoint`` would; or
* the ``qat_model.pt`` that ``qat-train`` / ``qat-ptq`` write (``{plan, state_dict}`` of the
  quantized network ``getattr(model, module_attr)``).

Then ``qat.convert`` and the writers of :mod:`qat.export`. A checkpoint trained with
``fold_bn=True`` is recognized by its keys. A plan with llama.cpp k-quant weights (``gguf_q4_k_m``,
``gguf_q3_k``, ...) has no integer layers: it goes to GGUF only (``formats=[gguf]``), written from the
prepared model as trained (:func:`qat.callbacks.export.export_quantized`); ``converted_state_bytes``
is then null.

    qat-export checkpoint=last.ckpt model.net.channels=4    # the digits CNN (model=digits_cnn), a ModelCheckpoint file
    qat-export checkpoint=last.ckpt model._target_=my_pkg.MyModule module_attr=null   # your LightningModule
    qat-export checkpoint=outputs/2026-11-22/14-41-39/qat_model.pt formats=[safetensors,onnx,gguf] output_dir=exported
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig

from qat import QATConfigError, QuantPlan, prepare, quantizers
from qat.callbacks.export import check_kquant_formats, export_quantized
from qat.export.formats import FORMATS, check_formats, export_formats
from qat.size import float_size_bytes

from .atomic import write_json
from .entry import missing_extras
from .progress import progress_enabled, step_bar
from .train import resolve_module_attr

__all__ = [
    "ExportConfig", "FORMATS", "check_example_input_shape", "freeze_input_observers", "main", "run", "load_qat_checkpoint",
    "build_quantized_model", "export_formats", "register_export_configs",
]

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    """The top level of ``configs/export.yaml`` (``export_schema``).

    Example::

        >>> ExportConfig(checkpoint="run1/qat_model.pt").formats
        ['safetensors', 'onnx']
    """

    model: Any = None
    checkpoint: str = "???"  # a Lightning .ckpt (trained with QuantizationAwareTraining) or a qat_model.pt
    formats: list = field(default_factory=lambda: ["safetensors", "onnx"])
    output_dir: Optional[str] = None
    module_attr: Optional[str] = "auto"  # the quantized network inside the model: auto (net if it has one), a name, null
    fold_bn: bool = False  # the first guess of how the checkpoint was prepared; the other one is tried too
    example_input_shape: list = field(default_factory=lambda: [1, 1, 8, 8])  # ONNX tracing input (float)
    gguf_tokenizer_dir: Optional[str] = None
    progress: Any = None  # true / false; null: a bar only when stderr is a terminal


def register_export_configs() -> None:
    """Register ``export_schema`` in Hydra's ConfigStore (called by :func:`main`, never at import).

    Example::

        >>> from hydra.core.config_store import ConfigStore
        >>> register_export_configs()
        >>> "export_schema.yaml" in ConfigStore.instance().list("")
        True
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def freeze_input_observers(net: torch.nn.Module) -> None:
    """Stop activation observers (a deployed model's input ranges are fixed); weight observers
    keep tracking the weights, as the fake-quantized forward and ``convert`` both do.

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> net = prepare(nn.Sequential(nn.Linear(4, 4)), "w8a8")
        >>> freeze_input_observers(net)
        >>> bool(net[0].input_quantizer.observer_enabled), bool(net[0].weight_quantizer.observer_enabled)
        (False, True)
    """
    for name, q in quantizers(net):
        if name.endswith("input_quantizer"):
            q.enable_observer(False)


def check_example_input_shape(shape: Any) -> Optional[list[int]]:
    """``example_input_shape`` as a list of integers >= 1 (``null`` / empty: no example input, so no ONNX).

    Raises:
        QATConfigError: naming the key and the valid values.

    Example::

        >>> check_example_input_shape([1, 1, 8, 8])
        [1, 1, 8, 8]
        >>> check_example_input_shape([1, 0, 8])
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: example_input_shape must be a list of integers >= 1 (one input batch's shape), got [1, 0, 8]
    """
    if shape is None:
        return None
    dims = list(shape) if not isinstance(shape, (str, bytes)) and hasattr(shape, "__iter__") else None
    if dims is None or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        shown = dims if dims is not None else shape
        raise QATConfigError(
            f"example_input_shape must be a list of integers >= 1 (one input batch's shape), got {shown!r}"
        )
    return dims or None


def _is_lightning(ckpt: dict) -> bool:
    return "state_dict" in ckpt and ("pytorch-lightning_version" in ckpt or "callbacks" in ckpt) and "plan" not in ckpt


def _callback_plan(path: str, ckpt: dict) -> dict:
    """The plan of the ``QuantizationAwareTraining`` state in a Lightning checkpoint's ``callbacks``."""
    states = ckpt.get("callbacks") or {}
    plans = [v["plan"] for v in states.values() if isinstance(v, dict) and "plan" in v and "observers_frozen" in v]
    if not plans:
        names = [str(k).split("{")[0] for k in states]
        raise QATConfigError(
            f"checkpoint {path!r} is a Lightning checkpoint without QuantizationAwareTraining state (its callbacks: "
            f"{names}); give the checkpoint of a Trainer that ran qat.callbacks.QuantizationAwareTraining, or a qat_model.pt"
        )
    if any(QuantPlan.from_dict(p) != QuantPlan.from_dict(plans[0]) for p in plans[1:]):
        raise QATConfigError(f"checkpoint {path!r} holds {len(plans)} QuantizationAwareTraining states with different plans")
    return plans[0]


def load_qat_checkpoint(path: str) -> dict[str, Any]:
    """``{plan, state_dict, kind, hyper_parameters}`` of a checkpoint ``qat-export`` takes, with clear
    errors for anything else.

    ``kind`` is ``"lightning"`` for a Lightning ``.ckpt`` written with the
    :class:`qat.callbacks.QuantizationAwareTraining` callback (the plan is the callback's, the
    state dict the LightningModule's; ``hyper_parameters`` what ``save_hyperparameters()`` stored,
    else ``{}``), ``"qat_model"`` for a ``qat_model.pt`` (``{plan, state_dict}`` of the quantized
    network) that ``qat-train`` / ``qat-ptq`` write.

    Raises:
        QATConfigError: the file is missing, not a PyTorch checkpoint, a Lightning checkpoint
            without the callback's state, or neither kind.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "qat_model.pt")
        >>> torch.save({"plan": {"name": "w8a8", "rules": []}, "state_dict": {}}, path)
        >>> ckpt = load_qat_checkpoint(path)
        >>> ckpt["kind"], ckpt["plan"]["name"]
        ('qat_model', 'w8a8')
        >>> torch.save({"pytorch-lightning_version": "2.5", "state_dict": {}, "callbacks": {
        ...     "QuantizationAwareTraining": {"plan": {"name": "w4a8", "rules": []}, "observers_frozen": False}}}, path)
        >>> load_qat_checkpoint(path)["kind"], load_qat_checkpoint(path)["plan"]["name"]
        ('lightning', 'w4a8')
        >>> load_qat_checkpoint(path + ".missing")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: checkpoint '...qat_model.pt.missing' does not exist (give a Lightning .ckpt trained with QuantizationAwareTraining, or the qat_model.pt that qat-train wrote)
    """
    if not os.path.isfile(path):
        raise QATConfigError(
            f"checkpoint {path!r} does not exist (give a Lightning .ckpt trained with QuantizationAwareTraining, "
            "or the qat_model.pt that qat-train wrote)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a file that is not a torch checkpoint
        raise QATConfigError(f"checkpoint {path!r} is not a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:300]})") from None
    if isinstance(ckpt, dict) and _is_lightning(ckpt):
        hparams = ckpt.get("hyper_parameters") or {}
        return {"kind": "lightning", "plan": _callback_plan(path, ckpt), "state_dict": ckpt["state_dict"],
                "hyper_parameters": dict(hparams) if isinstance(hparams, dict) else {},
                "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")}
    if not isinstance(ckpt, dict) or not {"plan", "state_dict"} <= set(ckpt):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise QATConfigError(
            f"checkpoint {path!r} is not a qat-train checkpoint: expected keys ['plan', 'state_dict'] (qat_model.pt) or a "
            f"Lightning checkpoint (state_dict, callbacks), got {keys}"
        )
    return {"kind": "qat_model", "plan": ckpt["plan"], "state_dict": ckpt["state_dict"], "hyper_parameters": {}}


def _instantiate_model(node: Any, hparams: dict) -> Any:
    """``node`` instantiated as ``qat-train`` instantiates its ``model``
    (:func:`qat.recipes.config.instantiate_node`: arguments checked against the target, keys the
    shipped ``model`` configs left behind dropped), with the checkpoint's ``hparams`` offered for
    the arguments the target takes and the node does not set."""
    from .config import instantiate_node

    offered = {k: v for k, v in hparams.items() if isinstance(k, str) and k.isidentifier() and not k.startswith("_")}
    return instantiate_node(node, "model", **offered)[0]


def build_quantized_model(model_node: Any, ckpt: dict[str, Any], module_attr: Optional[str] = "auto",
                          fold_bn: bool = False, where: str = "checkpoint") -> tuple[Any, torch.nn.Module, bool, int]:
    """The model of ``model_node`` prepared with the checkpoint's plan and loaded with its state.

    Args:
        model_node: the ``model`` config node (``_target_`` and arguments).
        ckpt: what :func:`load_qat_checkpoint` returns.
        module_attr: the quantized network inside the model (``None``: the model itself; ``"auto"``:
            ``net`` when the model has one, as ``qat-train`` resolves it).
        fold_bn: how the checkpoint was prepared, tried first; the other way is tried if the keys
            do not fit (``QuantConvBn2d`` holds its BatchNorm under ``.bn``).
        where: the checkpoint's name, for messages.

    Returns:
        ``(model, net, fold_bn, float_bytes)``: the model, its quantized network, the ``fold_bn``
        that fit, and the network's float32 size before it was prepared.

    Raises:
        QATConfigError: the checkpoint does not fit the model (keys or shapes), naming both.

    Example::

        >>> from qat import load_plan
        >>> from qat.recipes.digits import DigitsCNN
        >>> net = prepare(DigitsCNN(channels=4), "w8a8", fold_bn=True)
        >>> ckpt = {"kind": "qat_model", "plan": load_plan("w8a8").to_dict(), "state_dict": net.state_dict(), "hyper_parameters": {}}
        >>> node = {"_target_": "qat.recipes.digits.ClassifierModule", "net": {"_target_": "qat.recipes.digits.DigitsCNN", "channels": 4}}
        >>> model, net, folded, float_bytes = build_quantized_model(node, ckpt)
        >>> type(net[0]).__name__, folded, float_bytes
        ('QuantConvBn2d', True, 4304)
    """
    hparams = ckpt.get("hyper_parameters") or {}
    saved_class = hparams.get("_class_path")  # LightningCLI's record of the module's class (never imported from here)
    target = model_node.get("_target_") if hasattr(model_node, "get") else None
    hint = (f"; the checkpoint was saved from {saved_class} (LightningCLI): model._target_={saved_class}"
            if saved_class and saved_class != target else "")
    if model_node is None:
        raise QATConfigError(f"model: give the LightningModule's config (model=<group> or model._target_=<class>){hint}")
    errors = []
    for fold in (bool(fold_bn), not fold_bn):
        try:
            model = _instantiate_model(model_node, hparams)
        except QATConfigError as exc:
            raise QATConfigError(f"{exc}{hint}") from None
        attr = resolve_module_attr(model, module_attr)  # as qat-train: auto is net when the model has one
        net = model if attr is None else getattr(model, attr)
        float_bytes = float_size_bytes(net)
        prepare(net, ckpt["plan"], fold_bn=fold)
        # a Lightning checkpoint holds the LightningModule's state, a qat_model.pt the network's
        into = model if ckpt["kind"] == "lightning" else net
        try:
            missing, unexpected = into.load_state_dict(ckpt["state_dict"], strict=False)
        except RuntimeError as exc:  # shape mismatches
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            errors.append("; ".join(lines[:4]) + (f"; ... ({len(lines) - 4} more)" if len(lines) > 4 else ""))
            continue
        if not missing and not unexpected:
            if fold != bool(fold_bn):
                log.info("%s was prepared with fold_bn=%s", where, fold)
            return model, net, fold, float_bytes
        errors.append(f"missing {list(missing)[:6]}, unexpected {list(unexpected)[:6]}")
    raise QATConfigError(
        f"{where} does not fit the model config: {errors[0]} (another model config, e.g. model.net.channels, "
        f"or module_attr?){hint}"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Load, convert, export; returns (and writes as ``export.json``) paths and sizes.

    Every argument is checked before anything is written (``example_input_shape`` by running the
    model on it); the files are written atomically (:func:`qat.callbacks.export.export_atomically`),
    so a failed export leaves none behind and a re-export replaces the files whole. With
    ``cfg.progress`` on, a bar shows the step in progress.

    Example::

        >>> import os, tempfile
        >>> from hydra import compose, initialize_config_module
        >>> from qat import load_plan, prepare
        >>> from qat.recipes.digits import DigitsCNN
        >>> out = tempfile.mkdtemp()
        >>> net = prepare(DigitsCNN(channels=4), "w8a8")
        >>> _ = net(torch.rand(8, 1, 8, 8))
        >>> torch.save({"plan": load_plan("w8a8").to_dict(), "state_dict": net.state_dict()}, os.path.join(out, "qat_model.pt"))
        >>> register_export_configs()
        >>> with initialize_config_module("qat.configs", version_base="1.3"):
        ...     cfg = compose("export", [f"checkpoint={out}/qat_model.pt", "formats=[safetensors]", "model.net.channels=4"])
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()):     # the result as JSON
        ...     res = run(cfg)
        >>> sorted(res["files"]), res["max_abs_diff_converted_vs_fake_quant"]
        (['safetensors'], 0.0)
    """
    formats = check_formats(cfg.formats)
    shape = check_example_input_shape(cfg.example_input_shape)
    bars = progress_enabled(cfg.get("progress"))
    path = str(cfg.checkpoint)
    with step_bar(["load checkpoint", "prepare and load", "convert", f"write {', '.join(formats)}"], "qat-export",
                  enabled=bars) as step:
        step("load checkpoint")
        ckpt = load_qat_checkpoint(path)
        step("prepare and load")
        model, net, folded, float_bytes = build_quantized_model(cfg.model, ckpt, cfg.module_attr, bool(cfg.fold_bn),
                                                                f"checkpoint {path!r}")
        net.eval()
        freeze_input_observers(net)
        # llama.cpp k-quant weights: GGUF only, written as trained (no convert, no example input)
        kquant = check_kquant_formats(net, formats, "qat-export")
        example = None
        if shape and not kquant:
            example = torch.rand(*shape)
            try:  # a shape the model cannot take fails here, before anything is written
                with torch.no_grad():
                    net(example)
            except Exception as exc:
                raise QATConfigError(
                    f"example_input_shape={shape} does not fit the model ({type(exc).__name__}: {str(exc)[:300]}); "
                    "give the shape of one input batch, e.g. [1, 1, 8, 8] for the digits CNN"
                ) from None
        step("convert")
        out_dir = cfg.output_dir or os.path.dirname(os.path.abspath(path))
        step(f"write {', '.join(formats)}")
        paths, int_model = export_quantized(net, formats, out_dir, example, cfg.gguf_tokenizer_dir, where="qat-export")
    for fmt, p in paths.items():
        log.info("wrote %s (%s)", p, fmt)
    # k-quants have no converted model: their size is the GGUF file's
    int_bytes = None if int_model is None else sum(t.numel() * t.element_size() for t in int_model.state_dict().values())
    plan = ckpt["plan"]
    result = {
        "checkpoint": path,
        "checkpoint_kind": ckpt["kind"],
        "plan": plan.get("name") if isinstance(plan, dict) else str(plan),
        "fold_bn": folded,
        "files": {f: {"path": p, "bytes": os.path.getsize(p)} for f, p in paths.items()},
        "float_bytes": float_bytes,
        "converted_state_bytes": int_bytes,
    }
    if ckpt["kind"] == "lightning":
        result["epoch"], result["global_step"] = ckpt.get("epoch"), ckpt.get("global_step")
    if example is not None and int_model is not None:
        with torch.no_grad():
            result["max_abs_diff_converted_vs_fake_quant"] = float((int_model(example) - net(example)).abs().max())
    write_json(result, os.path.join(out_dir, "export.json"))
    print(json.dumps(result, indent=2))
    return result


def _task(cfg: DictConfig) -> None:
    with missing_extras("qat-export"):  # also when run as python -m qat.recipes.export
        run(cfg)


def main() -> None:
    """Console entry point ``qat-export`` (Hydra app over ``configs/export.yaml``).

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-m", "qat.recipes.export", "--cfg", "job", "checkpoint=x.pt"],
        ...                      capture_output=True, text=True)
        >>> "checkpoint: x.pt" in out.stdout
        True
    """
    register_export_configs()
    hydra.main(version_base="1.3", config_path="../configs", config_name="export")(_task)()


if __name__ == "__main__":
    main()
