"""Block-wise reconstruction (BRECQ-style, Li et al. 2021): post-training fitting of a prepared
model's blocks, one at a time, to the float model's block outputs.

For each block, in order, the student block (fake-quantized weights and inputs, learned scales)
gets the input that the already-fitted student blocks produce, and its weights and quantizer
parameters are trained by Adam to reproduce the float block's output on the float model's own
input. Errors are therefore corrected where they arise instead of end to end, on a few hundred
calibration samples, without labels or a training loop. The result lives in the prepared model
(weights and scales changed in place), so evaluation, QAT from there, ``convert`` and export all
see it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from .errors import QATConfigError
from .ptq import default_forward, move_batch

__all__ = ["reconstruct"]


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


def _capture(model: nn.Module, module: nn.Module, batches: list, forward_fn: Callable) -> list:
    """``(args, kwargs)`` that ``module`` receives for each batch when ``model`` runs it."""
    got: list = []

    class _Stop(Exception):
        pass

    def pre(mod, args, kwargs):
        got.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))
        raise _Stop  # nothing after this block is needed

    h = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    forward_fn(model, b)
                except _Stop:
                    pass
    finally:
        h.remove()
    if len(got) != len(batches):
        raise QATConfigError(f"reconstruct: the first block was called {len(got)} times for {len(batches)} batches")
    return got


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    blocks: Sequence[str],
    batches: Iterable,
    iters: int = 400,
    lr: float = 1e-4,
    scale_lr: float = 1e-5,
    forward_fn: Callable[[nn.Module, Any], Any] = default_forward,
    weight_fn: Optional[Callable[[Any], torch.Tensor]] = None,
    seed: int = 0,
) -> list[float]:
    """Fit ``student``'s ``blocks`` one after another to ``teacher``'s (block-wise reconstruction).

    The blocks must run in the given order, each taking the previous one's output as its first
    argument (transformer layers, residual stages); their other arguments (attention masks, ...)
    are taken from the teacher's call of the first block. Each block is trained for ``iters`` Adam
    steps (one calibration batch a step, cosine decay) on the mean squared error to the teacher
    block's output; every batch is kept in memory (inputs and targets of one block at a time).

    Args:
        student: a ``qat.prepare``-d copy of ``teacher`` with calibrated observers.
        teacher: the float model (left unchanged).
        blocks: names of the blocks in ``named_modules()`` (the same in both models), in order.
        batches: calibration batches (a list or DataLoader), as ``forward_fn`` takes them.
        iters: Adam steps per block.
        lr / scale_lr: learning rates of the weights (all non-quantizer parameters) and of the
            quantizers' learned scales / offsets.
        forward_fn: how a batch runs through a model (default: ``model(x)`` / ``model(**batch)``).
        weight_fn: ``batch -> tensor`` broadcastable to a block's output, weighting the squared
            error (e.g. the attention mask ``(B, T, 1)`` so padding tokens count for nothing).
        seed: seed of the batch order.

    Returns:
        each block's mean squared error to the teacher after fitting, over all batches.

    Raises:
        QATConfigError: a block name not in the model, no blocks, no batches, or ``iters < 1``.

    Example::

        student = prepare(copy.deepcopy(bert), QuantPlan.preset("w4a8_g32"))
        calibrate(student, calib, forward_fn=lambda m, b: m(**b))
        reconstruct(student, bert, [f"encoder.layer.{i}" for i in range(6)], calib,
                    forward_fn=lambda m, b: m(**b),
                    weight_fn=lambda b: b["attention_mask"].unsqueeze(-1).float())
    """
    batches = list(batches)
    if not blocks:
        raise QATConfigError("reconstruct: `blocks` is empty; name the blocks to fit, e.g. ['encoder.layer.0', ...]")
    if not batches:
        raise QATConfigError("reconstruct: no calibration batches")
    if iters < 1:
        raise QATConfigError(f"reconstruct: iters must be >= 1, got {iters}")
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    for name in blocks:
        if name not in s_mods or name not in t_mods:
            valid = [n for n, m in t_mods.items() if n and len(list(m.children())) > 0][:12]
            raise QATConfigError(f"reconstruct: no block named {name!r}; block-like modules are e.g. {valid}")
    device = next(student.parameters()).device
    batches = [move_batch(b, device) for b in batches]
    weights = [None if weight_fn is None else weight_fn(b) for b in batches]
    calls = _capture(teacher, t_mods[blocks[0]], batches, forward_fn)
    t_in = [a[0] for a, _ in calls]
    s_in = list(t_in)
    g = torch.Generator().manual_seed(seed)
    was_training = student.training
    student.eval()
    teacher.eval()

    def mse(y, t, w):
        d = (y - t).pow(2)
        return d.mean() if w is None else (d * w).sum() / (w.expand_as(d).sum().clamp(min=1))

    errors = []
    for name in blocks:
        s_blk, t_blk = s_mods[name], t_mods[name]
        with torch.no_grad():
            t_out = [_out(t_blk(x, *a[1:], **kw)) for x, (a, kw) in zip(t_in, calls)]
        scales = [p for n, p in s_blk.named_parameters() if p.requires_grad and "quantizer" in n]
        ids = {id(p) for p in scales}
        params = [p for p in s_blk.parameters() if p.requires_grad and id(p) not in ids]
        groups = ([{"params": params, "lr": lr}] if params else []) + ([{"params": scales, "lr": scale_lr}] if scales else [])
        if groups:
            opt = torch.optim.Adam(groups)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
            for _ in range(iters):
                i = int(torch.randint(len(batches), (1,), generator=g))
                a, kw = calls[i]
                loss = mse(_out(s_blk(s_in[i], *a[1:], **kw)), t_out[i], weights[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            s_out = [_out(s_blk(x, *a[1:], **kw)) for x, (a, kw) in zip(s_in, calls)]
            errors.append(float(sum(mse(y, t, w) for y, t, w in zip(s_out, t_out, weights)) / len(batches)))
        s_in, t_in = s_out, t_out
    student.train(was_training)
    return errors
