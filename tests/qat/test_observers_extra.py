"""Percentile and MSE-optimal observers (qat.observers)."""

import pytest
import torch

from qat import FakeQuantizer, QATConfigError, QuantSpec
from qat.granularity import Layout
from qat.observers import OBSERVERS, MSEObserver, PercentileObserver, make_observer
from qat.spec import ObserverKind


def _fq_error(x, mn, mx, spec):
    from qat.observers import qparams_from_range

    s, z = qparams_from_range(mn, mx, spec)
    xq = (torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax) - z) * s
    return float((xq - x).pow(2).sum())


def test_table_has_every_kind():
    assert set(OBSERVERS) == set(ObserverKind)
    assert OBSERVERS[ObserverKind.PERCENTILE] is PercentileObserver
    assert OBSERVERS[ObserverKind.MSE] is MSEObserver


def test_percentile_exact_on_arange():
    spec = QuantSpec(bits=8, signed=False, symmetric=False, observer="percentile", percentile=99.0)
    obs = make_observer(spec, (1,))
    obs(torch.arange(1001.0)[torch.randperm(1001)])
    torch.testing.assert_close(obs.max_val, torch.tensor([990.0]), atol=0, rtol=0)
    torch.testing.assert_close(obs.min_val, torch.tensor([10.0]), atol=0, rtol=0)


@pytest.mark.parametrize("granularity,shape,extra", [
    ("per_tensor", (16, 64), {}),
    ("per_channel", (16, 64), {"axis": 0}),
    ("per_channel", (16, 64), {"axis": 1}),
    ("per_group", (16, 64), {"group_size": 16}),
])
def test_percentile_matches_quantile_per_scale(granularity, shape, extra):
    spec = QuantSpec(bits=8, observer="percentile", percentile=97.5, granularity=granularity, **extra)
    x = torch.randn(shape)
    pshape = Layout.of(spec).param_shape(shape)
    obs = PercentileObserver(spec, pshape)
    obs(x)
    if granularity == "per_tensor":
        rows = x.reshape(1, -1)
    elif granularity == "per_channel":
        rows = x.movedim(spec.axis, 0).reshape(shape[spec.axis], -1)
    else:
        rows = x.reshape(-1, spec.group_size)
    torch.testing.assert_close(obs.max_val.reshape(-1), torch.quantile(rows, 0.975, dim=1))
    torch.testing.assert_close(obs.min_val.reshape(-1), torch.quantile(rows, 0.025, dim=1))


def test_percentile_averages_batches_and_clips_outlier():
    spec = QuantSpec(bits=8, observer="percentile", percentile=99.0)
    obs = PercentileObserver(spec, (1,))
    a, b = torch.randn(4096), torch.randn(4096) * 3
    a[0] = 1000.0  # one outlier does not move a percentile range
    obs(a)
    obs(b)
    expected = (torch.quantile(a, 0.99) + torch.quantile(b, 0.99)) / 2
    torch.testing.assert_close(obs.max_val, expected.reshape(1))
    assert int(obs.num_batches) == 2
    obs.reset()
    obs(b)
    torch.testing.assert_close(obs.max_val, torch.quantile(b, 0.99).reshape(1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_beats_minmax_and_is_grid_optimal(bits, symmetric):
    torch.manual_seed(bits)
    spec = QuantSpec(bits=bits, symmetric=symmetric, observer="mse")
    x = torch.randn(8192)
    x[:4] *= 8  # heavy tail
    obs = MSEObserver(spec, (1,))
    obs(x)
    err = _fq_error(x, obs.min_val, obs.max_val, spec)
    mn, mx = x.min().reshape(1), x.max().reshape(1)
    assert err <= _fq_error(x, mn, mx, spec) + 1e-6
    # no candidate of the grid does better
    best = min(_fq_error(x, a * mn, a * mx, spec) for a in MSEObserver.grid)
    assert err == pytest.approx(best, rel=1e-5)
    if bits <= 4:
        assert float(obs.max_val) < float(mx) * 0.8


def test_mse_per_channel_independent():
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0, observer="mse")
    w = torch.randn(4, 512) * torch.tensor([[0.1], [1.0], [10.0], [100.0]])
    obs = MSEObserver(spec, (4,))
    obs(w)
    ratio = obs.max_val / w.amax(dim=1)
    # the clip is relative: every channel gets about the same fraction of its max
    assert float(ratio.max() - ratio.min()) < 0.25
    assert torch.all(obs.max_val > 0)


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_zero_input_gives_tiny_positive_scale(observer):
    spec = QuantSpec(bits=4, observer=observer)
    obs = make_observer(spec, (1,))
    obs(torch.zeros(100))
    s, z = obs.qparams()
    assert torch.isfinite(s).all() and float(s) > 0 and float(z) == 0


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_fake_quantizer_uses_new_observers(observer):
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0, observer=observer)
    fq = FakeQuantizer(spec, (8, 32), track_history=False)
    w = torch.randn(8, 32)
    y = fq(w)
    assert isinstance(fq.observer, OBSERVERS[ObserverKind(observer)])
    assert y.shape == w.shape and float((y - w).abs().max()) < float(w.abs().max())
    state = fq.state_dict()
    assert "observer.num_batches" in state
    fq2 = FakeQuantizer(spec, (8, 32), track_history=False)
    fq2.load_state_dict(state)
    torch.testing.assert_close(fq2.scale, fq.scale, atol=0, rtol=0)


def test_bad_percentile_is_config_error():
    with pytest.raises(QATConfigError, match="percentile must be in"):
        QuantSpec(observer="percentile", percentile=40.0)
    with pytest.raises(QATConfigError, match="observer must be one of"):
        QuantSpec(observer="histogram")
