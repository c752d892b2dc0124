"""Keep ``qat.kernels`` / ``qat.callbacks`` / ``qat.recipes`` / ``qat.configs`` importable from a
source checkout whatever installed it.

``pyproject.toml`` maps the top-level folders ``kernels/``, ``callbacks/``, ``recipes/`` and
``configs/`` into the ``qat`` namespace. Wheels and PEP 660 editable installs honour that mapping;
a legacy ``setup.py develop`` install (pip's fallback when an old setuptools builds without
isolation) or ``PYTHONPATH=<checkout>`` only put the checkout on ``sys.path``, where ``qat/`` has
no such subpackages. In that case this finder maps them, and only then.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_SUBPACKAGES = ("kernels", "callbacks", "recipes", "configs")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    if importlib.util.find_spec("qat.kernels") is not None:
        return  # a wheel or a PEP 660 editable install: the mapping works
    if os.path.isfile(os.path.join(_ROOT, "kernels", "__init__.py")):
        sys.meta_path.append(_SourceTreeFinder())
