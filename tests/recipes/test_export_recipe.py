"""qat-export: the real Hydra composition of export.yaml over a qat_model.pt, the console script, errors."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import qat.recipes.export as export_mod
from qat import QATConfigError, load_plan, prepare
from qat.export import load_packed
from qat.prepare import enable_observers
from qat.recipes.digits import DigitsCNN

CONFIG_DIR = str(pathlib.Path(export_mod.__file__).resolve().parent.parent / "configs")


def _compose(overrides):
    GlobalHydra.instance().clear()
    export_mod.register_export_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="export", overrides=overrides)


def _checkpoint(tmp_path, plan="w4a4", channels=8, smooth=False):
    """What qat-train writes: {plan, state_dict} of the quantized network."""
    torch.manual_seed(0)
    net = prepare(DigitsCNN(channels=channels), plan)
    if smooth:  # qat.smooth_inputs on the classifier Linear (qat-train callbacks.qat.smooth.alpha=0.5)
        from qat import smooth_inputs

        smooth_inputs(net, [torch.rand(64, 1, 8, 8)], alpha=0.5)
    net(torch.rand(64, 1, 8, 8))
    path = tmp_path / "qat_model.pt"
    torch.save({"plan": load_plan(plan).to_dict(), "state_dict": net.state_dict()}, path)
    return path, net


def test_compose_defaults():
    cfg = _compose(["checkpoint=x.pt"])
    assert list(cfg.formats) == ["safetensors", "onnx"] and cfg.module_attr == "auto"


@pytest.mark.parametrize("plan,smooth", [("w8a8", False), ("w4a4", False), ("w4a4", True)])
def test_run_exports_files_that_match(tmp_path, plan, smooth):
    ckpt, net = _checkpoint(tmp_path, plan, smooth=smooth)
    assert any(k.endswith("input_smooth") for k in net.state_dict()) == smooth
    cfg = _compose([f"checkpoint={ckpt}", f"output_dir={tmp_path / 'out'}", "model.net.channels=8"])
    res = export_mod.run(cfg)
    assert res["max_abs_diff_converted_vs_fake_quant"] == 0.0
    assert json.loads((tmp_path / "out" / "export.json").read_text())["plan"] == plan
    assert res["converted_state_bytes"] < res["float_bytes"] / 3
    # the packed file loads into the float architecture, no training code
    loaded = load_packed(tmp_path / "out" / "model.safetensors", DigitsCNN(channels=8)).eval()
    net.eval()
    enable_observers(net, False)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    y = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"input": x.numpy()})[0]
    assert (y.argmax(1) == net(x).argmax(1).numpy()).all()


def test_errors(tmp_path):
    with pytest.raises(QATConfigError, match="does not exist"):
        export_mod.run(_compose([f"checkpoint={tmp_path / 'missing.pt'}"]))
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(QATConfigError, match="not a qat-train checkpoint"):
        export_mod.run(_compose([f"checkpoint={bad}"]))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(QATConfigError, match="not a PyTorch checkpoint"):
        export_mod.run(_compose([f"checkpoint={junk}"]))
    ckpt, _ = _checkpoint(tmp_path, "w8a8", channels=8)
    with pytest.raises(QATConfigError, match="export formats"):
        export_mod.run(_compose([f"checkpoint={ckpt}", "formats=[tflite]", "model.net.channels=8"]))
    with pytest.raises(QATConfigError, match="does not fit"):
        export_mod.run(_compose([f"checkpoint={ckpt}", "model.net.channels=16"]))


def test_console_script(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, "w8a8")
    out = tmp_path / "cli"
    cmd = [sys.executable, "-c", "from qat.recipes.export import main; main()", f"checkpoint={ckpt}",
           f"output_dir={out}", "formats=[safetensors]", "model.net.channels=8", f"hydra.run.dir={tmp_path / 'hydra'}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert (out / "model.safetensors").is_file() and not (out / "model.onnx").exists()
