"""qat-ptq: Hydra composition of ptq.yaml (same groups as train.yaml) and tiny real runs."""

import json
import pathlib

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import qat.recipes.ptq as ptq_mod
from qat import QATConfigError, QuantPlan

CONFIG_DIR = str(pathlib.Path(ptq_mod.__file__).resolve().parent.parent / "configs")
FAST = ["fp.epochs=1", "ptq.calibration_batches=2", "model.net.channels=8", "logger=none"]


def _compose(overrides):
    GlobalHydra.instance().clear()
    ptq_mod.register_ptq_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="ptq", overrides=overrides)


def test_compose_defaults_share_the_train_groups():
    cfg = _compose(["logger=none"])
    assert cfg.quant.name == "w8a8" and cfg.logger is None
    assert cfg.model.net._target_ == "qat.recipes.digits.DigitsCNN"
    assert cfg.data._target_ == "qat.recipes.digits.DigitsDataModule"
    assert cfg.ptq.calibration_batches == 8 and cfg.qat_epochs == 0 and cfg.checkpoint is None


def test_run_writes_results_and_calibrated_model(tmp_path):
    cfg = _compose(FAST)
    res = ptq_mod.run(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == res and res["plan"] == "w8a8"
    assert res["ptq"]["calibration_batches"] == 2
    assert abs(res["ptq"]["test_acc"] - res["fp"]["test_acc"]) < 0.05  # W8A8 PTQ is near lossless
    assert res["ptq"]["bytes"] < res["fp"]["bytes"] / 3
    ptq_state = torch.load(tmp_path / "ptq_model.pt", weights_only=False)
    assert QuantPlan.from_dict(ptq_state["plan"]).name == "w8a8"
    assert (tmp_path / "fp_model.pt").exists() and "qat" not in res


@pytest.mark.slow
def test_checkpoint_mse_fold_bn_and_qat_from_calibrated(tmp_path):
    res = ptq_mod.run(_compose(FAST), str(tmp_path / "a"))
    ckpt = str(tmp_path / "a" / "fp_model.pt")
    cfg = _compose(FAST + [f"checkpoint={ckpt}", "ptq.observer=mse", "quant=w4a8", "qat_epochs=1", "ptq.fold_bn=true"])
    res2 = ptq_mod.run(cfg, str(tmp_path / "b"))
    assert res2["fp"]["test_acc"] == res["fp"]["test_acc"]  # same float weights, no training
    assert res2["plan"] == "w4a8_mse" and "qat" in res2
    assert res2["qat"]["test_acc"] > 0.3


def test_errors_before_any_work(tmp_path):
    with pytest.raises(QATConfigError, match="checkpoint 'nope.pt' does not exist"):
        ptq_mod.run(_compose(FAST + ["checkpoint=nope.pt"]), str(tmp_path))
    with pytest.raises(QATConfigError, match=r"ptq.observer must be one of \[minmax, moving_average, percentile, mse.*\], got 'histogram'"):
        ptq_mod.run(_compose(FAST + ["ptq.observer=histogram"]), str(tmp_path))
    with pytest.raises(QATConfigError, match=r"plan: unknown field\(s\) \['extra'\]"):
        ptq_mod.run(_compose(FAST + ["+quant.extra=1"]), str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_unknown_key_rejected_by_schema():
    with pytest.raises(Exception, match="calibration_batchez"):
        _compose(["logger=none", "ptq.calibration_batchez=3"])
