"""`prepare`: swap a model's layers for their fake-quantized twins, per a plan; and the switches
the lifecycle uses (observers, fake quant, BatchNorm statistics)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator, Mapping, Union

import torch.nn as nn

from .errors import QATConfigError
from .fake_quant import FakeQuantizer
from .modules import QuantModuleMixin, layer_type
from .plan import QuantPlan, load_plan

__all__ = [
    "prepare",
    "unprepare",
    "is_prepared",
    "quant_layers",
    "quantizers",
    "init_weight_quantizers",
    "enable_observers",
    "enable_fake_quant",
    "freeze_bn_stats",
]

if TYPE_CHECKING:
    from .smooth import SmoothingLike

PlanLike = Union[str, os.PathLike, Mapping, QuantPlan]


def prepare(model: nn.Module, plan: PlanLike, fold_bn: bool = False, smooth: "SmoothingLike" = None) -> nn.Module:
    """Replace each layer the plan names by its fake-quantized twin, in place.

    Args:
        model: any ``nn.Module``.
        plan: a preset name (``"w4a8"``), a YAML path, a dict / DictConfig, or a :class:`QuantPlan`.
        fold_bn: fold each BatchNorm2d that directly follows a quantized Conv2d into its weight
            before weight fake-quant (:func:`qat.bn_fold.fuse_conv_bn`).
        smooth: per-input-channel smoothing of the quantized Linear layers
            (:class:`qat.smooth.SmoothingSpec`, or what :meth:`~qat.smooth.SmoothingSpec.parse`
            takes: an ``alpha``, a mapping of ``alpha`` / ``match`` / ``learnable``); ``None``:
            off. The matched layers get identity factors now (:func:`qat.init_smoothing`: the
            parameters exist before an optimizer is built) and the spec is kept as
            ``model.qat_smoothing``; :func:`qat.smooth.fit_smoothing` then sets the factors
            from calibration batches.

    Returns:
        ``model`` itself, with ``model.qat_plan`` (the :class:`QuantPlan`) and ``model.qat_layers``
        (qualified name -> :class:`LayerQuant`) set.

    Raises:
        QATConfigError: the plan or ``smooth`` is invalid for this model, or the model is already
            prepared.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> prepare(model, "w4a8")[0].__class__.__name__
        'QuantLinear'
        >>> smoothed = prepare(nn.Sequential(nn.Linear(8, 4)), "w4a8", smooth={"alpha": 0.5})
        >>> smoothed.qat_smoothing, smoothed[0].input_smooth.shape
        (SmoothingSpec(alpha=0.5, match='*', learnable=False), torch.Size([8]))
    """
    if is_prepared(model):
        raise QATConfigError("model is already prepared for QAT (it holds quantized layers); prepare it once")
    smoothing = None
    if smooth is not None:
        from .smooth import SmoothingSpec  # smooth imports this module; keep the imports acyclic

        smoothing = SmoothingSpec.parse(smooth, "prepare: smooth")  # a bad spec fails before the model changes
    plan = load_plan(plan)
    resolved = plan.resolve(model)
    for name, lq in resolved.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        float_mod = getattr(parent, child)
        setattr(parent, child, layer_type(float_mod).quant.from_float(float_mod, lq))
    model.qat_plan = plan
    model.qat_layers = resolved
    if fold_bn:
        from .bn_fold import fuse_conv_bn  # bn_fold imports modules; keep this module's imports acyclic

        fuse_conv_bn(model)
    if smoothing is not None:
        from .smooth import init_smoothing

        init_smoothing(model, smoothing.match, learnable=smoothing.learnable)
        model.qat_smoothing = smoothing
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare`: every quantized layer back to its float layer (same parameters)."""
    for name, mod in list(quant_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod.to_float())
    for attr in ("qat_plan", "qat_layers", "qat_smoothing"):
        model.__dict__.pop(attr, None)
    return model


def is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, QuantModuleMixin) for m in model.modules())


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantModuleMixin]]:
    """``(qualified name, layer)`` for every fake-quantized layer."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModuleMixin):
            yield name, mod


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    """``(qualified name, FakeQuantizer)`` for every quantizer in the model."""
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizer):
            yield name, mod


def init_weight_quantizers(model: nn.Module) -> int:
    """Initialize every weight quantizer that is not yet from its current weight
    (:meth:`qat.QuantModuleMixin.init_weight_quantizer`); returns how many hold a range.

    Run it after the weights are final (loaded, on their device) and before ``torch.compile`` traces
    the first step: a learned weight scale (LSQ, LSQ+, PACT) otherwise initializes inside the first
    step, and the compiled graph that branches on it is compiled again at the second. The
    :class:`~qat.callbacks.QuantizationAwareTraining` callback runs it at the start of fit.

    Example::

        >>> import torch.nn as nn
        >>> from qat import LayerRule, QuantPlan, prepare
        >>> plan = QuantPlan([LayerRule(weight={"bits": 4, "estimator": "lsq"})])
        >>> model = prepare(nn.Sequential(nn.Linear(8, 8)), plan)
        >>> init_weight_quantizers(model), model[0].weight_quantizer.is_initialized
        (1, True)
    """
    return sum(layer.init_weight_quantizer() for _, layer in quant_layers(model))


def enable_observers(model: nn.Module, enabled: bool = True) -> None:
    for _, q in quantizers(model):
        q.enable_observer(enabled)


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> None:
    for _, q in quantizers(model):
        q.enable_fake_quant(enabled)


def freeze_bn_stats(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics frozen); returns how many.

    ``Module.train()`` undoes this, so a training loop calls it again after each ``train()``.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n
