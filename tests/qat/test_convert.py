"""qat.convert: integer layers reproduce the fake-quantized model exactly; packing; size; errors."""

import pytest
import torch
import torch.nn as nn

from qat import QATConfigError, QuantLinear, convert, prepare
from qat.convert import is_converted
from qat.export.packing import pack_codes, packed_numel, unpack_codes
from qat.int_modules import IntConv1d, IntConv2d, IntEmbedding, IntLinear
from qat.prepare import enable_observers
from qat.size import model_size_bytes
from qat.spec import QuantSpec


class Net(nn.Module):
    """Every layer type convert handles: Embedding -> Conv1d -> Conv2d -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.c1 = nn.Conv1d(32, 32, 3, padding=1)
        self.c2 = nn.Conv2d(1, 4, 4, padding="same", bias=False)  # I*k = 16: per-group conv weights fit
        self.fc = nn.Linear(32 * 4, 16)

    def forward(self, idx):
        h = self.c1(self.emb(idx).transpose(1, 2)).relu()  # (B, T, 32) -> (B, 32, T)
        h = self.c2(h.unsqueeze(1)).relu()  # (B, 1, 32, T) -> (B, 4, 32, T)
        return self.fc(h.mean(-1).flatten(1))  # (B, 4, 32) -> (B, 128)


def _plan(weight: dict, inp) -> dict:
    return {"name": "t", "rules": [{"match": "*", "weight": weight, "input": inp}]}


A8 = {"bits": 8, "signed": False, "symmetric": False, "observer": "moving_average"}
PLANS = {
    "w8a8": "w8a8",
    "w4a4": "w4a4",
    "w2a2": "w2a2",
    "w3_per_channel": _plan({"bits": 3, "granularity": "per_channel"}, A8),
    "w5_affine": _plan({"bits": 5, "symmetric": False, "granularity": "per_channel"}, A8),
    "w4_group16": _plan({"bits": 4, "granularity": "per_group", "group_size": 16}, A8),
    "w12": _plan({"bits": 12}, {"bits": 6, "signed": False, "symmetric": False}),
    "w4_lsq_a8_pact": _plan({"bits": 4, "granularity": "per_channel", "estimator": "lsq"}, {"bits": 8, "signed": False, "estimator": "pact"}),
    "w4_lsq_plus": _plan({"bits": 4, "symmetric": False, "estimator": "lsq_plus"}, {"bits": 8, "signed": False, "symmetric": False, "estimator": "lsq_plus"}),
    "gguf_q4_0": "gguf_q4_0",
    "gguf_q8_0": "gguf_q8_0",
    "w8_dynamic_token": _plan({"bits": 8}, {"bits": 8, "dynamic": True, "granularity": "per_token"}),
}


def _trained(plan, steps: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = prepare(Net(), plan)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):  # a few steps so learned scales and weights move after the last observation
        loss = model(torch.randint(0, 50, (8, 12))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    enable_observers(model, False)
    return model


@pytest.mark.parametrize("name", sorted(PLANS))
def test_convert_matches_fake_quant_exactly(name):
    model = _trained(PLANS[name])
    int_model = convert(model)
    assert is_converted(int_model) and not is_converted(model)  # the original is untouched
    kinds = {type(m) for m in int_model.modules()}
    assert IntLinear in kinds
    idx = torch.randint(0, 50, (16, 12))
    with torch.no_grad():
        torch.testing.assert_close(int_model(idx), model(idx), atol=0, rtol=0)  # float32: bit for bit


def test_layer_types_and_storage():
    int_model = convert(_trained("w4a8"))
    assert isinstance(int_model.emb, IntEmbedding) and isinstance(int_model.c1, IntConv1d) and isinstance(int_model.c2, IntConv2d)
    assert int_model.fc.qweight.dtype == torch.uint8 and int_model.fc.qweight.numel() == 16 * 128 // 2
    assert "weight" not in dict(int_model.fc.named_parameters())  # no float copy of the weight
    assert not hasattr(int_model.fc, "weight_zero_point") or int_model.fc.weight_zero_point is None  # symmetric: z = 0
    sd = int_model.state_dict()
    assert not any("observer" in k or k.endswith("fake_quant_enabled") for k in sd)
    int8 = convert(_trained("w8a8"))
    assert int8.fc.qweight.dtype == torch.int8 and tuple(int8.fc.qweight.shape) == (16, 128)


def test_gguf_scales_stored_as_float16():
    int_model = convert(_trained("gguf_q4_0"))
    assert int_model.fc.weight_scale.dtype == torch.float16
    assert int_model.fc.input_spec.dynamic


@pytest.mark.parametrize("bits", list(range(2, 17)))
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_roundtrip(bits, signed):
    spec = QuantSpec(bits=bits, signed=signed)
    q = torch.randint(spec.qmin, spec.qmax + 1, (37, 11))
    q[0, 0], q[0, 1] = spec.qmin, spec.qmax
    packed = pack_codes(q, spec)
    assert packed.numel() == packed_numel(q.numel(), bits)
    assert packed.numel() * packed.element_size() == (q.numel() * bits + 7) // 8
    torch.testing.assert_close(unpack_codes(packed, spec, tuple(q.shape)), q.to(torch.int32), atol=0, rtol=0)


def test_four_bit_layout_low_nibble_first():
    spec = QuantSpec(bits=4)
    packed = pack_codes(torch.tensor([-8, 7, 0, -1]), spec)  # offset codes 0, 15, 8, 7
    assert packed.tolist() == [0 | 15 << 4, 8 | 7 << 4]


@pytest.mark.parametrize("plan", ["w8a8", "w4a8", "w2a2", "gguf_q4_0"])
def test_size_within_bit_count_bound(plan):
    model = _trained(plan, steps=1)
    int_model = convert(model)
    stored = sum(t.numel() * t.element_size() for t in int_model.state_dict().values())
    # the bound: every quantized weight at its bit-width, its scales at their stored dtype, the rest as stored
    bits_bound = 0
    for k, t in int_model.state_dict().items():
        if k.endswith("qweight"):
            mod = int_model.get_submodule(k.rpartition(".")[0])
            bits_bound += torch.Size(mod.view_shape).numel() * mod.weight_spec.bits / 8
        else:
            bits_bound += t.numel() * t.element_size()
    assert bits_bound <= stored <= 1.05 * bits_bound
    assert stored <= model_size_bytes(model)  # never more than the project's size estimate (float32 scales)


def test_errors_not_prepared_already_converted_unsupported():
    with pytest.raises(QATConfigError, match="not prepared"):
        convert(Net())
    int_model = convert(_trained("w8a8"))
    with pytest.raises(QATConfigError, match="already converted"):
        convert(int_model)

    class MyQuantLinear(QuantLinear):
        pass

    model = _trained("w8a8")
    model.fc.__class__ = MyQuantLinear
    with pytest.raises(QATConfigError, match="no integer layer for MyQuantLinear"):
        convert(model)
    with pytest.raises(QATConfigError, match="nn.Module"):
        convert("model.pt")


def test_error_input_never_observed():
    model = prepare(nn.Sequential(nn.Linear(8, 4)), "w8a8")
    with pytest.raises(QATConfigError, match="never saw data"):
        convert(model)


def test_disabled_quantizer_stays_float():
    model = _trained("w8a8")
    model.fc.input_quantizer.enable_fake_quant(False)
    int_model = convert(model)
    assert int_model.fc.input_spec is None
    idx = torch.randint(0, 50, (4, 12))
    with torch.no_grad():
        torch.testing.assert_close(int_model(idx), model(idx), atol=0, rtol=0)


def test_bn_folded_model_converts():
    from qat.recipes.digits import DigitsCNN

    torch.manual_seed(0)
    model = prepare(DigitsCNN(channels=8), "w8a8", fold_bn=True)
    model(torch.rand(32, 1, 8, 8))
    model.eval()
    enable_observers(model, False)
    int_model = convert(model)
    assert not any(type(m).__name__ == "QuantConvBn2d" for m in int_model.modules())
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(int_model(x), model(x), atol=1e-4, rtol=1e-4)  # folding reorders float ops
