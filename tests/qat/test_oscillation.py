"""qat.oscillation: the dampening loss and the oscillation tracker / iterative freezing."""

import pytest
import torch
import torch.nn as nn

from qat import QATConfigError, QuantPlan, init_smoothing, prepare, quant_layers
from qat.granularity import quantize_codes
from qat.oscillation import OscillationTracker, dampening_loss, weight_layers

GRANULARITIES = {
    "per_group": {"granularity": "per_group", "group_size": 8},
    "per_channel": {"granularity": "per_channel", "axis": 0},
    "per_tensor": {"granularity": "per_tensor"},
}


def _model(gran: str = "per_group", estimator: str = "lsq_plus", conv: bool = False, seed: int = 0) -> nn.Module:
    """A prepared, initialized two-layer model with 4-bit asymmetric weights (and a Conv2d)."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 4, 2), nn.Flatten()] if conv else []
    layers += [nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)]
    weight = {"bits": 4, "symmetric": False, "estimator": estimator, "observer": "minmax", **GRANULARITIES[gran]}
    model = prepare(nn.Sequential(*layers), QuantPlan.from_dict({"name": "w4", "rules": [{"match": "*", "weight": weight}]}))
    model(torch.randn(4, 2, 3, 3) if conv else torch.randn(4, 16))  # observes / initializes the learned scales
    return model


def _inputs(model: nn.Module, n: int = 64) -> torch.Tensor:
    return torch.randn(n, 2, 3, 3) if isinstance(model[0], nn.Conv2d) else torch.randn(n, 16)


def _codes(layer) -> torch.Tensor:
    """The layer's integer weight codes as the forward pass computes them (qat.convert's math)."""
    fq = layer.weight_quantizer
    s, z = fq.current_qparams()
    w = layer.weight.detach()
    if layer.input_smooth is not None:
        w = w * layer.input_smooth.detach()
    w = w.flatten(1) if (w.dim() > 2 and fq.group_size is not None) else w
    return quantize_codes(w, s, z, fq.spec).reshape(layer.weight.shape)


def _to_centres(model: nn.Module) -> None:
    """Move every latent weight onto the fake-quantized value the forward pass gives it."""
    with torch.no_grad():
        for _, layer in weight_layers(model):
            layer.weight.copy_(layer.quantized_weight().detach().view_as(layer.weight))


# ----------------------------------------------------------------------------- dampening


@pytest.mark.parametrize("gran", sorted(GRANULARITIES))
@pytest.mark.parametrize("conv", [False, True])
def test_dampening_zero_on_bin_centres_positive_elsewhere(gran, conv):
    model = _model(gran, conv=conv)
    assert float(dampening_loss(model).detach()) > 0  # trained-from-float weights sit anywhere in their bins
    _to_centres(model)
    assert float(dampening_loss(model).detach()) == 0.0
    assert float(dampening_loss(model, in_steps=True, reduction="mean").detach()) == 0.0
    with torch.no_grad():
        lin = model[-1]
        lin.weight[0, 0] += 0.3 * lin.weight_quantizer.scale.detach().flatten()[0]  # a third of a step off centre
    assert float(dampening_loss(model).detach()) > 0


@pytest.mark.parametrize("gran", sorted(GRANULARITIES))
def test_dampening_gradient_reaches_latent_weights_only(gran):
    """``2 (w - q(w))`` inside the grid, 0 for clipped weights; nothing for scales, offsets or smoothing."""
    model = _model(gran)
    init_smoothing(model, learnable=True)
    with torch.no_grad():
        for _, layer in quant_layers(model):
            layer.input_smooth.uniform_(0.5, 2.0)
        model[-1].weight[0, :3] = torch.tensor([50.0, -50.0, 0.0])  # far outside the grid: clipped
    loss = dampening_loss(model)
    loss.backward()
    for _, layer in quant_layers(model):
        fq = layer.weight_quantizer
        assert fq.scale.grad is None and fq.zero_point.grad is None
        assert layer.input_smooth.grad is None
        with torch.no_grad():
            w_eff = layer.weight * layer.input_smooth
            centre = fq(w_eff)  # the forward's fake-quantized weight
            s, z = (_bcast(t, w_eff, fq) for t in fq.current_qparams())
            inside = (w_eff >= (fq.spec.qmin - z) * s) & (w_eff <= (fq.spec.qmax - z) * s)  # clip(w) passes the gradient
            want = torch.where(inside, 2 * (w_eff - centre) * layer.input_smooth, torch.zeros(()))
        torch.testing.assert_close(layer.weight.grad, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(model[-1].weight.grad[0, :2], torch.zeros(2))  # clipped: no pull
    # the value: the forward's fake-quantized weight against the clipped latent one, in weight
    # units or in steps, summed or averaged
    sums, n = {False: 0.0, True: 0.0}, 0
    with torch.no_grad():
        for _, layer in quant_layers(model):
            fq = layer.weight_quantizer
            w_eff = layer.weight * layer.input_smooth
            s, z = (_bcast(t, w_eff, fq) for t in fq.current_qparams())
            d = fq(w_eff) - torch.minimum(torch.maximum(w_eff, (fq.spec.qmin - z) * s), (fq.spec.qmax - z) * s)
            sums[False] += float(d.pow(2).sum())
            sums[True] += float((d / s).pow(2).sum())
            n += d.numel()
    for in_steps in (False, True):
        assert float(dampening_loss(model, in_steps=in_steps).detach()) == pytest.approx(sums[in_steps], rel=1e-5)
        assert float(dampening_loss(model, in_steps, "mean").detach()) == pytest.approx(sums[in_steps] / n, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        dampening_loss(model, reduction="max")


def _bcast(p: torch.Tensor, w: torch.Tensor, fq) -> torch.Tensor:
    """A scale / zero point repeated to ``w``'s shape (per tensor, per channel axis 0, per group)."""
    if fq.group_size is not None:
        return p.detach().repeat_interleave(fq.group_size, dim=-1)
    if fq.axis is not None:
        return p.detach().reshape(-1, *([1] * (w.dim() - 1))).expand_as(w)
    return p.detach().reshape(()).expand_as(w)


# ----------------------------------------------------------------------------- tracker


@pytest.mark.parametrize("gran", sorted(GRANULARITIES))
@pytest.mark.parametrize("conv", [False, True])
def test_tracker_codes_are_the_forward_codes(gran, conv):
    model = _model(gran, conv=conv)
    init_smoothing(model, match=str(len(model) - 1), learnable=True)
    with torch.no_grad():
        model[-1].input_smooth.uniform_(0.5, 2.0)
    tracker = OscillationTracker(model, threshold=None)
    want = torch.cat([_codes(layer).flatten().float() for _, layer in weight_layers(model)])
    assert torch.equal(tracker._codes_now(), want)
    assert tracker.numel == want.numel()


def test_tracker_freezes_a_flipping_weight_and_not_a_stable_one():
    model = _model()
    _to_centres(model)
    tracker = OscillationTracker(model, momentum=0.9, threshold=0.25)
    lin = model[0]
    name = [n for n, layer in weight_layers(model) if layer is lin][0]
    s = lin.weight_quantizer.scale.detach()[0, 0]
    w0 = lin.weight.detach()[0, 0].clone()
    start = _codes(lin)[0, 0]
    qmin, z = lin.weight_quantizer.spec.qmin, lin.weight_quantizer.current_qparams()[1][0, 0]
    with torch.no_grad():
        lin.weight[0, 2] = (qmin + 1 - z) * s  # the centre of the second-lowest code: room to climb
    for step in range(8):  # up one code, back, up, ...: an oscillation on every step after the first
        with torch.no_grad():
            lin.weight[0, 0] = w0 + (s if step % 2 == 0 else 0.0)
            lin.weight[0, 1] += 1e-4 * s  # drifts inside its bin: stable code
            lin.weight[0, 2] += s  # changes code on every step, always the same way: no oscillation
        tracker.step()
        if tracker.frozen_mask(name)[0, 0]:
            break
    frozen = tracker.frozen_mask(name)
    assert frozen[0, 0] and int(frozen.sum()) == 1, "only the flipping weight freezes"
    assert tracker.frequency(name)[0, 0] > 0.25 and tracker.frequency(name)[0, 1] == 0 and tracker.frequency(name)[0, 2] == 0
    held = _codes(lin)[0, 0]
    assert held in (start, start + 1)  # the rounded average of the codes it flipped between
    assert tracker.stats()["frozen"] == pytest.approx(1 / tracker.numel)
    assert tracker.frozen_by_layer()[name] == pytest.approx(1 / lin.weight.numel())
    for _ in range(3):  # whatever moves it later, the tracker puts it back on its code's bin centre
        with torch.no_grad():
            lin.weight[0, 0] += 3 * s
        tracker.step()
        assert _codes(lin)[0, 0] == held
    assert float(lin.weight.detach()[0, 0]) == pytest.approx(float(lin.quantized_weight()[0, 0].detach()), abs=1e-7)


def test_tracker_only_tracks_without_threshold_or_with_freeze_false():
    model = _model()
    lin = model[0]
    s = lin.weight_quantizer.scale.detach()[0, 0]
    trackers = [OscillationTracker(model, momentum=0.5, threshold=None), OscillationTracker(model, momentum=0.5, threshold=0.1)]
    w0 = lin.weight.detach().clone()
    for step in range(6):
        with torch.no_grad():
            lin.weight.copy_(w0 + (s if step % 2 == 0 else 0.0))  # every weight flips every step
        for t in trackers:
            t.step(freeze=False)
    for t in trackers:
        st = t.stats()
        assert st["frozen"] == 0.0 and st["steps"] == 6
        assert st["flip_rate"] > 0.1 and st["osc_rate"] > 0.1 and st["osc_freq"] > 0.1
    assert torch.equal(lin.weight, w0)  # tracking leaves the weights alone


@pytest.mark.parametrize("gran, conv", [("per_group", False), ("per_group", True), ("per_channel", False)])
def test_frozen_codes_hold_through_adam_steps(gran, conv):
    """A large Adam step size makes weights oscillate; the frozen ones keep their code (and the
    forward uses it) for every later step, while the learned scales keep moving."""
    model = _model(gran, conv=conv, seed=1)
    init_smoothing(model, match=str(len(model) - 1), learnable=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    tracker = OscillationTracker(model, momentum=0.9, threshold=0.15)
    torch.manual_seed(2)
    x = _inputs(model)
    y = torch.randn(x.shape[0], 4)
    held = None
    scale0 = model[-1].weight_quantizer.scale.detach().clone()
    for step in range(40):
        loss = (model(x) - y).pow(2).mean() + 1e-2 * dampening_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.step()
        codes = {n: _codes(layer) for n, layer in weight_layers(model)}
        if step == 20:
            held = {n: (tracker.frozen_mask(n).clone(), codes[n].clone()) for n in codes}
            assert sum(int(m.sum()) for m, _ in held.values()) > 0, "nothing froze: the test lost its point"
        elif held is not None:
            for n, (mask, c0) in held.items():
                assert torch.equal(codes[n][mask], c0[mask]), n
                assert torch.equal(tracker.frozen_mask(n) & mask, mask)  # frozen stays frozen
    assert not torch.equal(model[-1].weight_quantizer.scale.detach(), scale0)  # scales still learn
    assert 0 < tracker.frozen_share() < 1


def test_bad_arguments_raise():
    model = _model()
    for m in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(QATConfigError, match="momentum must be in"):
            OscillationTracker(model, momentum=m)
    for th in (0.0, -0.01):
        with pytest.raises(QATConfigError, match="threshold must be > 0"):
            OscillationTracker(model, threshold=th)
    act_only = prepare(nn.Sequential(nn.Linear(8, 8)), QuantPlan.from_dict({"name": "a8", "rules": [
        {"match": "*", "input": {"bits": 8, "signed": False, "symmetric": False, "dynamic": True, "granularity": "per_token"}}]}))
    for bad in (nn.Sequential(nn.Linear(8, 8)), act_only):
        with pytest.raises(QATConfigError, match="no weight quantizers"):
            OscillationTracker(bad)
        with pytest.raises(QATConfigError, match="no weight quantizers"):
            dampening_loss(bad)
    fresh = prepare(nn.Sequential(nn.Linear(16, 4)), QuantPlan.from_dict({"name": "w4", "rules": [{"match": "*", "weight": {
        "bits": 4, "granularity": "per_group", "group_size": 8, "estimator": "lsq_plus", "symmetric": False}}]}))
    with pytest.raises(RuntimeError, match="no scale yet"):
        OscillationTracker(fresh)
