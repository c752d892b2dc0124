"""Files the recipes write all at once or not at all: each goes to a temporary name in its own
directory first and is renamed into place (``os.replace``), so a crash, a kill or an error never
leaves a half-written ``results.json``, ``qat_model.pt``, summary or checkpoint behind."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["atomic_path", "write_json", "save_torch", "check_checkpoint_file"]


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on an error removed.

    Example::

        >>> import os, tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
        >>> with atomic_path(target) as tmp:
        ...     _ = open(tmp, "w").write("done")
        >>> open(target).read()
        'done'
        >>> try:
        ...     with atomic_path(target) as tmp:
        ...         _ = open(tmp, "w").write("half")
        ...         raise RuntimeError("killed")
        ... except RuntimeError:
        ...     pass
        >>> open(target).read(), sorted(os.listdir(os.path.dirname(target)))
        ('done', ['out.txt'])
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj: Any, path: str) -> None:
    """``json.dump(obj)`` to ``path``, atomically (indent 2).

    Example::

        >>> import json, os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "results.json")
        >>> write_json({"a": 1}, p)
        >>> json.load(open(p))
        {'a': 1}
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)


def save_torch(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path``, atomically.

    Example::

        >>> import os, tempfile, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "qat_model.pt")
        >>> save_torch({"x": torch.ones(2)}, p)
        >>> torch.load(p, weights_only=True)["x"].tolist()
        [1.0, 1.0]
    """
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_checkpoint_file(path: str, key: str = "resume") -> str:
    """``path`` if it is a complete PyTorch checkpoint file (a zip archive whose members all read back).

    Raises:
        QATConfigError: naming ``key`` and the file: missing, empty, or truncated / not a checkpoint.

    Example::

        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "last.ckpt")
        >>> open(p, "wb").close()
        >>> check_checkpoint_file(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: resume: checkpoint '...last.ckpt' is empty (0 bytes); ...
    """
    import zipfile

    from qat import QATConfigError

    hint = "delete it to restart that stage, or start a new run"
    if not os.path.isfile(path):
        raise QATConfigError(f"{key}: checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise QATConfigError(f"{key}: checkpoint {path!r} is empty (0 bytes); {hint}")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise QATConfigError(f"{key}: checkpoint {path!r} is truncated or not a PyTorch checkpoint ({exc}); {hint}") from None
    if bad is not None:
        raise QATConfigError(f"{key}: checkpoint {path!r} is corrupt (member {bad!r} fails its CRC); {hint}")
    return path
