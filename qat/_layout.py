"""Keep ``qat.kernels`` / ``qat.callbacks`` / ``qat.recipes`` / ``qat.configs`` importable from a
source checkout whatever installed it.

``pyproject.toml`` maps the top-level folders ``kernels/``, ``callbacks/``, ``recipes/`` and
``configs/`` into the ``qat`` namespace. Wheels and PEP 660 editable installs honour that mapping;
a legacy ``setup.py develop`` install (pip's fallback when an old setuptools builds without
isolation) or ``PYTHONPATH=<checkout>`` only put the checkout on ``sys.path``, where ``qat/`` has
no such subpackages. In that case this finder maps them; and when an editable install of another
checkout maps them (a git worktree run with ``PYTHONPATH``), this checkout's own go first.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_SUBPACKAGES = ("kernels", "callbacks", "recipes", "configs")
_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, sub = fullname.partition(".")
        if prefix != "qat" or sub not in _SUBPACKAGES:
            return None
        init = os.path.join(_ROOT, sub, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[os.path.join(_ROOT, sub)])


def install() -> None:
    """Add the finder if the mapping is missing and the source tree is there (idempotent)."""
    if any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        return
    if not os.path.isfile(os.path.join(_ROOT, "kernels", "__init__.py")):
        return
    found = importlib.util.find_spec("qat.kernels")
    if found is None:
        sys.meta_path.append(_SourceTreeFinder())
    elif found.origin and not os.path.abspath(found.origin).startswith(os.path.join(_ROOT, "")):
        # an editable install of another checkout (a git worktree run with PYTHONPATH=<this checkout>):
        # its mapping would pair this qat/ with that checkout's kernels/, so this tree's goes first
        sys.meta_path.insert(0, _SourceTreeFinder())
    # else a wheel or a PEP 660 editable install of this checkout: the mapping works
