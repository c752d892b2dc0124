"""The README's "Your own model in qat-train" and "Sweeps" commands run as written (with a few
overrides appended that shorten training): mymodel.py is the README's own block, each `qat-train`
line goes through the entry point ``main()`` from the directory that holds it."""

import contextlib
import io
import json
import pathlib
import re
import shlex
import sys

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra

import qat.recipes.train as train_mod

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
SHORT = ["fp.epochs=1", "qat.epochs=1", "ptq.calibration_batches=2", "callbacks.qat.calibration_batches=2"]
DIGITS_SHORT = [*SHORT, "model.net.channels=4", "data.batch_size=128"]


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def _commands(title: str) -> list[list[str]]:
    """The `qat-train` lines of the section's bash blocks, comments cut, split as a shell would."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", _section(title), flags=re.S):
        for line in block.splitlines():
            if line.startswith("qat-train"):
                cmds.append(shlex.split(line, comments=True)[1:])
    return cmds


def _main(args: list[str]) -> str:
    GlobalHydra.instance().clear()
    sys.argv = ["qat-train", *args]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train_mod.main()
    return out.getvalue()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    yield tmp_path
    sys.modules.pop("mymodel", None)


def test_readme_own_model_commands_run(in_tmp):
    blocks = re.findall(r"```python\n(.*?)```", _section("Your own model in qat-train"), flags=re.S)
    module = next(b for b in blocks if b.startswith("# mymodel.py"))
    (in_tmp / "mymodel.py").write_text(module)
    cmds = _commands("Your own model in qat-train")
    assert len(cmds) >= 2 and all("model._target_=mymodel.MyModule" in c for c in cmds)
    for i, cmd in enumerate(cmds):
        _main([*cmd, *SHORT, f"hydra.run.dir=run{i}"])
        res = json.loads((in_tmp / f"run{i}" / "results.json").read_text())
        metric = next(a.split("=", 1)[1] for a in cmd if a.startswith("metric="))
        assert res["metric"] == metric and res["fp"]["source"] == "trained"
        assert res["qat"]["bytes"] < res["fp"]["bytes"]


def test_readme_sweep_commands_run(in_tmp):
    """Each sweep line runs (Optuna with one trial each, to stay short; all of them sharing one float
    cache, so the float model is trained once in all); the SLURM line composes its launcher."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cmds = _commands("Sweeps")
    assert any("hydra/sweeper=qat_optuna" in c for c in cmds) and any("hydra/launcher=slurm" in c for c in cmds)
    sources = []
    for i, cmd in enumerate(cmds):
        sweep = in_tmp / f"sweep{i}"
        if "hydra/launcher=slurm" in cmd:  # no SLURM here: the launcher config it composes (one job of the sweep)
            one_job = [a.split(",")[0] if "=" in a and "," in a else a for a in cmd if a != "-m"]
            out = _main([*one_job, "--cfg", "hydra"])
            assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out
            assert "partition: gpu" in out
            continue
        optuna = "hydra/sweeper=qat_optuna" in cmd
        extra = ["hydra.sweeper.n_trials=1"] if optuna else []
        _main([*cmd, *DIGITS_SHORT, *extra, f"fp_cache={in_tmp / 'fp_cache'}", f"hydra.sweep.dir={sweep}"])
        jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
        assert len(jobs) == (1 if optuna else 2)
        sources += [j["fp"]["source"] for j in jobs]
        if optuna:
            best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
            assert best["best_value"] == jobs[0]["qat"]["test_acc"]
    assert sources[0] == "trained" and set(sources[1:]) == {"cache"}
