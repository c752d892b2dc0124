"""Progress bars for the long steps of the recipes: calibration (the PTQ observer pass), GPTQ's
calibration pass, layer sensitivity and block-wise reconstruction.

The bars are ``tqdm``'s (a dependency of ``pytorch-lightning``, so of every install; Lightning's
own training bar is one too), written to stderr. The core functions of ``qat`` stay free of any
progress code: the bars here wrap what those functions already take (the batches, the ``eval_fn``)
or watch the modules they run (forward hooks), so the numbers are the same with or without bars.

Whether bars show is :func:`progress_enabled`: ``progress=true`` / ``false`` from the command line,
or by default (``null``) only when stderr is a terminal and not under pytest, so logs, CI and test
output get no carriage-return noise.

    qat-ptq                           # bars on a terminal, none in a log file
    qat-ptq progress=false            # never
    qat-ptq progress=true 2> run.log  # always (the bars go to stderr)
"""

from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from qat import QATConfigError

__all__ = [
    "progress_enabled", "track", "counting", "calibrate", "gptq", "layer_sensitivity", "reconstruct", "step_bar",
]


def progress_enabled(setting: Any = None, stream: Any = None) -> bool:
    """Whether the recipes draw progress bars.

    Args:
        setting: the ``progress`` config key: ``true`` / ``false``, or ``null`` / ``"auto"``: on
            when ``stream`` is a terminal and the process is not a pytest test.
        stream: where the bars go (default ``sys.stderr``).

    Raises:
        QATConfigError: any other value, naming the key and the valid choices.

    Example::

        >>> progress_enabled(True), progress_enabled(False)
        (True, False)
        >>> import io
        >>> progress_enabled(None, stream=io.StringIO())     # not a terminal: off
        False
        >>> progress_enabled("yes")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: progress must be true, false or null (auto: on when stderr is a terminal), got 'yes'
    """
    if isinstance(setting, bool):
        return setting
    if setting is None or setting == "auto":
        stream = sys.stderr if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty()) and "PYTEST_CURRENT_TEST" not in os.environ
    raise QATConfigError(f"progress must be true, false or null (auto: on when stderr is a terminal), got {setting!r}")


def _bar(description: str, total: Optional[int], enabled: bool, unit: str = "it") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=not enabled, leave=True, dynamic_ncols=True,
                mininterval=0.25, file=sys.stderr)


def _length(items: Any, limit: Optional[int]) -> Optional[int]:
    try:
        n = len(items)
    except TypeError:
        return limit
    return n if limit is None else min(n, limit)


def track(items: Iterable[Any], description: str, total: Optional[int] = None, enabled: bool = True,
          unit: str = "batch") -> Iterator[Any]:
    """``items``, one by one, advancing a bar; the bar closes when the loop stops (also early).

    Args:
        items: any iterable (a DataLoader, a list of batches).
        description: the bar's label.
        total: the bar's length (default ``len(items)`` when it has one).
        enabled: ``False``: no bar, the items only.

    Example::

        >>> list(track(range(3), "calibration", enabled=False))
        [0, 1, 2]
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     seen = list(track(range(4), "calibration", enabled=True))
        >>> seen, "calibration" in err.getvalue() and "4/4" in err.getvalue()
        ([0, 1, 2, 3], True)
    """
    bar = _bar(description, total if total is not None else _length(items, None), enabled, unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


@contextmanager
def counting(fn: Callable[..., Any], description: str, total: Optional[int] = None, enabled: bool = True,
             unit: str = "it") -> Iterator[Callable[..., Any]]:
    """``fn``, wrapped so that each call advances a bar (for callables a core function calls once a
    step, such as ``layer_sensitivity``'s ``eval_fn``).

    Example::

        >>> with counting(lambda x: 2 * x, "evaluations", total=2, enabled=False) as double:
        ...     double(1), double(2)
        (2, 4)
    """
    bar = _bar(description, total, enabled, unit)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        bar.update(1)
        return out

    try:
        yield wrapped
    finally:
        bar.close()


@contextmanager
def step_bar(steps: Sequence[str], description: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A bar over named steps of one job (load, convert, write, ...): call the yielded function
    with each step's name as it starts; the bar shows the step in progress.

    Example::

        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     with step_bar(["load", "convert"], "qat-export") as step:
        ...         step("load"); step("convert")
        >>> "qat-export" in err.getvalue() and "2/2" in err.getvalue()
        True
    """
    bar = _bar(description, len(steps), enabled, "step")
    started = [False]

    def step(name: str) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(name)

    try:
        yield step
        if started[0]:
            bar.update(1)
    finally:
        bar.close()


def calibrate(model: torch.nn.Module, batches: Iterable[Any], num_batches: Optional[int] = None,
              enabled: bool = True, description: str = "calibration", **kwargs: Any) -> int:
    """:func:`qat.ptq.calibrate` (the static PTQ observer pass) with a bar over the batches.

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(4, 4)), "w8a8")
        >>> calibrate(model, [(torch.randn(8, 4),)] * 5, num_batches=3, enabled=False)
        3
    """
    from qat.ptq import calibrate as _calibrate

    total = _length(batches, num_batches)
    return _calibrate(model, track(batches, description, total, enabled), num_batches=num_batches, **kwargs)


def gptq(model: torch.nn.Module, calibration: Iterable[Any], num_batches: Optional[int] = None,
         enabled: bool = True, **kwargs: Any) -> dict[str, float]:
    """:func:`qat.gptq.gptq` with a bar over its calibration pass (the batches its Hessians come
    from; the per-layer solves that follow are one call of the core and not counted).

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> model = prepare(nn.Sequential(nn.Linear(64, 32)), {"rules": [{"match": "*", "weight": {"bits": 4}}]})
        >>> sorted(gptq(model, [torch.randn(128, 64)], enabled=False))
        ['0']
    """
    from qat.gptq import gptq as _gptq

    total = _length(calibration, num_batches)
    return _gptq(model, track(calibration, "GPTQ calibration", total, enabled), num_batches=num_batches, **kwargs)


def layer_sensitivity(model: torch.nn.Module, plan: Any, calibration: Iterable[Any],
                      eval_fn: Callable[[torch.nn.Module], float], num_batches: Optional[int] = None,
                      enabled: bool = True, **kwargs: Any) -> list:
    """:func:`qat.sensitivity.layer_sensitivity` with a bar over its calibration batches and one
    over its evaluations (the float baseline, then one a quantized layer).

    Example::

        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 8), None)] * 2
        >>> ev = lambda m: -float((m(data[0][0]) - model(data[0][0])).pow(2).mean())
        >>> sorted(r.name for r in layer_sensitivity(model, "w2a2", data, ev, enabled=False))
        ['0', '2']
    """
    from qat import load_plan, prepare
    from qat.prepare import quant_layers
    from qat.sensitivity import layer_sensitivity as _sensitivity

    n_layers = sum(1 for _ in quant_layers(prepare(copy.deepcopy(model), load_plan(plan))))
    total = _length(calibration, num_batches)
    with counting(eval_fn, "sensitivity", total=n_layers + 1, enabled=enabled, unit="eval") as ev:
        return _sensitivity(model, plan, track(calibration, "sensitivity calibration", total, enabled), ev,
                            num_batches=num_batches, **kwargs)


def reconstruct(student: torch.nn.Module, teacher: torch.nn.Module, blocks: Sequence[str], batches: Iterable[Any],
                iters: int = 400, enabled: bool = True, **kwargs: Any) -> list[float]:
    """:func:`qat.reconstruct.reconstruct` with a bar over every block's Adam steps
    (``len(blocks) * iters``), counted by a forward hook on each student block (a step is a call
    with gradients on; the no-gradient passes around it are not counted).

    Example::

        >>> import torch.nn as nn
        >>> from qat import prepare
        >>> from qat.ptq import calibrate as plain_calibrate
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
        >>> data = [torch.randn(4, 8) for _ in range(2)]
        >>> q = prepare(copy.deepcopy(model), "w8a8")
        >>> _ = plain_calibrate(q, data)
        >>> len(reconstruct(q, model, ["0", "1"], data, iters=3, enabled=False))
        2
    """
    from qat.reconstruct import reconstruct as _reconstruct

    mods = dict(student.named_modules())
    with _bar("reconstruction", len(blocks) * iters, enabled, "step") as bar:
        def hook(_module: Any, _args: Any, _out: Any) -> None:
            if torch.is_grad_enabled():
                bar.update(1)

        handles = [mods[name].register_forward_hook(hook) for name in blocks if name in mods]
        try:
            return _reconstruct(student, teacher, blocks, batches, iters=iters, **kwargs)
        finally:
            for h in handles:
                h.remove()
