"""Packed safetensors checkpoint: round trip without the training code, metadata, errors."""

import json

import pytest
import torch
import torch.nn as nn

from qat import QATConfigError, convert, prepare
from qat.export import PackedCheckpoint, PackedFormatError, load_packed, read_packed, save_packed
from qat.prepare import enable_observers


def _net():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def _int_model(plan="w4a8"):
    torch.manual_seed(0)
    model = prepare(_net(), plan)
    model(torch.rand(16, 1, 6, 6))
    model.eval()
    enable_observers(model, False)
    return model, convert(model)


@pytest.mark.parametrize("plan", ["w8a8", "w4a8", "w2a2"])
def test_round_trip_into_float_skeleton(tmp_path, plan):
    fq, int_model = _int_model(plan)
    path = save_packed(int_model, tmp_path / "m.safetensors")
    loaded = load_packed(path, _net())  # fresh float architecture, random weights
    x = torch.rand(8, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fq(x), atol=0, rtol=0)
    assert loaded.qat_plan.name == plan
    for k, v in int_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and loaded.state_dict()[k].dtype == v.dtype


def test_metadata_and_float_state_dict(tmp_path):
    fq, int_model = _int_model("w4a8")
    path = save_packed(int_model, tmp_path / "m.safetensors")
    ckpt = load_packed(path)
    assert isinstance(ckpt, PackedCheckpoint)
    assert ckpt.metadata["format"] == "lightning-qat.packed"
    assert set(ckpt.layers) == {"0", "3"} and ckpt.layers["3"]["weight"]["bits"] == 4
    assert json.loads(ckpt.metadata["plan"])["name"] == "w4a8"
    # the dequantized weights load straight into the float architecture
    net = _net()
    net.load_state_dict(ckpt.float_state_dict())
    torch.testing.assert_close(net[3].weight, fq[3].quantized_weight(), atol=0, rtol=0)


def test_file_is_as_small_as_the_bits(tmp_path):
    _, int_model = _int_model("w4a8")
    path = save_packed(int_model, tmp_path / "m.safetensors")
    tensor_bytes = sum(t.numel() * t.element_size() for t in int_model.state_dict().values())
    float_bytes = sum(p.numel() * 4 for p in _net().parameters())
    size = path and (tmp_path / "m.safetensors").stat().st_size
    assert size < tensor_bytes + 4096  # header and JSON metadata only on top of the tensors
    assert tensor_bytes < float_bytes / 5


def test_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(PackedFormatError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(PackedFormatError, match="not a safetensors file"):
        load_packed(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(PackedFormatError, match="not a lightning-qat packed checkpoint"):
        read_packed(other)
    with pytest.raises(QATConfigError, match="convert"):
        save_packed(_net(), tmp_path / "float.safetensors")
    _, int_model = _int_model("w8a8")
    path = save_packed(int_model, tmp_path / "m.safetensors")
    with pytest.raises(PackedFormatError, match="no layer '3'"):
        load_packed(path, nn.Sequential(nn.Conv2d(1, 8, 3, padding=1)))
    wrong = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    with pytest.raises(PackedFormatError, match="shape"):
        load_packed(path, wrong)
    assert issubclass(PackedFormatError, ValueError)
