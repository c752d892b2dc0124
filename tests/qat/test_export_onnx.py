"""ONNX export: QuantizeLinear / DequantizeLinear graphs that ONNX Runtime runs, matching the
fake-quantized model."""

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qat import QATConfigError, convert, prepare  # noqa: E402
from qat.export import export_float_onnx, export_onnx  # noqa: E402
from qat.prepare import enable_observers  # noqa: E402
from qat.recipes.digits import DigitsCNN  # noqa: E402

A8 = {"bits": 8, "signed": False, "symmetric": False, "observer": "moving_average"}
GROUP = {"name": "g", "rules": [{"match": "*", "weight": {"bits": 4, "granularity": "per_group", "group_size": 16}, "input": A8}]}
HALF_AWAY = {"name": "ha", "rules": [{"match": "*", "weight": {"bits": 8, "round_mode": "half_away", "granularity": "per_channel"},
                                      "input": {**A8, "round_mode": "half_up"}}]}
NARROW = {"name": "n", "rules": [{"match": "*", "weight": {"bits": 6, "narrow_range": True}, "input": {"bits": 8, "narrow_range": True}}]}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.b(self.a(x.flatten(1)).relu())


def _session(path, optimized: bool):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _fq(net, plan):
    torch.manual_seed(0)
    model = prepare(net, plan)
    model(torch.rand(128, 1, 8, 8))
    model.eval()
    enable_observers(model, False)
    return model


@pytest.mark.parametrize("arch,plan", [("cnn", "w8a8"), ("cnn", "w4a4"), ("cnn", "w2a2"), ("mlp", GROUP), ("mlp", HALF_AWAY), ("mlp", NARROW)])
def test_onnx_runtime_matches_fake_quant(tmp_path, arch, plan):
    model = _fq(DigitsCNN(channels=8) if arch == "cnn" else MLP(), plan)
    path = export_onnx(convert(model), torch.rand(1, 1, 8, 8), tmp_path / "m.onnx", input_names=["x"],
                       output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    x = torch.rand(200, 1, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    for optimized in (False, True):
        y = _session(path, optimized).run(None, {"x": x.numpy()})[0]
        cos = (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.9999, (optimized, cos.min())
        assert (y.argmax(1) == ref.argmax(1)).all()
        if not optimized:
            np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)


def test_graph_holds_integer_weights(tmp_path):
    from onnx import TensorProto

    cases = {"w4a4": TensorProto.INT4, "w8a8": TensorProto.INT8}
    for plan, dtype in cases.items():
        path = export_onnx(convert(_fq(DigitsCNN(channels=8), plan)), torch.rand(1, 1, 8, 8), tmp_path / f"{plan}.onnx")
        m = onnx.load(str(path))
        assert m.ir_version <= 13 and m.opset_import[0].version == 21
        inits = {i.name: i for i in m.graph.initializer}
        qw = [i for n, i in inits.items() if n.endswith("qweight")]
        assert qw and all(i.data_type == dtype for i in qw)
        assert not any(i.data_type == TensorProto.FLOAT and n.endswith(".weight") and len(i.dims) > 1 for n, i in inits.items())
        ops = [n.op_type for n in m.graph.node]
        assert "DequantizeLinear" in ops
        assert ("QuantizeLinear" in ops) == (plan == "w8a8")  # 8-bit inputs as QDQ, 4-bit as float math
    m = onnx.load(str(export_onnx(convert(_fq(MLP(), GROUP)), torch.rand(1, 1, 8, 8), tmp_path / "g.onnx")))
    blocks = [a.i for n in m.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "block_size"]
    assert blocks == [16, 16]


def test_int8_model_is_smaller_than_float(tmp_path):
    model = _fq(DigitsCNN(channels=16), "w8a8")
    q = export_onnx(convert(model), torch.rand(1, 1, 8, 8), tmp_path / "q.onnx")
    f = export_float_onnx(DigitsCNN(channels=16), torch.rand(1, 1, 8, 8), tmp_path / "f.onnx")
    assert q.endswith("q.onnx") and (tmp_path / "q.onnx").stat().st_size < 0.45 * (tmp_path / "f.onnx").stat().st_size


def test_errors(tmp_path):
    with pytest.raises(QATConfigError, match="convert"):
        export_onnx(_fq(MLP(), "w8a8"), torch.rand(1, 1, 8, 8), tmp_path / "m.onnx")
    dyn = {"name": "d", "rules": [{"match": "*", "weight": {"bits": 8}, "input": {"bits": 8, "dynamic": True, "granularity": "per_token"}}]}
    with pytest.raises(QATConfigError, match="dynamic"):
        export_onnx(convert(_fq(MLP(), dyn)), torch.rand(1, 1, 8, 8), tmp_path / "m.onnx")
