"""qat-ptq: Hydra composition of ptq.yaml (same groups as train.yaml) and tiny real runs."""

import json
import os
import pathlib
import re

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
    assert cfg.ptq.calibration_batches == 8 and cfg.qat.epochs == 0 and cfg.checkpoint is None


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
    cfg = _compose(FAST + [f"checkpoint={ckpt}", "ptq.observer=mse", "quant=w4a8", "qat.epochs=1", "ptq.fold_bn=true"])
    res2 = ptq_mod.run(cfg, str(tmp_path / "b"))
    assert res2["fp"]["test_acc"] == res["fp"]["test_acc"]  # same float weights, no training
    assert res2["plan"] == "w4a8_mse" and "qat" in res2
    assert res2["qat"]["test_acc"] > 0.3


def test_errors_before_any_work(tmp_path):
    with pytest.raises(QATConfigError, match="checkpoint 'nope.pt' does not exist"):
        ptq_mod.run(_compose(FAST + ["checkpoint=nope.pt"]), str(tmp_path))
    with pytest.raises(QATConfigError, match=r"ptq.observer must be one of \[minmax, moving_average, percentile, mse.*\], got 'histogram'"):
        ptq_mod.run(_compose(FAST + ["ptq.observer=histogram"]), str(tmp_path))
    with pytest.raises(QATConfigError, match=r"module_attr='backbone': ClassifierModule has no such submodule"):
        ptq_mod.run(_compose(FAST + ["module_attr=backbone"]), str(tmp_path))
    with pytest.raises(QATConfigError, match=r"plan: unknown field\(s\) \['extra'\]"):
        ptq_mod.run(_compose(FAST + ["+quant.extra=1"]), str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_unknown_key_rejected_by_schema():
    with pytest.raises(Exception, match="calibration_batchez"):
        _compose(["logger=none", "ptq.calibration_batchez=3"])


# ---------------------------------------------------------------- issue 18: qat-train's keys, progress bars
@pytest.mark.parametrize("old,new", [("qat_epochs=3", "qat.epochs=3"), ("qat_lr=0.01", "qat.lr=0.01")])
def test_old_keys_fail_naming_the_new_key(tmp_path, old, new):
    cfg = _compose(FAST + [old])
    with pytest.raises(QATConfigError, match=rf"^{old.split('=')[0]} was renamed to {re.escape(new.split('=')[0])} "
                                             rf"\(the key qat-train uses\): qat-ptq {re.escape(new)}$"):
        ptq_mod.run(cfg, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_stage_keys_are_qat_trains():
    from qat.recipes.config import register_configs

    ptq_cfg = _compose(["logger=none"])
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        train_cfg = compose(config_name="train", overrides=["logger=none"])
    for key in ("quant", "model", "data", "trainer", "seed", "module_attr", "fp", "ptq", "qat"):
        assert key in ptq_cfg and key in train_cfg, key
    for stage in ("fp", "ptq", "qat"):
        assert set(ptq_cfg[stage]) == set(train_cfg[stage]), stage
    assert ptq_cfg.qat.epochs == 0 and train_cfg.qat.epochs > 0  # qat-ptq: calibration only, unless asked
    assert ptq_cfg.module_attr == train_cfg.module_attr


def test_qat_epochs_key_runs_qat_from_the_calibrated_model(tmp_path):
    cfg = _compose(FAST + ["qat.epochs=1", "qat.lr=0.002"])
    res = ptq_mod.run(cfg, str(tmp_path))
    assert "qat" in res and 0.0 <= res["qat"]["test_acc"] <= 1.0


def test_progress_bars_on_and_off(tmp_path, capfd):
    ptq_mod.run(_compose(FAST + ["progress=true"]), str(tmp_path / "on"))
    out, err = capfd.readouterr()
    assert "calibration" in err and "2/2" in err  # the PTQ observer pass
    assert "Epoch 0" in out and "Testing" in out  # Lightning's own bars (stdout), off in configs/trainer/default.yaml
    ptq_mod.run(_compose(FAST), str(tmp_path / "auto"))  # null: not a terminal (and under pytest): none
    out, err = capfd.readouterr()
    assert "calibration" not in err and "Epoch 0" not in out and "Testing" not in out
    with pytest.raises(QATConfigError, match=r"progress must be true, false or null .*got 'sometimes'"):
        ptq_mod.run(_compose(FAST + ["progress=sometimes"]), str(tmp_path / "bad"))
