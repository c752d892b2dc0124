"""qat-train: the real Hydra composition of train.yaml, the console script, a multirun, W&B offline."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import qat.recipes.train as train_mod
from qat import QATConfigError
from qat.recipes.config import register_configs

CONFIG_DIR = str(pathlib.Path(train_mod.__file__).resolve().parent.parent / "configs")
FAST = ["fp.epochs=2", "qat.epochs=1", "ptq.calibration_batches=2", "callbacks.qat.calibration_batches=2", "model.net.channels=8"]


def _compose(overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_compose_defaults():
    cfg = _compose(["logger=none"])
    assert cfg.quant.name == "w2a4" and cfg.logger is None
    assert cfg.model.net._target_ == "qat.recipes.digits.DigitsCNN"


@pytest.mark.parametrize("preset,extra", [("w8a8", []), ("w2a2", ["callbacks.qat.smooth.alpha=0.5", "callbacks.qat.smooth.learnable=true"])])
def test_run_writes_results(tmp_path, preset, extra):
    cfg = _compose([f"quant={preset}", "logger=none", *FAST, *extra])
    res = train_mod.run(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["plan"] == preset and saved == res
    assert res["fp"]["test_acc"] > 0.5  # far above the 0.1 of chance even after 2 epochs
    assert res["qat"]["bytes"] < res["fp"]["bytes"] / 3
    assert (tmp_path / "qat_model.pt").exists()
    if extra:  # the classifier Linear is smoothed; the saved model carries its factors
        import torch

        state = torch.load(tmp_path / "qat_model.pt", weights_only=False)
        sd = state.get("state_dict", state) if isinstance(state, dict) else state
        assert any(k.endswith("input_smooth") for k in sd), list(sd)[:5]


def test_bad_plan_fails_before_training(tmp_path):
    cfg = _compose(["logger=none", "+quant.extra=1"])
    with pytest.raises(QATConfigError, match=r"plan: unknown field\(s\) \['extra'\]"):
        train_mod.run(cfg, str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_unknown_stage_key_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="epochz"):
        _compose(["logger=none", "qat.epochz=3"])


def _cli(args, cwd, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "qat.recipes.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_with_wandb_offline(tmp_path):
    proc = _cli([*FAST, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "full precision vs PTQ vs QAT" in proc.stdout
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(r.glob("*.wandb")) for r in runs)  # the fp and qat stages, one group


def test_cli_multirun_summary(tmp_path):
    proc = _cli(["-m", "quant=w8a8,w4a4", "logger=none", *FAST, f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep summary (2 runs)" in proc.stdout
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [r["plan"] for r in summary] == ["w8a8", "w4a4"]
    png = tmp_path / "sweep" / "pareto.png"  # accuracy against size, the QAT Pareto front joined
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oscillation_keys_compose_off_by_default():
    cfg = _compose(["logger=none"])
    osc = cfg.callbacks.oscillation
    assert (osc.dampen, osc.freeze, osc.momentum, osc.freeze_start) == (0.0, None, 0.99, 0.0)
    cfg = _compose(["logger=none", "callbacks.oscillation.dampen=1e-3", "callbacks.oscillation.freeze=0.015",
                    "callbacks.oscillation.freeze_start=0.1"])
    osc = cfg.callbacks.oscillation
    assert (osc.dampen, osc.freeze, osc.freeze_start) == (1e-3, 0.015, 0.1)


def test_callbacks_are_instantiated_from_the_config_tree():
    """The callbacks group holds _target_ nodes; qat-train instantiates them (plan from the quant group)."""
    from qat.callbacks import OscillationControl, QuantizationAwareTraining, QuantizationTelemetry
    from qat.recipes.config import instantiate_callbacks

    cfg = _compose(["logger=none", "quant=w8a8", "module_attr=net", "callbacks.qat.freeze_bn_epoch=3", "callbacks.qat.smooth.alpha=0.5",
                    "callbacks.oscillation.freeze=0.015", "callbacks.telemetry.every_n_steps=5"])
    cbs = instantiate_callbacks(cfg.callbacks)
    assert list(cbs) == ["qat", "oscillation", "telemetry"]
    qat, osc, tel = cbs.values()
    assert isinstance(qat, QuantizationAwareTraining) and isinstance(osc, OscillationControl)
    assert isinstance(tel, QuantizationTelemetry) and tel.every_n_steps == 5
    assert qat.plan.name == "w8a8" and qat.freeze_bn_epoch == 3 and qat.module_attr == "net"
    assert (qat.smooth.alpha, qat.smooth.match, qat.smooth.learnable) == (0.5, "*", False)
    assert osc.freeze == 0.015 and osc.dampen == 0.0
    assert list(instantiate_callbacks(_compose(["logger=none", "callbacks.telemetry=null"]).callbacks)) == ["qat", "oscillation"]
    assert instantiate_callbacks(_compose(["logger=none"]).callbacks)["qat"].smooth is None  # alpha null: off


@pytest.mark.parametrize(
    "override,match",
    [
        ("+callbacks.qat.freeze_bn_epok=3", r"callbacks.qat: QuantizationAwareTraining takes no argument 'freeze_bn_epok'"),
        ("callbacks.qat.freeze_bn_epoch=-1", r"freeze_bn_epoch must be a non-negative integer or None, got -1"),
        ("callbacks.oscillation.freeze=2", r"OscillationControl.freeze must be a number in \(0, 1\)"),
        ("callbacks.qat.smooth.alpha=3", r"QuantizationAwareTraining.smooth.alpha must be a number in \[0, 1\], got 3"),
        ("callbacks.telemetry._target_=qat.callbacks.Nope", r"callbacks.telemetry._target_='qat.callbacks.Nope' is not an importable class"),
    ],
)
def test_bad_callback_arguments_fail_before_training(tmp_path, override, match):
    """An argument the callback does not take (added with ``+``) or out of its range fails in ``run``
    before any training, naming it."""
    cfg = _compose(["logger=none", *FAST, override])
    with pytest.raises(QATConfigError, match=match):
        train_mod.run(cfg, str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_unknown_callback_key_is_rejected_at_composition():
    with pytest.raises(Exception, match="freeze_bn_epok"):
        _compose(["logger=none", "callbacks.qat.freeze_bn_epok=3"])
