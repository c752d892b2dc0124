"""Progress bars for the long steps of the recipes: calibration (the PTQ observer pass) and
qat-export's steps.

The bars are ``tqdm``'s (a dependency of ``pytorch-lightning``, so of every install; Lightning's
own training bar is one too), written to stderr. The core functions of ``qat`` stay free of any
progress code: the bars here wrap what those functions already take (the batches), so the numbers
are the same with or without bars.

Whether bars show is :func:`progress_enabled`: ``progress=true`` / ``false`` from the command line,
or by default (``null``) only when stderr is a terminal and not under pytest, so logs, CI and test
output get no carriage-return noise.

    qat-ptq                           # bars on a terminal, none in a log file
    qat-ptq progress=false            # never
    qat-ptq progress=true 2> run.log  # always (the bars go to stderr)
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from qat import QATConfigError

__all__ = ["progress_enabled", "track", "calibrate", "step_bar"]


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
