"""QuantizedExport: a tiny Lightning fit that ends with packed safetensors and ONNX files; a k-quant
plan with a format other than GGUF refused when fit starts."""

import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from qat import QATConfigError, quantizers
from qat.callbacks import QuantizationAwareTraining, QuantizedExport
from qat.export import load_packed


def _net():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = _net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(tmp_path, callbacks):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)), batch_size=16)
    module = Tiny()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks)
    trainer.fit(module, data)
    return module


def test_exports_at_fit_end(tmp_path):
    export = QuantizedExport(str(tmp_path / "q"), formats=["safetensors", "onnx"], module_attr="net")
    module = _fit(tmp_path, [QuantizationAwareTraining("w4a8", module_attr="net"), export])
    assert set(export.paths) == {"safetensors", "onnx"}
    assert (tmp_path / "q" / "model.safetensors").is_file() and (tmp_path / "q" / "model.onnx").is_file()
    assert type(module.net[0]).__name__ == "QuantLinear"  # the trained module is left fake-quantized
    module.eval()
    for name, q in quantizers(module.net):  # a deployed model's input ranges are fixed; weight
        if name.endswith("input_quantizer"):  # observers keep tracking the weights, as convert does
            q.enable_observer(False)
    loaded = load_packed(tmp_path / "q" / "model.safetensors", _net())
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.net(x), atol=0, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the optimizer's int4 matmul has its own numerics
    y = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"), so).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), module.net(x).detach(), atol=1e-5, rtol=0)


def test_default_dir_and_errors(tmp_path):
    with pytest.raises(QATConfigError, match="export formats"):
        QuantizedExport(formats=["tflite"])
    export = QuantizedExport(formats="safetensors", module_attr="net")
    _fit(tmp_path, [QuantizationAwareTraining("w8a8", module_attr="net"), export])
    assert (tmp_path / "quantized" / "model.safetensors").is_file()
    with pytest.raises(QATConfigError, match="not prepared"):
        _fit(tmp_path, [QuantizedExport(formats=["safetensors"], module_attr="net")])
    with pytest.raises(QATConfigError, match="no such attribute"):
        _fit(tmp_path, [QuantizationAwareTraining("w8a8", module_attr="net"), QuantizedExport(module_attr="student")])


class _KQuantTiny(Tiny):
    """Rows of 256 (the k-quant itself) and of 32 (its fallback type); counts training steps."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 3))
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("formats", [["onnx"], ["safetensors", "gguf"]])
def test_kquant_plan_with_a_format_other_than_gguf_is_refused_before_any_step(tmp_path, formats):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 256, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=16)
    module = _KQuantTiny()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[QuantizationAwareTraining("gguf_q4_k", module_attr="net"),
                                    QuantizedExport(str(tmp_path / "q"), formats=formats, module_attr="net")])
    with pytest.raises(QATConfigError, match=r"QuantizedExport: layer '0' holds a q4_k weight .* exports to GGUF only "
                                             r"\(formats: \[gguf\]\), got formats " + re.escape(str(formats))):
        trainer.fit(module, data)
    assert module.steps == 0
    assert type(module.net[0]).__name__ == "QuantLinear"  # prepared in setup, then refused
    assert not (tmp_path / "q").exists()
