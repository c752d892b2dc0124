"""OscillationControl (dampening and iterative freezing, :mod:`qat.oscillation`) next to
QuantizationAwareTraining, on tiny CPU runs."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from qat import QATConfigError
from qat.callbacks import OscillationControl, QuantizationAwareTraining
from qat.oscillation import dampening_loss, weight_codes  # the codes the forward uses

PLAN = {
    "name": "osc-test",
    "rules": [{"match": "*", "weight": {"bits": 4, "granularity": "per_group", "group_size": 8, "estimator": "lsq",
                                        "symmetric": True}}],
}


class Tiny(pl.LightningModule):
    def __init__(self, attr=False, lr=0.05):
        super().__init__()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        if attr:
            self.student = net
        else:
            self.net = net
        self.attr = attr
        self.lr = lr

    def forward(self, x):
        return (self.student if self.attr else self.net)(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _loader(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=16)


def _fit(cb, max_steps=24, model=None, callbacks=(), module_attr=None, **kw):
    """A run with QuantizationAwareTraining(PLAN), then ``cb`` (an OscillationControl or None), then ``callbacks``."""
    model = model or Tiny()
    qat = QuantizationAwareTraining(PLAN, module_attr=module_attr)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=[qat, *([cb] if cb else []), *callbacks],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)
    torch.manual_seed(1)
    trainer.fit(model, _loader())
    return model, trainer


def test_defaults_are_bit_identical_to_no_oscillation_callback():
    a, _ = _fit(None)
    b, _ = _fit(OscillationControl(dampen=0.0, freeze=None, momentum=0.99, freeze_start=0.0))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("attr", [False, True])
def test_dampening_pulls_weights_to_bin_centres(attr):
    module_attr = "student" if attr else None
    base, _ = _fit(None, model=Tiny(attr, lr=0.01), module_attr=module_attr)
    cb = OscillationControl(dampen=2.0, module_attr=module_attr)
    damped, _ = _fit(cb, model=Tiny(attr, lr=0.01), module_attr=module_attr)
    d0 = float(dampening_loss(base).detach())
    d1 = float(dampening_loss(damped).detach())
    assert d1 < 0.5 * d0, (d0, d1)
    assert cb.dampening_at(0) == 0.0 and cb.dampening_at(23) == pytest.approx(2.0)
    assert cb.dampening_at(12) == pytest.approx(2.0 * 0.5 * (1 - math.cos(math.pi * 12 / 23)))
    assert cb.stats()["dampen"] > 0 and "frozen" not in cb.stats()


@pytest.mark.parametrize("k", [1, 2])
def test_dampening_gradient_is_lambda_times_the_regularizer_once_per_optimizer_step(k):
    """With a zero task loss the gradient the optimizer sees is exactly ``lambda_t * grad(dampening_loss)``,
    for ``accumulate_grad_batches`` 1 and 2 (added once per backward, divided by k)."""
    seen = []

    class Zero(Tiny):
        def training_step(self, batch, batch_idx):
            return 0.0 * super().training_step(batch, batch_idx)

    class Check(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            w = pl_module.net[0].weight
            (g,) = torch.autograd.grad(dampening_loss(pl_module), [w])
            seen.append((trainer.global_step, w.grad.clone(), cb.dampening_at(trainer.global_step) * g))

    cb = OscillationControl(dampen=3.0)
    _fit(cb, max_steps=8, model=Zero(lr=0.01), callbacks=[Check()], accumulate_grad_batches=k)
    assert [s for s, _, _ in seen] == list(range(8))
    assert torch.count_nonzero(seen[0][1]) == 0  # lambda_0 = 0
    for step, got, want in seen[1:]:
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7), step


def test_freezing_holds_codes_and_respects_accumulation():
    cb = OscillationControl(freeze=1e-6, momentum=0.5)
    snaps = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 20:  # after OscillationControl's (earlier in the list) tracker step
                t = cb.tracker
                snaps["mask"] = t.frozen_mask("net.0").clone()
                snaps["codes"] = weight_codes(pl_module.net[0]).clone()

    model, trainer = _fit(cb, max_steps=40, callbacks=[Snap()], accumulate_grad_batches=2, log_every_n_steps=1)
    t = cb.tracker
    assert t is not None and t.steps == trainer.global_step == 40  # one tracker step per optimizer step
    mask = snaps["mask"]
    assert mask.any(), "nothing frozen"
    assert torch.equal(weight_codes(model.net[0])[mask], snaps["codes"][mask])
    assert t.frozen_share() > 0
    assert float(trainer.callback_metrics["osc/frozen"]) == pytest.approx(t.frozen_share())
    assert "osc/flip_rate" in trainer.callback_metrics


def test_freeze_start_delays_freezing():
    cb = OscillationControl(freeze=1e-6, momentum=0.5, freeze_start=0.5)
    before = []

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 10:  # steps 0..9 only track; freezing starts at step int(0.5 * 20) = 10
                before.append(cb.tracker.frozen_share())

    _fit(cb, max_steps=20, callbacks=[Snap()])
    assert before == [0.0]
    assert cb.tracker.frozen_share() > 0


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(dampen=-1.0), r"OscillationControl.dampen must be a number >= 0"),
        (dict(dampen=True), r"OscillationControl.dampen must be a number >= 0"),
        (dict(freeze=-0.1), r"OscillationControl.freeze must be a number in \(0, 1\), or 0 / None \(off\)"),
        (dict(freeze=1.5), r"OscillationControl.freeze must be a number in \(0, 1\), or 0 / None \(off\)"),
        (dict(momentum=1.0), r"OscillationControl.momentum must be a number in \(0, 1\)"),
        (dict(freeze_start=1.0), r"OscillationControl.freeze_start must be a number in \[0, 1\)"),
        (dict(freeze_start=float("nan")), r"OscillationControl.freeze_start must be a number in \[0, 1\)"),
    ],
)
def test_bad_oscillation_args_raise_in_constructor(kw, msg):
    with pytest.raises(QATConfigError, match=msg):
        OscillationControl(**kw)


def test_freeze_zero_is_off():
    assert OscillationControl(freeze=0.0).freeze is None and OscillationControl(freeze=None).freeze is None


def test_unbounded_run_with_freeze_start_raises_before_training():
    stepped = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *a):
            stepped.append(1)

    with pytest.raises(QATConfigError, match=r"freeze_start=0.5 is a share.*estimated_stepping_batches is infinite"):
        _fit(OscillationControl(freeze=0.01, freeze_start=0.5), max_steps=-1, max_epochs=-1, callbacks=[Count()])
    assert not stepped


def test_plan_without_weight_quantizers_raises_before_training():
    plan = {"name": "a8", "rules": [{"match": "*", "input": {"bits": 8, "signed": False, "symmetric": False}}]}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[QuantizationAwareTraining(plan), OscillationControl(dampen=1e-3)])
    with pytest.raises(QATConfigError, match="no weight quantizers"):
        trainer.fit(Tiny(), _loader())
    assert trainer.global_step == 0


def test_missing_module_attr_is_named():
    with pytest.raises(QATConfigError, match=r"OscillationControl.module_attr='student': the LightningModule has no such attribute"):
        _fit(OscillationControl(dampen=1e-3, module_attr="student"))


@pytest.mark.parametrize("smooth", [False, True])
def test_controller_gradient_equals_the_loss_term_bit_for_bit(smooth):
    """OscillationController.after_backward adds exactly what a backward of ``task + lambda_t * dampening_loss``
    gives (the way distill used to add it), smoothed layers included."""
    import copy

    from qat import init_smoothing, prepare
    from qat.oscillation import OscillationController, dampening_weight

    torch.manual_seed(0)
    net = prepare(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)), PLAN)
    if smooth:
        init_smoothing(net)
        with torch.no_grad():
            for m in (net[0], net[2]):
                m.input_smooth.uniform_(0.5, 2.0)
    x = torch.randn(8, 16)
    net(x)  # LSQ scales from the first forward
    a, b = net, copy.deepcopy(net)
    lam = dampening_weight(0.7, 3, 10)
    (a(x).pow(2).mean() + lam * dampening_loss(a)).backward()
    osc = OscillationController(dampen=0.7)
    osc.begin(b, total_steps=10)
    b(x).pow(2).mean().backward()
    osc.after_backward(3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n
