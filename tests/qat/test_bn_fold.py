"""Conv-BatchNorm folding before weight fake-quant (qat.bn_fold)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qat import QuantConv2d, QuantPlan, prepare
from qat.bn_fold import QuantConvBn2d, bn_fold_factor, fold_bn, fuse_conv_bn
from qat.prepare import enable_observers, freeze_bn_stats, quantizers


def _net(bias=False):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def _plan(estimator="ste", granularity="per_channel"):
    w = {"bits": 4, "granularity": granularity, "estimator": estimator}
    if granularity == "per_group":
        w["group_size"] = 9
    elif granularity == "per_channel":
        w["axis"] = 0
    a = {"bits": 8, "signed": False, "symmetric": False}
    rule = {"match": "*", "weight": w, "input": a}
    if granularity == "per_group":
        rule["types"] = ["Conv2d"]  # groups of 9 = one 3x3 kernel; the Linear is 8 wide
    return QuantPlan.from_dict({"rules": [rule]})


def _randomize_bn(net):
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3.0)


def test_prepare_fold_bn_swaps_pairs_and_keeps_parameters():
    net = _net()
    w0 = net[0].weight
    prepare(net, _plan(), fold_bn=True)
    assert isinstance(net[0], QuantConvBn2d) and isinstance(net[3], QuantConvBn2d)
    assert isinstance(net[1], nn.Identity) and isinstance(net[4], nn.Identity)
    assert net[0].weight is w0
    assert not isinstance(net[8], QuantConvBn2d)  # the Linear has no BN
    assert "0.bn.running_var" in net.state_dict()
    assert fuse_conv_bn(net) == 0  # idempotent: nothing left to fuse


def test_eval_forward_equals_conv_with_folded_weight_exactly():
    net = _net()
    _randomize_bn(net)
    prepare(net, _plan(), fold_bn=True)
    net.eval()
    layer = net[0]
    x = torch.randn(4, 2, 6, 6)
    f = bn_fold_factor(layer.bn)
    w_fold = layer.weight * f.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(layer.folded_weight(), w_fold, atol=0, rtol=0)
    # the weight quantizer sees the folded weight: its per-channel scale follows the folded range
    layer(x)
    s = layer.weight_quantizer.scale
    torch.testing.assert_close(s, w_fold.detach().abs().amax(dim=(1, 2, 3)) / 7.5, atol=0, rtol=0)


@pytest.mark.parametrize("estimator,bias,granularity", [
    ("ste", False, "per_channel"),
    ("lsq", True, "per_channel"),
    ("ste", True, "per_tensor"),
    ("lsq", False, "per_group"),
])
def test_train_freeze_then_fold_gives_the_same_outputs(estimator, bias, granularity):
    net = _net(bias=bias)
    prepare(net, _plan(estimator, granularity), fold_bn=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x_all, y_all = torch.randn(64, 2, 6, 6), torch.randint(0, 3, (64,))
    for step in range(6):
        net.train()
        if step >= 3:
            freeze_bn_stats(net)
        x, y = x_all[step * 8 : step * 8 + 8], y_all[step * 8 : step * 8 + 8]
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    enable_observers(net, False)
    x = torch.randn(16, 2, 6, 6)
    before = net(x)
    folded = fold_bn(net)
    assert not any(isinstance(m, (QuantConvBn2d, nn.BatchNorm2d)) for m in folded.modules())
    assert type(folded[0]) is QuantConv2d
    after = folded(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # the original is untouched (fold_bn copies unless inplace=True)
    assert isinstance(net[0], QuantConvBn2d)


def test_frozen_bn_statistics_do_not_move_and_gradients_reach_bn():
    net = _net()
    prepare(net, _plan(), fold_bn=True)
    net.train()
    freeze_bn_stats(net)
    rm = net[0].bn.running_mean.clone()
    out = net(torch.randn(8, 2, 6, 6))
    out.sum().backward()
    torch.testing.assert_close(net[0].bn.running_mean, rm, atol=0, rtol=0)
    assert net[0].bn.weight.grad is not None and net[0].weight.grad is not None
    # unfrozen: statistics move
    net.train()
    net(torch.randn(8, 2, 6, 6) + 3)
    assert not torch.equal(net[0].bn.running_mean, rm)


def test_training_mode_normalizes_with_batch_statistics():
    net = _net()
    prepare(net, QuantPlan.from_dict({"rules": [{"match": "0", "weight": {"bits": 16}}]}), fold_bn=True)
    layer = net[0]
    layer.train()
    x = torch.randn(32, 2, 6, 6)
    y = layer(x)
    # 16-bit weights: the folded conv / f equals the plain conv; BN then normalizes with batch stats
    ref = F.batch_norm(F.conv2d(x, layer.weight, None, padding=1), None, None, layer.bn.weight, layer.bn.bias, True, 0.0, layer.bn.eps)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_from_quant_conv_rejects_mismatch():
    net = prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(5)), "w8a8")
    with pytest.raises(ValueError, match="does not follow a conv with 4 output channels"):
        QuantConvBn2d.from_quant_conv(net[0], net[1])
    with pytest.raises(TypeError, match="needs a QuantConv2d and a BatchNorm2d"):
        QuantConvBn2d.from_quant_conv(net[0], nn.ReLU())


def test_lsq_scale_learns_on_folded_weights():
    net = _net()
    _randomize_bn(net)
    prepare(net, _plan("lsq"), fold_bn=True)
    net(torch.randn(8, 2, 6, 6)).sum().backward()
    q = net[0].weight_quantizer
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()
    names = [n for n, _ in quantizers(net)]
    assert "0.weight_quantizer" in names
