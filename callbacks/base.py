"""The callback base of lightning-qat, built from every installed Lightning namespace.

Lightning ships under two names: ``pytorch_lightning`` and the unified ``lightning`` package
(``lightning.pytorch``). They are separate class hierarchies: a ``lightning.pytorch.Trainer`` (and
``LightningCLI`` from ``lightning.pytorch.cli``) refuses a ``pytorch_lightning.Callback`` and the
other way round. :class:`Callback` here subclasses the ``Callback`` of each installed namespace
(both when both are installed), so every qat callback passes the ``isinstance`` checks of either
Trainer and CLI. The hooks are looked up once by name on the instance, so each runs exactly once.

* :data:`CALLBACK_BASES`: the installed ``Callback`` classes, ``pytorch_lightning`` first.
* :data:`LIGHTNING_MODULE_BASES` / :data:`TRAINER_BASES`: the same for ``LightningModule`` /
  ``Trainer``, for ``isinstance`` checks that accept either namespace.
* :func:`is_lightning_module`: ``isinstance`` against every installed ``LightningModule``.

Example::

    >>> import pytorch_lightning
    >>> from qat.callbacks.base import CALLBACK_BASES, Callback
    >>> pytorch_lightning.Callback in CALLBACK_BASES and issubclass(Callback, pytorch_lightning.Callback)
    True
    >>> all(issubclass(Callback, base) for base in CALLBACK_BASES)
    True
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CALLBACK_BASES", "LIGHTNING_MODULE_BASES", "TRAINER_BASES", "NAMESPACES", "Callback", "is_lightning_module"]


def _namespaces() -> tuple[Any, ...]:
    found = []
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError(
            "qat.callbacks needs Lightning: pip install pytorch-lightning (or lightning); the core `qat` package works without it"
        )
    return tuple(found)


#: the installed Lightning namespaces (``pytorch_lightning``, ``lightning.pytorch``), as modules
NAMESPACES: tuple[Any, ...] = _namespaces()
#: the ``Callback`` class of each installed namespace
CALLBACK_BASES: tuple[type, ...] = tuple(ns.Callback for ns in NAMESPACES)
#: the ``LightningModule`` class of each installed namespace
LIGHTNING_MODULE_BASES: tuple[type, ...] = tuple(ns.LightningModule for ns in NAMESPACES)
#: the ``Trainer`` class of each installed namespace
TRAINER_BASES: tuple[type, ...] = tuple(ns.Trainer for ns in NAMESPACES)


def is_lightning_module(obj: Any) -> bool:
    """Whether ``obj`` is a ``LightningModule`` of any installed namespace.

    Example::

        >>> import torch
        >>> is_lightning_module(torch.nn.Linear(2, 2))
        False
    """
    return isinstance(obj, LIGHTNING_MODULE_BASES)


# One class whose bases are every installed namespace's Callback. Their hooks are all no-ops with
# the same names, so the MRO picks the first; a subclass's overrides win over all of them.
Callback = type("Callback", CALLBACK_BASES, {"__module__": __name__, "__qualname__": "Callback", "__doc__": (
    "Base of the qat callbacks: a ``Callback`` of every installed Lightning namespace "
    "(``pytorch_lightning`` and / or ``lightning.pytorch``)."
)})
