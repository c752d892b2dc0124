"""Post-training quantization: calibrate a prepared model's observers on data, without training."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from .prepare import quantizers

__all__ = ["calibrate", "default_forward", "float_pass", "move_batch"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run one batch through ``model`` the way data loaders usually lay batches out.

    ``(x, y, ...)`` -> ``model(x)``; a mapping (a dict, a tokenizer's ``BatchEncoding``) ->
    ``model(**batch)``; anything else -> ``model(batch)``. The default ``forward_fn`` of
    :func:`calibrate`, :func:`qat.smooth_inputs` and :class:`qat.callbacks.QuantizationAwareTraining`.

    Args:
        model: the module.
        batch: one batch.

    Returns:
        what ``model`` returns.

    Example::

        >>> import torch.nn as nn
        >>> default_forward(nn.Identity(), (torch.ones(2), torch.zeros(2)))
        tensor([1., 1.])
        >>> default_forward(lambda input: input * 2, {"input": torch.ones(1)})
        tensor([2.])
    """
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: Optional[int] = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    device: Optional[torch.device] = None,
) -> int:
    """Static PTQ calibration: run batches through a prepared model with observers on.

    The model runs in eval mode (BatchNorm statistics untouched) without gradients; afterwards
    every quantizer takes its scale / zero point (or PACT clip) from what its observer saw, and
    observers are switched off, so the model is a fixed post-training-quantized model.

    Args:
        model: a model returned by :func:`qat.prepare`.
        batches: an iterable of batches (a DataLoader).
        num_batches: stop after this many (all if None).
        forward_fn: how a batch runs through the model.
        device: move tensor batches here first (default: the model's device).

    Returns:
        the number of batches seen.

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(4, 4)), "w8a8")
        >>> calibrate(model, [(torch.randn(8, 4), None)] * 3)
        3
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    qs = [q for _, q in quantizers(model)]
    for q in qs:
        q.enable_observer(True)
    seen = 0
    for batch in batches:
        if num_batches is not None and seen >= num_batches:
            break
        forward_fn(model, move_batch(batch, device))
        seen += 1
    for q in qs:
        q.load_from_observer()
        q.enable_observer(False)
    model.train(was_training)
    return seen


@torch.no_grad()
def float_pass(
    model: nn.Module,
    batches: Iterable[Any],
    pre_hooks: Iterable[tuple[nn.Module, Callable]],
    quantizers_off: Iterable[Any],
    num_batches: Optional[int] = None,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
) -> int:
    """Run ``batches`` through ``model`` (eval mode, no gradients) with the ``quantizers_off``
    switched off (no fake quantization, no observing) and each ``(module, hook)`` of ``pre_hooks``
    registered as a forward pre-hook: how GPTQ and smoothing read the layers' float inputs. Flags,
    hooks and the train / eval mode are restored afterwards, also on an error.

    Returns:
        the number of batches run.

    Example::

        >>> import torch, torch.nn as nn
        >>> from qat import prepare, quantizers
        >>> model = prepare(nn.Sequential(nn.Linear(4, 2)), "w8a8")
        >>> seen = []
        >>> hook = lambda module, args: seen.append(args[0].shape)
        >>> float_pass(model, [torch.randn(3, 4)], [(model[0], hook)], [q for _, q in quantizers(model)])
        1
        >>> seen
        [torch.Size([3, 4])]
    """
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    states = [(q, q.flag("fake_quant_enabled"), q.flag("observer_enabled")) for q in quantizers_off]
    handles = [m.register_forward_pre_hook(h) for m, h in pre_hooks]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for q, _, _ in states:
            q.enable_fake_quant(False)
            q.enable_observer(False)
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            forward_fn(model, move_batch(batch, device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for q, fq_on, obs_on in states:
            q.enable_fake_quant(fq_on)
            q.enable_observer(obs_on)
        model.train(was_training)
    return seen


def move_batch(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested lists, tuples, dicts) moved to ``device``.

    Example::

        >>> move_batch({"x": [torch.zeros(1)], "n": 3}, torch.device("cpu"))
        {'x': [tensor([0.])], 'n': 3}
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch
