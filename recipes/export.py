"""``qat-export``: a trained quantized model -> packed safetensors / ONNX / GGUF.

Nothing is trained: the float architecture comes from the ``model`` config group, the weights and
the plan from ``checkpoint`` (the ``qat_model.pt`` that ``qat-train`` writes: ``{plan, state_dict}``
of the quantized network), then ``qat.convert`` and the writers of :mod:`qat.export`.

    qat-export checkpoint=outputs/2026-11-22/14-41-39/qat_model.pt
    qat-export checkpoint=... formats=[safetensors,onnx,gguf] output_dir=exported
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from qat import QATConfigError, convert, prepare, quantizers
from qat.callbacks.export import export_atomically
from qat.export.formats import FORMATS, check_formats, export_formats

from .atomic import write_json
from qat.size import float_size_bytes

__all__ = ["ExportConfig", "FORMATS", "check_example_input_shape", "freeze_input_observers", "main", "run", "load_qat_checkpoint", "export_formats", "register_export_configs"]

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    """The top level of ``configs/export.yaml`` (``export_schema``).

    Example::

        >>> ExportConfig(checkpoint="run1/qat_model.pt").formats
        ['safetensors', 'onnx']
    """

    model: Any = None
    checkpoint: str = "???"
    formats: list = field(default_factory=lambda: ["safetensors", "onnx"])
    output_dir: Optional[str] = None
    module_attr: Optional[str] = "net"  # the quantized network inside the instantiated model; null: the model itself
    fold_bn: bool = False  # the checkpoint was trained with prepare(..., fold_bn=True)
    example_input_shape: list = field(default_factory=lambda: [1, 1, 8, 8])  # ONNX tracing input (float)
    gguf_tokenizer_dir: Optional[str] = None


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


def load_qat_checkpoint(path: str) -> dict[str, Any]:
    """``{plan, state_dict}`` from a ``qat_model.pt``, with clear errors for anything else.

    Raises:
        QATConfigError: the file is missing, not a PyTorch checkpoint, or not ``{plan, state_dict}``.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "qat_model.pt")
        >>> torch.save({"plan": {"name": "w8a8", "rules": []}, "state_dict": {}}, path)
        >>> sorted(load_qat_checkpoint(path))
        ['plan', 'state_dict']
        >>> load_qat_checkpoint(path + ".missing")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: checkpoint '...qat_model.pt.missing' does not exist (give the qat_model.pt that qat-train wrote)
    """
    if not os.path.isfile(path):
        raise QATConfigError(f"checkpoint {path!r} does not exist (give the qat_model.pt that qat-train wrote)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of a file that is not a torch checkpoint
        raise QATConfigError(f"checkpoint {path!r} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or not {"plan", "state_dict"} <= set(ckpt):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise QATConfigError(f"checkpoint {path!r} is not a qat-train checkpoint: expected keys ['plan', 'state_dict'], got {keys}")
    return ckpt


def run(cfg: DictConfig) -> dict[str, Any]:
    """Load, convert, export; returns (and writes as ``export.json``) paths and sizes.

    Every argument is checked before anything is written (``example_input_shape`` by running the
    model on it); the files are written atomically (:func:`qat.callbacks.export.export_atomically`),
    so a failed export leaves none behind and a re-export replaces the files whole.

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
    ckpt = load_qat_checkpoint(str(cfg.checkpoint))
    model = instantiate(cfg.model)
    net = model
    if cfg.module_attr:
        if not hasattr(model, cfg.module_attr):
            raise QATConfigError(f"module_attr={cfg.module_attr!r}: the instantiated model ({type(model).__name__}) has no such attribute")
        net = getattr(model, cfg.module_attr)
    float_bytes = float_size_bytes(net)
    kwargs = {"fold_bn": True} if cfg.fold_bn else {}
    prepare(net, ckpt["plan"], **kwargs)
    try:
        missing, unexpected = net.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise QATConfigError(f"checkpoint {cfg.checkpoint!r} does not fit the model config: {str(exc)[:400]}") from None
    if missing or unexpected:
        raise QATConfigError(
            f"checkpoint {cfg.checkpoint!r} does not fit the model config: missing {missing[:6]}, unexpected {unexpected[:6]} "
            "(another model config, or fold_bn?)"
        )
    net.eval()
    freeze_input_observers(net)
    example = None
    if shape:
        example = torch.rand(*shape)
        try:  # a shape the model cannot take fails here, before anything is written
            with torch.no_grad():
                net(example)
        except Exception as exc:
            raise QATConfigError(
                f"example_input_shape={shape} does not fit the model ({type(exc).__name__}: {str(exc)[:300]}); "
                "give the shape of one input batch, e.g. [1, 1, 8, 8] for the digits CNN"
            ) from None
    int_model = convert(net)
    out_dir = cfg.output_dir or os.path.dirname(os.path.abspath(str(cfg.checkpoint)))
    paths = export_atomically(int_model, formats, out_dir, example, cfg.gguf_tokenizer_dir)
    for fmt, path in paths.items():
        log.info("wrote %s (%s)", path, fmt)
    int_bytes = sum(t.numel() * t.element_size() for t in int_model.state_dict().values())
    result = {
        "checkpoint": str(cfg.checkpoint),
        "plan": ckpt["plan"].get("name") if isinstance(ckpt["plan"], dict) else str(ckpt["plan"]),
        "files": {f: {"path": p, "bytes": os.path.getsize(p)} for f, p in paths.items()},
        "float_bytes": float_bytes,
        "converted_state_bytes": int_bytes,
    }
    if example is not None:
        with torch.no_grad():
            result["max_abs_diff_converted_vs_fake_quant"] = float((int_model(example) - net(example)).abs().max())
    write_json(result, os.path.join(out_dir, "export.json"))
    print(json.dumps(result, indent=2))
    return result


def _task(cfg: DictConfig) -> None:
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
