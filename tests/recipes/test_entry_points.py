"""Issue 18: the console scripts name a missing optional package and its extra, instead of a bare
``No module named 'sklearn'``. A missing package is simulated with ``sys.modules[name] = None``."""

import pathlib
import subprocess
import sys
import tomllib

import pytest
from hydra.core.global_hydra import GlobalHydra

from qat.recipes import entry

ROOT = pathlib.Path(entry.__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none"]


def _hide(monkeypatch, package):
    """``package`` and its submodules not importable (an imported submodule would still be found)."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


def _call(monkeypatch, tmp_path, prog, args, missing):
    """Run the console script ``prog`` in this process with ``missing`` not importable."""
    _hide(monkeypatch, missing)
    monkeypatch.setattr(sys, "argv", [prog, *args, *QUIET, f"hydra.run.dir={tmp_path / 'run'}"])
    GlobalHydra.instance().clear()
    func = PYPROJECT["project"]["scripts"][prog].split(":")[1]
    with pytest.raises(entry.MissingExtraError) as info:
        getattr(entry, func)()
    return info.value


def test_every_script_goes_through_the_wrapper():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"qat-train", "qat-ptq", "qat-export", "qat-sensitivity"}
    for prog, target in scripts.items():
        module, func = target.split(":")
        assert module == "qat.recipes.entry" and callable(getattr(entry, func)), prog


def test_every_known_package_is_in_the_extra_the_message_names():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, (pip_name, extra) in entry.OPTIONAL_PACKAGES.items():
        listed = {req.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                  for req in extras[extra]}
        assert pip_name.lower() in listed, (module, pip_name, extra)


@pytest.mark.parametrize("prog,args", [
    ("qat-train", ["logger=none", "fp.epochs=0", "qat.epochs=0", "model.net.channels=4"]),
    ("qat-ptq", ["logger=none", "fp.epochs=0", "model.net.channels=4"]),
])
def test_missing_sklearn(monkeypatch, tmp_path, prog, args):
    """The reported case: the digits data needs scikit-learn, which a base install lacks."""
    err = _call(monkeypatch, tmp_path, prog, args, "sklearn")
    assert str(err) == f"{prog} needs scikit-learn (module 'sklearn' is not installed): pip install 'lightning-qat[recipes]'"
    assert err.code == str(err)  # SystemExit with a message: printed on stderr, exit status 1
    assert not (tmp_path / "run" / "results.json").exists()


def test_missing_wandb_of_the_default_logger(monkeypatch, tmp_path):
    err = _call(monkeypatch, tmp_path, "qat-ptq", ["fp.epochs=0", "model.net.channels=4"], "wandb")
    assert str(err) == "qat-ptq needs wandb (module 'wandb' is not installed): pip install 'lightning-qat[recipes]'"


def test_missing_onnx_for_an_onnx_export(monkeypatch, tmp_path):
    import torch

    from qat import load_plan, prepare
    from qat.recipes.digits import DigitsCNN

    net = prepare(DigitsCNN(channels=4), "w8a8")
    net(torch.rand(8, 1, 8, 8))
    ckpt = tmp_path / "qat_model.pt"
    torch.save({"plan": load_plan("w8a8").to_dict(), "state_dict": net.state_dict()}, ckpt)
    args = [f"checkpoint={ckpt}", "formats=[onnx]", "model.net.channels=4", f"output_dir={tmp_path / 'out'}"]
    err = _call(monkeypatch, tmp_path, "qat-export", args, "onnx")
    assert str(err) == "qat-export needs onnx (module 'onnx' is not installed): pip install 'lightning-qat[export]'"
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_other_errors_go_through(tmp_path):
    with pytest.raises(ModuleNotFoundError, match="no_such_module_of_the_user"):
        with entry.missing_extras("qat-train"):
            import no_such_module_of_the_user  # noqa: F401
    with pytest.raises(ValueError, match="not an import error"):
        with entry.missing_extras("qat-train"):
            raise ValueError("not an import error")


def test_console_script_prints_one_line_and_exits_1(tmp_path):
    """The process a user sees: the message on stderr, no traceback, status 1."""
    code = "import sys; sys.modules['sklearn'] = None; from qat.recipes.entry import ptq; ptq()"
    proc = subprocess.run([sys.executable, "-c", code, "logger=none", "fp.epochs=0", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "qat-ptq needs scikit-learn (module 'sklearn' is not installed): pip install 'lightning-qat[recipes]'")
    assert "Traceback" not in proc.stderr
