"""``fake_quantize_minmax`` (range, scale / zero point and fake quantization in one op) is what the
unfused path computes, bit for bit: the dynamic per-token / per-group quantizer, and a weight's
min/max observer with its state. On the CPU this runs the reference; tests/kernels/test_cupy_minmax.py
holds the kernel to the same reference on a GPU."""

import pytest
import torch
import torch.nn as nn

from qat import QuantSpec, prepare
from qat.fake_quant import FakeQuantizer
from qat.granularity import Layout
from qat.kernels import fake_quantize, fake_quantize_minmax
from qat.observers import qparams_from_range


def _with_nonfinite(x):
    x = x.clone()
    x.view(-1)[::37] = float("nan")
    x.view(-1)[5::41] = float("inf")
    x.view(-1, x.shape[-1])[0] = float("nan")
    return x


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_token", dynamic=True),
    QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=32, dynamic=True),
    QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=32, dynamic=True, scale_dtype="float16"),
    QuantSpec(bits=3, symmetric=False, granularity="per_token", dynamic=True, round_mode="half_up"),
])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_dynamic_equals_the_unfused_path(spec, nonfinite):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * 3
    if nonfinite:
        x = _with_nonfinite(x)
    layout = Layout.of(spec)
    s, z = qparams_from_range(*layout.aminmax(x, finite=True), spec)
    axis, gs = layout.op_args(x)
    want = fake_quantize(x, s, z, spec.qmin, spec.qmax, axis, gs, spec.round_mode.value)
    fq = FakeQuantizer(spec, (64,))
    got = fq(x)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def _weight_pair(spec, shape):
    fused = FakeQuantizer(spec, shape, track_history=False)
    plain = FakeQuantizer(spec, shape, track_history=False)
    plain._minmax_row = None  # the unfused path: observer.forward, qparams, fake_quantize
    assert fused._minmax_row is not None
    return fused, plain


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=32),
    QuantSpec(bits=4, symmetric=True, granularity="per_channel", axis=0),
    QuantSpec(bits=8, symmetric=False, granularity="per_channel", axis=0, observer="moving_average"),
    QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=32, scale_dtype="float16"),
])
def test_weight_observer_fused_equals_unfused(spec):
    torch.manual_seed(0)
    shape = (16, 64)
    fused, plain = _weight_pair(spec, shape)
    w1 = nn.Parameter(torch.randn(shape))
    w2 = nn.Parameter(w1.detach().clone())
    for step in range(3):
        if step == 1:  # a step where some rows hold no finite value: those keep their range
            with torch.no_grad():
                w1[2] = float("nan")
                w2[2] = float("nan")
        y1, y2 = fused(w1), plain(w2)
        assert torch.equal(torch.nan_to_num(y1), torch.nan_to_num(y2))
        g = torch.randn(shape)
        y1.backward(g)
        y2.backward(g)
        assert torch.equal(w1.grad, w2.grad)
        for (k1, t1), (k2, t2) in zip(fused.state_dict().items(), plain.state_dict().items()):
            assert k1 == k2 and torch.equal(t1, t2), k1
        assert torch.equal(fused.observer.seen, plain.observer.seen)
        assert fused.is_initialized and fused.observer.is_initialized
        with torch.no_grad():
            w1.copy_(torch.randn(shape) * (step + 1))
            w2.copy_(w1)


def test_observers_that_are_not_plain_minmax_take_the_unfused_path():
    for obs in ("percentile", "mse"):
        fq = FakeQuantizer(QuantSpec(bits=4, granularity="per_channel", axis=0, observer=obs), (8, 32), track_history=False)
        assert fq._minmax_row is None
    assert FakeQuantizer(QuantSpec(bits=4, granularity="per_channel", axis=1), (8, 32), track_history=False)._minmax_row is None
    # activations keep a history: their observers are not reset a batch
    assert FakeQuantizer(QuantSpec(bits=8, granularity="per_channel", axis=0), (8, 32))._minmax_row is None


def test_bad_arguments_raise():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="row"):
        fake_quantize_minmax(x, 48, -8, 7)
    with pytest.raises(TypeError, match="state"):
        fake_quantize_minmax(x, 32, -8, 7, state=(torch.zeros(4),) * 5)
    with pytest.raises(ValueError, match="one entry a row"):
        fake_quantize_minmax(x, 32, -8, 7, state=(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool),
                                                   torch.ones(3), torch.zeros(3)))
    with pytest.raises(ValueError, match="qmin < qmax"):
        fake_quantize_minmax(x, 32, 7, -8)


def test_compiled_steps_do_not_recompile():
    """The fused weight path sets its flags without reading them under torch.compile: the first
    step's flip of ``initialized`` does not recompile the graph at the second step."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), "w4a8")
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 64)
    with torch._dynamo.config.patch(error_on_recompile=True):
        try:
            for _ in range(3):
                compiled(x).sum().backward()
        finally:
            torch._dynamo.reset()
    fq = model[0].weight_quantizer
    assert fq.is_initialized and bool(fq.initialized) and fq.observer.is_initialized
    eager = prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), "w4a8")
    eager.load_state_dict(model.state_dict())
    assert torch.equal(eager(x), model(x))


@pytest.mark.parametrize("route", ["kernel", "inductor"])
def test_compiled_routes_match_eager(route):
    """Both torch.compile routes (the fused op; PyTorch ops for Inductor to fuse) give eager's
    outputs, gradients and quantizer state, without a recompile across steps."""
    import torch._dynamo

    from qat.kernels import set_compile_route

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    plan = {"rules": [{"match": "*", "types": ["Linear"],
                       "weight": {"bits": 4, "symmetric": True, "granularity": "per_group", "group_size": 32},
                       "input": {"bits": 8, "signed": False, "symmetric": False, "granularity": "per_token", "dynamic": True}}]}
    eager = prepare(net, plan)
    compiled_model = prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), plan)
    compiled_model.load_state_dict(eager.state_dict())
    previous = set_compile_route(route)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(compiled_model, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(3):
                x = torch.randn(4, 5, 64) * (step + 1)
                y1, y2 = eager(x), compiled(x)
                assert torch.equal(y1, y2)
                y1.square().sum().backward()
                y2.square().sum().backward()
                for (n, p1), p2 in zip(eager.named_parameters(), compiled_model.parameters()):
                    assert torch.equal(p1.grad, p2.grad), n
                for (n, b1), b2 in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
                    assert torch.equal(b1, b2), n
    finally:
        set_compile_route(previous)
        torch._dynamo.reset()


@pytest.mark.parametrize("route", ["kernel", "inductor"])
@pytest.mark.parametrize("estimator", ["lsq", "pact", "fixed"])
def test_compiled_routes_match_eager_learned(route, estimator):
    """LSQ weights, PACT inputs (the opaque op on both routes) and a fixed-qparams (static)
    quantizer under both torch.compile routes give eager's outputs and gradients, scales' and
    clip's included."""
    import torch._dynamo

    from qat.kernels import fake_quantize, fake_quantize_lsq, fake_quantize_pact, set_compile_route

    torch.manual_seed(0)
    x0 = torch.randn(6, 64) * 3
    s0 = torch.rand(6, 2) * 0.2 + 0.05

    def f(x, s):
        if estimator == "lsq":
            return fake_quantize_lsq(x, s, torch.zeros_like(s), -8, 7, group_size=32, grad_factor=0.3)
        if estimator == "pact":
            return fake_quantize_pact(x, s[:1, :1].reshape(1) * 20, 0, 15)
        return fake_quantize(x, s.detach(), torch.zeros_like(s), -8, 7, group_size=32) * s.sum()

    previous = set_compile_route(route)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        outs = []
        for fn in (f, compiled):
            x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
            y = fn(x, s)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            outs.append((y.detach(), x.grad, s.grad))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    finally:
        set_compile_route(previous)
        torch._dynamo.reset()
