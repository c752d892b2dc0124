"""Every ``>>>`` example in the package's docstrings runs, and prints what it says.

The modules are found by walking the installed ``qat`` package (core, kernels, callbacks, recipes),
so a new module's examples are collected without being listed here.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

def _walk() -> list[str]:
    # kernels/, callbacks/ and recipes/ are mapped into the qat namespace from their own folders,
    # so each is walked from its own path
    names = set()
    for pkg in ("qat", "qat.kernels", "qat.callbacks", "qat.recipes"):
        module = importlib.import_module(pkg)
        names.add(pkg)
        names.update(m.name for m in pkgutil.walk_packages(module.__path__, pkg + "."))
    return sorted(names)


_MODULES = _walk()


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, name) if t.examples]


def test_modules_found():
    """The walk reaches every part of the package (a broken mapping would hide examples)."""
    for part in ("qat.granularity", "qat.kernels.reference", "qat.callbacks.qat", "qat.recipes.train"):
        assert part in _MODULES


@pytest.mark.parametrize("name", _MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    tests = _examples(name)
    if not tests:
        pytest.skip(f"{name} has no examples")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
