"""Quantized layers, observers and prepare: behaviour on real small tensors."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qat import (
    FakeQuantizer,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    enable_observers,
    is_prepared,
    prepare,
    quantizers,
    unprepare,
)
from qat.kernels import fake_quantize
from qat.observers import MinMaxObserver, MovingAverageMinMaxObserver, qparams_from_range
from qat import LayerQuant


def test_quant_linear_equals_manual_fake_quant():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    w_spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    a_spec = QuantSpec(bits=8, signed=False, symmetric=False)
    q = QuantLinear.from_float(lin, LayerQuant(w_spec, a_spec))
    assert q.weight is lin.weight and q.bias is lin.bias  # shares parameters
    x = torch.randn(5, 16)
    y = q(x)
    s_w, z_w = qparams_from_range(*torch.aminmax(lin.weight.detach(), dim=1), w_spec)
    mn, mx = torch.aminmax(x)
    s_a, z_a = qparams_from_range(mn.reshape(1), mx.reshape(1), a_spec)
    ref = F.linear(fake_quantize(x, s_a, z_a, 0, 255), fake_quantize(lin.weight, s_w, z_w, -8, 7, axis=0), lin.bias)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    back = q.to_float()
    assert type(back) is nn.Linear and back.weight is lin.weight
    torch.testing.assert_close(back(x), lin(x))


@pytest.mark.parametrize("cls,float_mod,shape", [
    (QuantConv2d, nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7)),
    (QuantConv1d, nn.Conv1d(4, 6, 3), (2, 4, 9)),
])
def test_conv_per_group_weights(cls, float_mod, shape):
    spec = QuantSpec(bits=4, granularity="per_group", group_size=12)  # groups over I*k
    q = cls.from_float(float_mod, LayerQuant(spec, QuantSpec(bits=8)))
    y = q(torch.randn(shape))
    assert y.shape == float_mod(torch.randn(shape)).shape
    assert q.weight_quantizer.scale.shape == (6, float_mod.weight[0].numel() // 12)
    w_hat = q.quantized_weight()
    # each group of 12 has at most 16 distinct levels
    groups = w_hat.detach().flatten(1).reshape(6, -1, 12)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, 12)) <= 16


def test_embedding_quantizes_table_not_indices():
    emb = nn.Embedding(20, 32)
    q = QuantEmbedding.from_float(emb, LayerQuant(QuantSpec(bits=4, granularity="per_group", group_size=8), QuantSpec(bits=8)))
    assert q.input_quantizer is None
    out = q(torch.tensor([[1, 5], [7, 19]]))
    assert out.shape == (2, 2, 32)
    assert len(torch.unique(out[0, 0, :8].detach())) <= 16


def test_prepare_unprepare_roundtrip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 8)
    ref = model(x)
    prepare(model, "w8a8")
    assert is_prepared(model) and isinstance(model[0], QuantLinear)
    assert set(model.qat_layers) == {"0", "2"}
    unprepare(model)
    assert not is_prepared(model) and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), ref)


def test_prepared_model_trains_and_state_dict_roundtrips():
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), "w4a4")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    sd = model.state_dict()
    assert "0.input_quantizer.scale" in sd and "0.input_quantizer.observer.min_val" in sd
    fresh = prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), "w4a4")
    fresh.load_state_dict(sd)
    enable_observers(model, False)
    enable_observers(fresh, False)
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_zero_and_constant_ranges_never_give_nan():
    for spec in (QuantSpec(bits=4), QuantSpec(bits=8, signed=False, symmetric=False), QuantSpec(bits=2, signed=False)):
        fq = FakeQuantizer(spec, (8,))
        for x in (torch.zeros(4, 8), torch.full((4, 8), 3.0), torch.full((4, 8), -2.0)):
            fq.observer.reset()
            y = fq(x)
            assert torch.isfinite(y).all() and torch.isfinite(fq.scale).all() and (fq.scale > 0).all()
            if x.abs().max() == 0:
                assert (y == 0).all()


def test_minmax_and_moving_average_observers():
    spec = QuantSpec(bits=8, granularity="per_channel", axis=1)
    mm = MinMaxObserver(spec, (3,))
    ma = MovingAverageMinMaxObserver(QuantSpec(bits=8, granularity="per_channel", axis=1, averaging_constant=0.5), (3,))
    a = torch.tensor([[0.0, -1.0, 2.0], [1.0, 1.0, -2.0]])
    b = torch.tensor([[4.0, -3.0, 0.0], [4.0, -3.0, 0.0]])
    for obs in (mm, ma):
        obs(a)
        obs(b)
    assert mm.min_val.tolist() == [0.0, -3.0, -2.0] and mm.max_val.tolist() == [4.0, 1.0, 2.0]
    assert ma.min_val.tolist() == [2.0, -2.0, -1.0] and ma.max_val.tolist() == [2.5, -1.0, 1.0]


def test_weight_quantizer_tracks_current_weights():
    lin = QuantLinear.from_float(nn.Linear(4, 4), LayerQuant(QuantSpec(bits=8)))
    lin(torch.randn(2, 4))
    with torch.no_grad():
        lin.weight.mul_(0.01)
    lin(torch.randn(2, 4))
    expected = lin.weight.detach().abs().max() / 127.5
    torch.testing.assert_close(lin.weight_quantizer.scale, expected.reshape(1))


def test_dynamic_per_token_activation():
    spec = QuantSpec(bits=8, dynamic=True, granularity="per_token")
    fq = FakeQuantizer(spec, (16,))
    x = torch.randn(3, 5, 16) * torch.arange(1, 6).reshape(1, 5, 1)
    y = fq(x)
    # each token's max |x| is representable within half a step of its own scale
    amax = x.abs().amax(dim=-1, keepdim=True)
    assert ((y - x).abs() <= amax / 127.5 / 2 + 1e-6).all()


def test_learned_estimators_give_scale_gradients():
    for est, signed in (("lsq", True), ("lsq_plus", True), ("pact", False)):
        spec = QuantSpec(bits=4, estimator=est, signed=signed, symmetric=est != "lsq_plus")
        fq = FakeQuantizer(spec, (8,))
        x = torch.randn(16, 8)
        fq(x).pow(2).sum().backward()
        learned = fq.alpha if est == "pact" else fq.scale
        assert learned.grad is not None and torch.isfinite(learned.grad).all()
        if est == "lsq":
            expected = 2 * x.abs().mean() / math.sqrt(7)
            torch.testing.assert_close(fq.scale.detach(), expected.reshape(1))


def test_quantizers_iterates_all():
    model = prepare(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "w8a8")
    assert [n for n, _ in quantizers(model)] == ["0.weight_quantizer", "0.input_quantizer", "1.weight_quantizer", "1.input_quantizer"]


def test_core_never_imports_lightning_hydra_or_wandb():
    code = (
        "import sys, qat, qat.kernels, qat.ptq, qat.size\n"
        "import torch.nn as nn\n"
        "qat.prepare(nn.Sequential(nn.Linear(4, 4)), 'w4a8')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'hydra', 'wandb', 'omegaconf'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_sources_have_no_forbidden_imports():
    import ast
    import pathlib

    import qat

    root = pathlib.Path(qat.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ("pytorch_lightning", "lightning", "hydra", "wandb"), f"{path}: imports {n}"


def test_training_step_reads_no_tensor_as_bool(monkeypatch):
    """After the first step, forward + backward never call bool() on a tensor: on a GPU each such
    read is a device sync. The flags are read from their Python mirrors."""
    for plan in ("w4a8", "w2a2"):  # STE observers, and LSQ from MSE ranges
        torch.manual_seed(0)
        model = prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), plan)
        x = torch.randn(32, 8)
        model(x).sum().backward()  # first step: initialization may inspect values

        def no_bool(self):
            raise AssertionError("bool() on a tensor in the training step")

        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "__bool__", no_bool)
            model(x).sum().backward()


def test_flag_mirrors_follow_load_state_dict():
    src = FakeQuantizer(QuantSpec(bits=8), (4,))
    src(torch.randn(2, 4))
    src.enable_observer(False)
    dst = FakeQuantizer(QuantSpec(bits=8), (4,))
    assert not dst.is_initialized
    dst.load_state_dict(src.state_dict())
    assert dst.is_initialized and not dst.flag("observer_enabled")
    torch.testing.assert_close(dst(torch.ones(2, 4)), src(torch.ones(2, 4)), atol=0, rtol=0)


# --------------------------------------------------------------------------- autocast: the fused cast
# Under autocast a quantizer writes its result in the dtype the matmul runs in, and takes the gradient
# back to float32 in its own backward pass: the same numbers as fake quantization in float32 followed
# by autocast's cast, bit for bit, in the outputs, every gradient and the observer state.

_AUTOCAST_PLANS = {
    # the step benchmark's plan: int4 per-group STE weights (fused observer), int8 dynamic per-token inputs
    "ste_g128_dyn_token": (QuantSpec(bits=4, granularity="per_group", group_size=32),
                           QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_token", dynamic=True)),
    "lsq_channel_static": (QuantSpec(bits=4, granularity="per_channel", axis=0, estimator="lsq"),
                           QuantSpec(bits=8, signed=False, symmetric=False)),
    "lsq_plus_pact": (QuantSpec(bits=3, symmetric=False, granularity="per_channel", axis=0, estimator="lsq_plus"),
                      QuantSpec(bits=4, signed=False, estimator="pact")),
    "dyn_tensor_mxfp4": (QuantSpec(format="mxfp4", bits=4, granularity="per_group", group_size=32),
                         QuantSpec(bits=8, signed=False, symmetric=False, dynamic=True)),
}


def _autocast_model(wspec, aspec, device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.Conv1d(8, 16, 3, padding=1))
    for i in (0, 2):
        net[i] = QuantLinear.from_float(net[i], LayerQuant(wspec, aspec))
    if wspec.format.value == "affine":
        net[3] = QuantConv1d.from_float(net[3], LayerQuant(QuantSpec(bits=4, granularity="per_channel", axis=0), aspec))
    return net.to(device)


def _autocast_run(net, x, device, dtype):
    outs, grads = [], []
    for _ in range(2):  # the second step runs on the state the first one left (initialized scales, ranges)
        net.zero_grad()
        with torch.autocast(device, dtype=dtype):
            y = net[3](net[2](net[1](net[0](x))).reshape(-1, 8, 8))  # (32, 64) -> 32 sequences of 8 x 8
        y.float().square().mean().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    state = {k: v.clone() for k, v in net.state_dict().items()}
    return outs, grads, state


def _compare_fused_and_unfused(plan, device, dtype, monkeypatch):
    import qat.modules as modules_mod

    wspec, aspec = _AUTOCAST_PLANS[plan]
    x = torch.randn(32, 64, device=device) * 2
    calls = []
    real = FakeQuantizer.forward

    def spy(self, t, out_dtype=None):
        calls.append(out_dtype)
        return real(self, t, out_dtype)

    monkeypatch.setattr(FakeQuantizer, "forward", spy)
    # the quantizers as modules (QuantLinear's one-node form binds their ops instead: test_fused_linear.py)
    monkeypatch.setattr(modules_mod, "_FUSED_LINEAR", False)
    fused = _autocast_run(_autocast_model(wspec, aspec, device), x, device, dtype)
    # float32 tensors (the weights, the first input) written in the matmul's dtype; the GELU's output is
    # in it already (None: nothing to cast)
    assert calls.count(dtype) >= 4 and set(calls) == {dtype, None}
    calls.clear()
    monkeypatch.setattr(modules_mod, "_autocast_dtype", lambda t: None)  # the quantizers in float32, autocast casts
    unfused = _autocast_run(_autocast_model(wspec, aspec, device), x, device, dtype)
    assert calls and all(c is None for c in calls)
    for a, b in zip(fused[0], unfused[0]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for ga, gb in zip(fused[1], unfused[1]):
        assert ga.keys() == gb.keys() and len(ga) >= 6
        for n in ga:
            assert ga[n].dtype == gb[n].dtype == torch.float32 and torch.equal(ga[n], gb[n]), n
    assert fused[2].keys() == unfused[2].keys()
    for k in fused[2]:
        assert torch.equal(fused[2][k], unfused[2][k]), k


@pytest.mark.parametrize("plan", sorted(_AUTOCAST_PLANS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_quantizers_write_the_matmul_dtype_bit_exactly(plan, dtype, monkeypatch):
    _compare_fused_and_unfused(plan, "cpu", dtype, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("plan", sorted(_AUTOCAST_PLANS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_quantizers_write_the_matmul_dtype_bit_exactly_on_gpu(plan, dtype, monkeypatch):
    _compare_fused_and_unfused(plan, "cuda", dtype, monkeypatch)


def test_autocast_quantizer_outputs_are_in_the_matmul_dtype():
    """Under autocast the input and weight quantizers return bfloat16 (what the matmul takes); outside
    it, and for a quantizer with a forward hook (telemetry), x's own dtype."""
    wspec, aspec = _AUTOCAST_PLANS["ste_g128_dyn_token"]
    lin = QuantLinear.from_float(nn.Linear(64, 32), LayerQuant(wspec, aspec))
    seen = {}
    for name, q in lin.quantizers():
        q.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.dtype))
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    assert seen == {"weight": torch.float32, "input": torch.float32}  # hooked: x's dtype
    lin2 = QuantLinear.from_float(nn.Linear(64, 32), LayerQuant(wspec, aspec))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xq, wq = lin2.autocast_inputs(x)
    assert xq.dtype == wq.dtype == torch.bfloat16
    xq, wq = lin2.autocast_inputs(x)
    assert xq.dtype == wq.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin2.autocast_inputs(x.double())[0].dtype == torch.float64  # autocast leaves float64 alone
