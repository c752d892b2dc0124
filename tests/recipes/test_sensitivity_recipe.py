"""qat-sensitivity end to end: the console script on the digits CNN writes presets that load with
``qat.load_plan`` and give every layer the bits the allocation chose (the table of the same run
allocated again); the damage heat map and the Pareto plot reach the logger (W&B offline run,
TensorBoard events, the CSV logger's folder) and read back as images."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import qat.recipes.sensitivity as sens_mod
from qat import load_plan
from qat.recipes.digits import DigitsCNN
from qat.sensitivity import SensitivityTable

CONFIG_DIR = str(pathlib.Path(sens_mod.__file__).resolve().parent.parent / "configs")
#: a small float model, one calibration batch, three candidates: seconds on a CPU
FAST = ["fp.epochs=1", "model.net.channels=4", "sensitivity.calibration_batches=1", "sensitivity.cache=false",
        "sensitivity.candidates=[w2a4,w4a4,w8a8]", "budgets=[3,5.5]"]
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(overrides):
    GlobalHydra.instance().clear()
    sens_mod.register_sensitivity_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("sensitivity", overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def _check_presets_reproduce_the_allocation(run_dir: pathlib.Path, budgets=(3, 5.5)) -> None:
    """Every allocated preset loads as a plan whose per-layer bits are exactly the allocation of the
    run's own table at its budget; every uniform preset gives every layer one option."""
    table = SensitivityTable.from_dict(json.loads((run_dir / "sensitivity.json").read_text()))
    net = DigitsCNN(channels=4)
    pareto = json.loads((run_dir / "pareto.json").read_text())
    assert sorted(pareto["presets"]) == sorted([f"w2a4_mp_{str(b).replace('.', 'p')}" for b in budgets]
                                               + ["w2a4_u_w2a4", "w2a4_u_w4a4", "w2a4_u_w8a8"])
    for b in budgets:
        choice = table.allocate(avg_bits=b).choice
        name = f"w2a4_mp_{str(b).replace('.', 'p')}"
        path = run_dir / "quant" / f"{name}.yaml"
        assert pareto["presets"][name] == str(path)
        plan = load_plan(str(path))
        assert plan.name == name
        resolved = plan.resolve(net)
        assert set(resolved) == set(table.layers)
        got = {n: (lq.weight.bits, lq.input.bits) for n, lq in resolved.items()}
        want = {n: (table.options[k].weight, table.options[k].input) for n, k in choice.items()}
        assert got == want
        row = next(r for r in pareto["rows"] if r["plan"] == name)
        assert row["avg_bits"] <= b and row["bits"] == {n: table.options[k].label for n, k in choice.items()}
    assert len({lq.weight.bits for lq in load_plan(str(run_dir / "quant" / "w2a4_u_w4a4.yaml")).resolve(net).values()}) == 1
    # the printed sweep trains them from that folder
    assert pareto["command"] == (f"qat-train -m 'hydra.searchpath=[file://{run_dir}]' quant="
                                 + ",".join(pareto["presets"]))


def test_run_writes_presets_that_reproduce_the_allocation(tmp_path, capsys):
    """The Python entry (what the ``run`` docstring shows): no logger, the figures as PNGs beside the results."""
    res = sens_mod.run(_cfg(["logger=none", *FAST]), str(tmp_path / "run"))
    run_dir = tmp_path / "run"
    _check_presets_reproduce_the_allocation(run_dir)
    assert [r["kind"] for r in res["rows"]] == ["allocated"] * 2 + ["uniform"] * 3
    for key in ("sensitivity_damage", "sensitivity_pareto"):
        assert (run_dir / f"{key}.png").read_bytes().startswith(PNG)
    assert "train them: qat-train -m" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_end_to_end_with_wandb_offline(tmp_path):
    """``qat-sensitivity`` as a user types it (default logger: W&B, offline here); the presets reproduce
    the allocation and the W&B run holds the heat map and the Pareto plot as images."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
           "WANDB_SILENT": "true"}
    run_dir = tmp_path / "run"
    exe = os.path.join(os.path.dirname(sys.executable), "qat-sensitivity")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "qat.recipes.sensitivity"]
    out = subprocess.run([*cmd, *FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train them: qat-train -m 'hydra.searchpath=[file://" in out.stdout
    _check_presets_reproduce_the_allocation(run_dir)
    runs = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    record = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()
    assert b"sensitivity/damage" in record and b"sensitivity/pareto" in record and b"sensitivity/pareto_table" in record
    for key in ("damage", "pareto"):
        images = glob.glob(os.path.join(runs[0], "files", "media", "images", "sensitivity", f"{key}_*.png"))
        assert len(images) == 1, key
        assert open(images[0], "rb").read().startswith(PNG)


@pytest.mark.parametrize("logger", ["tensorboard", "csv"])
def test_file_loggers_read_back_the_figures(logger, tmp_path):
    """The heat map and the Pareto plot in the logger's version folder ``sensitivity``: TensorBoard
    events (read with EventAccumulator) and PNG files; the CSV logger's PNGs and the Pareto rows."""
    cfg = _cfg([f"logger={logger}", *FAST])
    cfg.logger.save_dir = str(tmp_path / "logs")
    sens_mod.run(cfg, str(tmp_path / "run"))
    folder = tmp_path / "logs" / "w2a4" / "sensitivity"
    for key in ("sensitivity_damage", "sensitivity_pareto"):
        assert (folder / f"{key}.png").read_bytes().startswith(PNG)
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(folder), size_guidance={"images": 0})
        acc.Reload()
        assert {"sensitivity/damage", "sensitivity/pareto"} <= set(acc.Tags()["images"])
        for key in ("sensitivity/damage", "sensitivity/pareto"):
            (img,) = acc.Images(key)
            assert img.encoded_image_string.startswith(PNG) and img.width > 100 and img.height > 100
        assert "pareto/w2a4_mp_3/avg_bits" in acc.Tags()["scalars"]
    else:
        import csv

        rows = list(csv.DictReader(open(folder / "metrics.csv")))
        assert any(r.get("pareto/w2a4_mp_3/avg_bits") for r in rows)
        assert float(next(r for r in rows if r.get("pareto/w2a4_mp_3/avg_bits"))["pareto/w2a4_mp_3/avg_bits"]) <= 3


@pytest.mark.slow
def test_printed_sweep_trains_each_preset(tmp_path):
    """The command qat-sensitivity prints, run as printed (plus fast settings): every job trains its
    preset (the allocated plan's per-layer bits as written) and the sweep ends with pareto.png."""
    res = sens_mod.run(_cfg(["logger=none", *FAST]), str(tmp_path / "run"))
    names = ["w2a4_mp_3", "w2a4_u_w4a4"]
    searchpath = res["command"].split("'")[1]  # hydra.searchpath=[file://<run dir>]
    assert searchpath == f"hydra.searchpath=[file://{tmp_path / 'run'}]"
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "qat.recipes.train", "-m", searchpath, f"quant={','.join(names)}",
                           "logger=none", "fp.epochs=1", "qat.epochs=1", "model.net.channels=4", "ptq.calibration_batches=1",
                           "callbacks.qat.calibration_batches=1", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = {json.loads(p.read_text())["plan"]: p.parent for p in sweep.glob("*/results.json")}
    assert sorted(jobs) == sorted(names)
    net = DigitsCNN(channels=4)
    for name in names:
        want = {n: lq.weight.bits for n, lq in load_plan(res["presets"][name]).resolve(net).items()}
        cfg = OmegaConf.load(jobs[name] / ".hydra" / "config.yaml")
        got = {n: lq.weight.bits for n, lq in load_plan(OmegaConf.to_container(cfg.quant)).resolve(net).items()}
        assert got == want
    assert (sweep / "pareto.png").read_bytes().startswith(PNG)
