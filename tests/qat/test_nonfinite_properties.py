"""Issue 15, property tests: random specs and parameters, random tensors with NaN / Inf injected.
Whatever comes in, the result is a clear error (QATConfigError / ValueError / TypeError with a
message) or finite wherever the input is finite, and an observer's or quantizer's state is always
finite."""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qat import FakeQuantizer, QATConfigError, QuantSpec  # noqa: E402
from qat.kernels import fake_quantize, fake_quantize_lsq, fake_quantize_pact  # noqa: E402

SETTINGS = settings(max_examples=int(__import__("os").environ.get("QAT_PROP_EXAMPLES", 50)), deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=not __import__("os").environ.get("QAT_PROP_EXAMPLES"))
BAD = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def tensors_with_bad_values(draw, shape):
    n = math.prod(shape)
    values = draw(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=n, max_size=n))
    x = torch.tensor(values, dtype=torch.float32).reshape(shape)
    k = draw(st.integers(0, n))  # from no bad value to all of them
    idx = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k))
    flat = x.reshape(-1)
    for i in idx:
        flat[i] = draw(BAD)
    if draw(st.booleans()):  # sometimes a whole row is bad
        x[draw(st.integers(0, shape[0] - 1))] = draw(BAD)
    return x


@st.composite
def specs(draw):
    bits = draw(st.integers(2, 8))
    estimator = draw(st.sampled_from(["ste", "ste", "lsq", "lsq_plus", "pact"]))
    dynamic = estimator == "ste" and draw(st.booleans()) and draw(st.booleans())
    signed = False if estimator == "pact" else draw(st.booleans())
    kw = dict(bits=bits, signed=signed, symmetric=draw(st.booleans()), estimator=estimator, dynamic=dynamic,
              narrow_range=signed and draw(st.booleans()), round_mode=draw(st.sampled_from(["half_even", "half_away", "half_up"])))
    if estimator == "pact":
        gran = "per_tensor"
    elif dynamic:
        gran = draw(st.sampled_from(["per_tensor", "per_token", "per_group"]))
    else:
        gran = draw(st.sampled_from(["per_tensor", "per_channel", "per_group"]))
    kw["granularity"] = gran
    if gran == "per_channel":
        kw["axis"] = draw(st.sampled_from([0, 1]))
    if gran == "per_group":
        kw["group_size"] = draw(st.sampled_from([2, 4, 8]))
    if not dynamic:
        observers = ["minmax", "moving_average", "percentile", "mse"]
        if signed and kw["symmetric"] and gran == "per_group":
            observers.append("gguf_q4_0")
        kw["observer"] = draw(st.sampled_from(observers))
    return QuantSpec(**kw)


def _assert_finite_where_finite(y, x):
    assert y.shape == x.shape
    ok = torch.isfinite(x)
    assert torch.isfinite(y[ok]).all(), (x, y)


@SETTINGS
@given(spec=specs(), data=st.data())
def test_fake_quantizer_with_nonfinite_batches(spec, data):
    shape = (3, 8)
    fq = FakeQuantizer(spec, shape, track_history=data.draw(st.booleans()))  # activations / weights
    for step in range(data.draw(st.integers(1, 3))):
        x = data.draw(tensors_with_bad_values(shape))
        fq.train(data.draw(st.booleans()))
        y = fq(x)
        _assert_finite_where_finite(y.detach(), x)
        assert fq.nonfinite_state() == [], (spec, fq.state_tensors())


def _param(draw, shape, positive=False):
    special = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-40, 3e38])
    ordinary = st.floats(1e-3, 10.0) if positive else st.floats(1e-3, 10.0) | st.floats(-10.0, -1e-3)
    n = math.prod(shape)
    values = [draw(ordinary) for _ in range(n)]
    if draw(st.integers(0, 2)) == 0:  # a third of the draws hold one special value
        values[draw(st.integers(0, n - 1))] = draw(special)
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@SETTINGS
@given(data=st.data())
def test_fake_quantize_op_with_random_parameters(data):
    x = data.draw(tensors_with_bad_values((4, 6)))
    qmin = data.draw(st.sampled_from([-128, -8, -2, 0, 0, -8, 3, 7, 0.5, True]))
    qmax = data.draw(st.sampled_from([127, 7, 1, 15, 255, 7, 127, -8, 7.0]))
    kind = data.draw(st.sampled_from(["per_tensor", "axis0", "axis1", "group3"]))
    axis, group = {"per_tensor": (None, None), "axis0": (0, None), "axis1": (1, None), "group3": (None, 3)}[kind]
    pshape = {"per_tensor": (1,), "axis0": (4,), "axis1": (6,), "group3": (4, 2)}[kind]
    scale = _param(data.draw, pshape)
    lo, hi = (int(qmin), int(qmax)) if int(qmin) <= int(qmax) else (0, 1)
    zps = [float(data.draw(st.integers(lo, hi))) for _ in range(math.prod(pshape))]
    if data.draw(st.integers(0, 3)) == 0:  # a quarter of the draws hold one bad zero point
        zps[data.draw(st.integers(0, len(zps) - 1))] = data.draw(st.sampled_from([0.5, 200.0, -129.0, float("nan"), float("inf")]))
    zp = torch.tensor(zps).reshape(pshape)
    op = data.draw(st.sampled_from(["ste", "lsq"]))
    try:
        if op == "ste":
            y = fake_quantize(x, scale, zp, qmin, qmax, axis, group)
        else:
            y = fake_quantize_lsq(x, scale.requires_grad_(), zp, qmin, qmax, axis, group, grad_factor=0.1)
    except (ValueError, TypeError) as exc:
        assert str(exc).startswith(("fake_quantize", "fake_quantize_lsq")), exc
        return
    _assert_finite_where_finite(y.detach(), x)


@SETTINGS
@given(data=st.data())
def test_fake_quantize_pact_with_random_alpha(data):
    x = data.draw(tensors_with_bad_values((4, 6)))
    alpha = _param(data.draw, (1,), positive=True)
    bits = data.draw(st.integers(2, 8))
    try:
        y = fake_quantize_pact(x, alpha, 0, 2**bits - 1)
    except ValueError as exc:
        assert "alpha must be" in str(exc)
        return
    _assert_finite_where_finite(y, x)


@SETTINGS
@given(spec_fields=st.fixed_dictionaries({}, optional={
    "bits": st.one_of(st.integers(-2, 20), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3)),
    "signed": st.one_of(st.booleans(), st.sampled_from(["false", "no", "true", 0, 1, None])),
    "dynamic": st.one_of(st.booleans(), st.sampled_from(["false", "no", 0])),
    "averaging_constant": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=3)),
    "granularity": st.one_of(st.sampled_from(["per_tensor", "per_channel", "PER_GROUP", "row"]), st.integers(), st.none()),
    "group_size": st.one_of(st.none(), st.integers(-2, 40), st.floats(0, 8), st.booleans()),
}))
def test_random_spec_values_are_clear_errors_or_valid(spec_fields):
    try:
        spec = QuantSpec(**spec_fields)
    except QATConfigError as exc:
        msg = str(exc)
        assert msg.startswith("QuantSpec.") and any(k in msg for k in spec_fields), msg
        return
    for name in ("signed", "dynamic"):
        assert isinstance(getattr(spec, name), bool)
    assert isinstance(spec.bits, int) and not isinstance(spec.bits, bool) and 2 <= spec.bits <= 16
    assert math.isfinite(spec.averaging_constant)
