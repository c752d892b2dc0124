"""Issue 15, "nothing silent, nothing lost": NaN / Inf / empty batches never poison observers or
quantizers; a state that is not finite anyway is refused by convert and the exporters; float16 /
bfloat16 prepared models work with float32 quantizer state."""

import math

import pytest
import torch
import torch.nn as nn

from qat import FakeQuantizer, QATConfigError, QuantSpec, convert, prepare
from qat.export import load_packed, save_packed
from qat.export.packed import PackedFormatError
from qat.fake_quant import fake_quantize_dynamic, nonfinite_quantizers
from qat.granularity import Layout
from qat.observers import OBSERVERS, make_observer
from qat.prepare import enable_observers
from qat.ptq import calibrate

NAN, INF = float("nan"), float("inf")

OBSERVER_SPECS = {
    "minmax": QuantSpec(bits=8),
    "moving_average": QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average", averaging_constant=0.5),
    "percentile": QuantSpec(bits=8, observer="percentile", percentile=99.0),
    "mse": QuantSpec(bits=4, symmetric=False, observer="mse"),
    "gguf_q4_0": QuantSpec(bits=4, granularity="per_group", group_size=8, observer="gguf_q4_0"),
}


def _finite_state(obs):
    return bool(torch.isfinite(obs.min_val).all() and torch.isfinite(obs.max_val).all())


def _shape(spec):
    return (4, 1) if spec.granularity.value == "per_group" else (1,)


@pytest.mark.parametrize("kind", sorted(OBSERVER_SPECS))
def test_nan_batch_does_not_poison_observer(kind):
    """The reproduction: one NaN / Inf in a batch left scale 1.19e-7, zero point NaN, for good."""
    spec = OBSERVER_SPECS[kind]
    torch.manual_seed(0)
    clean = [torch.randn(4, 8) for _ in range(3)]
    ref = OBSERVERS[spec.observer](spec, _shape(spec))
    obs = OBSERVERS[spec.observer](spec, _shape(spec))
    for i, x in enumerate(clean):
        ref(x)
        bad = x.clone()
        if i == 1:
            bad[0, 0], bad[1, 3], bad[2, 5] = NAN, INF, -INF  # the same batch, with three bad values
            obs(x.clone().masked_fill(torch.ones_like(x, dtype=torch.bool), NAN))  # and one all-NaN batch
        obs(bad)
        assert _finite_state(obs), (kind, i)
    s, z = obs.qparams()
    assert torch.isfinite(s).all() and torch.isfinite(z).all()
    if kind in ("minmax", "gguf_q4_0"):  # the bad values are left out: only their elements are lost
        cleaned = [x.clone() for x in clean]
        cleaned[1][0, 0], cleaned[1][1, 3], cleaned[1][2, 5] = 0.0, 0.0, 0.0
        again = OBSERVERS[spec.observer](spec, _shape(spec))
        for x in cleaned:
            again(x)
        torch.testing.assert_close(obs.qparams()[0], again.qparams()[0], atol=0, rtol=0)


def test_nan_batch_does_not_poison_fake_quantized_model():
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "w8a8")
    x = torch.randn(32, 8)
    model(x)
    bad = torch.randn(32, 8)
    bad[3, 2] = NAN
    bad[5, 1] = INF
    y = model(bad)
    assert torch.isfinite(y[[i for i in range(32) if i not in (3, 5)]]).all()
    assert not nonfinite_quantizers(model)
    for _, q in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer)]:
        assert q.scale.min() > 1e-3 and torch.isfinite(q.zero_point).all()
    assert torch.isfinite(model(torch.randn(4, 8))).all()  # every later batch is fine


def test_all_nonfinite_first_batches_leave_no_range_behind():
    """Batches without a finite value leave no trace: the first finite batch sets the range as a
    first batch does (a moving average does not start from [0, 0])."""
    fq = FakeQuantizer(QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average"), (4,))
    x = torch.full((2, 4), NAN)
    y = fq(x)
    assert y.isnan().all() and not fq.observer.seen.any() and fq.nonfinite_state() == []
    y = fq(torch.tensor([[INF, -INF, NAN, INF]]))
    assert not fq.observer.seen.any() and fq.nonfinite_state() == [] and torch.isfinite(y[0, [0, 1, 3]]).all()
    fq(torch.empty(0, 4))
    good = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    fq(good)
    assert fq.observer.min_val.item() == 0.0 and fq.observer.max_val.item() == 3.0
    ref = FakeQuantizer(fq.spec, (4,))
    ref(good)
    assert torch.equal(fq.scale, ref.scale) and torch.equal(fq.zero_point, ref.zero_point)


def test_learned_quantizer_initializes_from_its_first_finite_batch():
    fq = FakeQuantizer(QuantSpec(bits=4, estimator="lsq"), (4,))
    x = torch.full((2, 4), NAN)
    assert fq(x) is x and not fq.is_initialized  # passed through, nothing to initialize from
    good = torch.tensor([[1.0, -2.0, 0.5, 0.25]])
    fq(good)
    ref = FakeQuantizer(fq.spec, (4,))
    ref(good)
    assert fq.is_initialized and torch.equal(fq.scale, ref.scale)


def test_convert_refuses_an_input_quantizer_without_finite_data():
    model = prepare(nn.Sequential(nn.Linear(8, 4)), "w8a8")
    calibrate(model, [(torch.full((4, 8), NAN),), (torch.empty(0, 8),)])
    with pytest.raises(QATConfigError, match=r"layer '0': input quantizer saw only empty or non-finite"):
        convert(model.eval())


def test_loaded_nonfinite_range_is_replaced_by_the_next_batch():
    """A checkpoint written before these rules, holding a NaN range, heals on the next finite batch."""
    spec = QuantSpec(bits=8, observer="moving_average")
    src = FakeQuantizer(spec, (4,))
    src(torch.randn(2, 4))
    sd = src.state_dict()
    sd["observer.min_val"] = torch.tensor([NAN])
    sd["zero_point"] = torch.tensor([NAN])
    fq = FakeQuantizer(spec, (4,))
    fq.load_state_dict(sd)
    assert fq.nonfinite_state() == ["zero_point", "observer.min_val"]
    fq(torch.tensor([[-1.0, 2.0, 0.0, 1.0]]))
    assert fq.nonfinite_state() == [] and fq.observer.min_val.item() == -1.0


def test_parameter_without_finite_values_keeps_its_range():
    spec = QuantSpec(bits=8, granularity="per_channel", axis=1, observer="moving_average", averaging_constant=0.5)
    obs = make_observer(spec, (3,))
    obs(torch.tensor([[1.0, -2.0, 3.0], [-1.0, 2.0, 0.5]]))
    before = obs.min_val.clone(), obs.max_val.clone()
    obs(torch.tensor([[NAN, 10.0, INF], [NAN, -10.0, -INF]]))  # channels 0 and 2 saw nothing finite
    assert obs.min_val[0] == before[0][0] and obs.max_val[2] == before[1][2]
    assert obs.min_val[1] == (-2.0 + -10.0) / 2 and obs.max_val[1] == (2.0 + 10.0) / 2


def test_weight_observer_keeps_last_range_for_nan_channel():
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    fq = FakeQuantizer(spec, (3, 4), track_history=False)
    w = torch.randn(3, 4)
    fq(w)
    s0 = fq.scale.clone()
    w2 = w.clone()
    w2[1] = NAN
    y = fq(w2)
    assert torch.equal(fq.scale[1], s0[1]) and torch.isfinite(fq.scale).all()
    assert torch.isfinite(y[[0, 2]]).all() and y[1].isnan().all()


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_dynamic_nan_row_leaves_other_rows(granularity):
    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity=granularity, dynamic=True)
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    ref = fake_quantize_dynamic(x, spec)
    bad = x.clone()
    bad[1, 3] = NAN
    bad[2] = NAN
    y = fake_quantize_dynamic(bad, spec)
    assert torch.equal(y[[0, 3]], ref[[0, 3]]) if granularity == "per_token" else torch.isfinite(y[[0, 3]]).all()
    assert y[2].isnan().all() and y[1, 3].isnan() and torch.isfinite(y[1, [0, 1, 2, 4]]).all()
    mn, mx = Layout.of(spec).aminmax(bad, finite=True)
    assert torch.isfinite(mn).all() == (granularity == "per_tensor") and torch.isfinite(mn[[0, 1, 3]] if granularity == "per_token" else mn).all()


def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


@pytest.mark.parametrize("plan", ["w8a8", "w2a2", "w4a8_g32"])
def test_empty_batch_while_observing_is_skipped(plan):
    """The reproduction: an empty batch while observing raised aminmax's raw RuntimeError."""
    torch.manual_seed(0)
    model = prepare(_mlp(), plan)
    empty = torch.empty(0, 32)
    assert model(empty).shape == (0, 4)  # before any data: nothing to observe, no error
    batches = [(empty,), (torch.randn(16, 32),), (empty,), (torch.randn(16, 32),)]
    assert calibrate(model, batches) == 4
    torch.manual_seed(0)
    ref = prepare(_mlp(), plan)
    calibrate(ref, [b for b in batches if b[0].numel()])
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        if "input_quantizer" in name:
            assert torch.equal(a, b), name  # the empty batches changed no activation statistic
    y = model(torch.randn(3, 32))
    y.sum().backward()
    assert torch.isfinite(y).all()


def test_nonfinite_raise_option():
    spec = QuantSpec(bits=8, nonfinite="raise")
    fq = FakeQuantizer(spec, (4,))
    fq(torch.randn(2, 4))
    with pytest.raises(QATConfigError, match=r"holds 1 non-finite value\(s\).*nonfinite is raise"):
        fq(torch.tensor([[1.0, NAN, 0.0, 2.0]]))
    dyn = QuantSpec(bits=8, granularity="per_token", dynamic=True, nonfinite="raise")
    with pytest.raises(QATConfigError, match="non-finite"):
        fake_quantize_dynamic(torch.tensor([[1.0, INF]]), dyn)
    assert QuantSpec().nonfinite.value == "ignore"


def test_lsq_init_ignores_nonfinite():
    spec = QuantSpec(bits=4, estimator="lsq", granularity="per_channel", axis=0)
    fq = FakeQuantizer(spec, (2, 4))
    w = torch.tensor([[1.0, -1.0, 2.0, NAN], [0.5, INF, -0.5, 0.5]])
    fq(w)
    expected = 2 * torch.tensor([4.0 / 3, 1.5 / 3]) / math.sqrt(7)
    torch.testing.assert_close(fq.scale, expected)
    pact = FakeQuantizer(QuantSpec(bits=4, signed=False, estimator="pact"), (4,))
    pact(torch.tensor([[1.0, NAN, 3.0, INF]]))
    assert pact.alpha.item() == 3.0


def _poisoned(plan="w8a8"):
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(8, 4)), plan)
    model(torch.randn(8, 8))
    model.eval()
    return model


@pytest.mark.parametrize(
    "plan,poison,match",
    [
        ("w8a8", lambda m: m[0].input_quantizer.zero_point.fill_(NAN), r"layer '0' input quantizer: zero_point not finite"),
        ("w8a8", lambda m: m[0].input_quantizer.observer.max_val.fill_(INF), r"input quantizer: observer.max_val not finite"),
        ("w2a2", lambda m: m[0].weight_quantizer.scale.data.fill_(NAN), r"layer '0' weight quantizer: scale not finite"),
        ("w2a2", lambda m: m[0].input_quantizer.scale.data.fill_(INF), r"input quantizer: scale not finite"),
        ({"rules": [{"match": "*", "input": {"bits": 4, "signed": False, "estimator": "pact"}}]},
         lambda m: m[0].input_quantizer.alpha.data.fill_(INF), r"input quantizer: alpha not finite"),
        ("w8a8", lambda m: m[0].weight.data.__setitem__((0, 0), NAN), r"layer '0': the weight holds NaN or Inf"),
    ],
)
def test_convert_refuses_nonfinite_quantizer_state(plan, poison, match):
    model = _poisoned(plan)
    enable_observers(model, False)
    with torch.no_grad():
        poison(model)
    assert nonfinite_quantizers(model) or "weight holds" in match
    with pytest.raises(QATConfigError, match=match):
        convert(model)


def test_nonfinite_quantizers_names_the_quantizers():
    model = _poisoned("w2a2")
    assert nonfinite_quantizers(model) == {}
    with torch.no_grad():
        model[0].input_quantizer.scale.fill_(NAN)
        model[0].weight_quantizer.zero_point.fill_(INF)
    assert nonfinite_quantizers(model) == {"0.weight_quantizer": ["zero_point"], "0.input_quantizer": ["scale"]}


def test_poisoned_model_is_not_saved_or_loaded_packed(tmp_path):
    int_model = convert(_poisoned())
    path = save_packed(int_model, tmp_path / "ok.safetensors")
    with torch.no_grad():
        int_model[0].weight_scale.fill_(NAN)
    with pytest.raises(QATConfigError, match=r"save_packed\(\) refuses .*layer '0': weight_scale"):
        save_packed(int_model, tmp_path / "bad.safetensors")
    # a file an older version wrote from a poisoned model: refused on load, naming the layer
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["0.input_zero_point"] = torch.tensor([NAN])
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.raises(PackedFormatError, match=r"layer '0': input_zero_point"):
        load_packed(tmp_path / "old.safetensors", nn.Sequential(nn.Linear(8, 4)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("plan", ["w8a8", "w4a8", "w2a2", "w4a8_g32"])
def test_half_prepared_model_trains_and_converts(dtype, plan):
    """The reproduction: a .half() / .bfloat16() prepared model raised a raw TypeError (scale must
    be float32). The quantizer state stays float32; the model computes in its dtype."""
    torch.manual_seed(0)
    model = prepare(_mlp(), plan).to(dtype)
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            assert all(t.dtype == torch.float32 for t in m.state_tensors().values())
    x = torch.randn(8, 32).to(dtype)
    y = model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert model[0].weight.grad.dtype == dtype
    model.eval()
    int_model = convert(model)
    assert torch.equal(int_model(x), model(x))
    back = int_model.float()
    assert back[0].weight_scale.dtype in (torch.float32, torch.float16) and back(x.float()).dtype == torch.float32


def test_half_fake_quant_equals_float32_math():
    """float16 in, float32 math, float16 out: the op's result on the float16 weight, cast back."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    w = torch.randn(8, 16)
    a, b = FakeQuantizer(spec, (8, 16)), FakeQuantizer(spec, (8, 16)).half()
    ya, yb = a(w.half().float()), b(w.half())
    assert b.scale.dtype == torch.float32 and torch.equal(a.scale, b.scale)
    assert torch.equal(yb, ya.half())


@pytest.mark.parametrize("layout", [Layout(), Layout(axis=0), Layout(axis=1), Layout(group_size=4), Layout(per_row=True)])
def test_finite_reductions_equal_plain_ones_on_finite_data(layout):
    torch.manual_seed(0)
    x = torch.randn(6, 8) * 5
    mn, mx = layout.aminmax(x)
    fmn, fmx = layout.aminmax(x, finite=True)
    assert torch.equal(mn, fmn) and torch.equal(mx, fmx)
    if not layout.per_row:
        shape = layout.param_shape(x.shape)
        assert torch.equal(layout.mean_abs(x, shape), layout.mean_abs(x, shape, finite=True))


@pytest.mark.parametrize("plan", ["w4a8", pytest.param("w2a2", marks=pytest.mark.slow), pytest.param("w4a8_g32", marks=pytest.mark.slow)])
def test_compiled_training_step_has_no_graph_break(plan):
    """The finite-only ranges read no tensor value: torch.compile keeps the quantizers in one graph
    (a bool() read of the observed range broke it 7-17 times a model, and on an H200 the cudagraphs
    STE step went from 40.2 to 92.2 ms: benchmarks/results/train_step_h200_58e780b.md)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), plan)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(8, 64)
    try:
        for _ in range(3):
            compiled(x).sum().backward()
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
