"""The QuantizationAwareTraining callback on real (tiny) Lightning runs on the CPU."""

import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from qat import QATConfigError, QuantLinear, SmoothingSpec, quantizers
from qat.callbacks import QuantizationAwareTraining

PLAN = {
    "name": "resume-test",
    "rules": [
        {
            "match": "*",
            "weight": {"bits": 4, "granularity": "per_channel", "estimator": "lsq"},
            "input": {"bits": 8, "signed": False, "symmetric": False, "observer": "moving_average", "averaging_constant": 0.1},
        }
    ],
}


class Tiny(pl.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _loader(n=64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * scale
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _trainer(tmp_path, callbacks, max_epochs=2, **kw):
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_one_line_callback_prepares_in_setup_and_trains_learned_scales(tmp_path):
    class FirstScale(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:  # initialized by the first forward, one optimizer step ago
                self.after_init = pl_module.net[0].weight_quantizer.scale.detach().clone()

    model, first = Tiny(), FirstScale()
    _trainer(tmp_path, [QuantizationAwareTraining(PLAN), first], max_epochs=1).fit(model, _loader())
    assert isinstance(model.net[0], QuantLinear) and isinstance(model.net[3], QuantLinear)
    # the learned scales are in the optimizer (prepared before configure_optimizers) and moved
    opt_params = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(model.net[0].weight_quantizer.scale) in opt_params
    assert not torch.equal(model.net[0].weight_quantizer.scale.detach(), first.after_init)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path):
    """N steps, checkpoint, M more steps == N+M steps: weights, scales, observer state, schedule."""
    straight = Tiny()
    cb = QuantizationAwareTraining(PLAN, freeze_observers_step=6, freeze_bn_epoch=2)
    _trainer(tmp_path, [cb], max_epochs=4).fit(straight, _loader())

    first = Tiny()
    t1 = _trainer(tmp_path, [QuantizationAwareTraining(PLAN, freeze_observers_step=6, freeze_bn_epoch=2)], max_epochs=2)
    t1.fit(first, _loader())
    ckpt = os.path.join(tmp_path, "mid.ckpt")
    t1.save_checkpoint(ckpt)

    resumed = Tiny()
    cb2 = QuantizationAwareTraining(PLAN, freeze_observers_step=6, freeze_bn_epoch=2)
    _trainer(tmp_path, [cb2], max_epochs=4).fit(resumed, _loader(), ckpt_path=ckpt)

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    assert any("weight_quantizer.scale" in k for k in a) and any("observer.min_val" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=f"{k} differs after resume")
    assert cb2.observers_frozen and cb2.bn_frozen


def test_validate_and_test_from_checkpoint(tmp_path):
    model = Tiny()
    t = _trainer(tmp_path, [QuantizationAwareTraining(PLAN)], max_epochs=1)
    t.fit(model, _loader())
    ckpt = os.path.join(tmp_path, "m.ckpt")
    t.save_checkpoint(ckpt)
    expected = t.validate(model, _loader(seed=1), verbose=False)[0]["val_loss"]

    fresh = Tiny()
    t2 = _trainer(tmp_path, [QuantizationAwareTraining(PLAN)])
    got = t2.validate(fresh, _loader(seed=1), ckpt_path=ckpt, verbose=False)[0]["val_loss"]
    assert got == pytest.approx(expected, abs=0)
    tested = t2.test(Tiny(), _loader(seed=1), ckpt_path=ckpt, verbose=False)[0]["test_loss"]
    assert tested == pytest.approx(expected, abs=0)


def test_fit_twice(tmp_path):
    model = Tiny()
    cb = QuantizationAwareTraining(PLAN)
    _trainer(tmp_path, [cb], max_epochs=1).fit(model, _loader())
    first = model.net[0]
    _trainer(tmp_path, [cb], max_epochs=1).fit(model, _loader())
    assert model.net[0] is first  # not prepared twice
    assert sum(1 for _ in quantizers(model)) == 4


def test_validation_does_not_move_observer_ranges(tmp_path):
    model = Tiny()
    t = _trainer(tmp_path, [QuantizationAwareTraining(PLAN)], max_epochs=1, num_sanity_val_steps=0)
    t.fit(model, _loader())
    before = model.net[0].input_quantizer.observer.max_val.clone()
    t.validate(model, _loader(seed=3, scale=100.0), verbose=False)
    torch.testing.assert_close(model.net[0].input_quantizer.observer.max_val, before, atol=0, rtol=0)
    assert bool(model.net[0].input_quantizer.observer_enabled)  # training would observe again


class _Record(pl.Callback):
    def __init__(self):
        self.max_vals, self.bn_means = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.max_vals.append(pl_module.net[0].input_quantizer.observer.max_val.clone())
        self.bn_means.append(pl_module.net[1].running_mean.clone())


def test_observer_and_bn_freeze_schedules(tmp_path):
    rec = _Record()
    model = Tiny()
    cb = QuantizationAwareTraining(PLAN, freeze_observers_step=3, freeze_bn_epoch=1)
    _trainer(tmp_path, [cb, rec], max_epochs=3).fit(model, _loader())
    # 4 steps an epoch: observers move on steps 0..2, then stay
    assert not torch.equal(rec.max_vals[0], rec.max_vals[2])
    assert all(torch.equal(rec.max_vals[2], m) for m in rec.max_vals[3:])
    # BN statistics move in epoch 0, then stay from epoch 1 on
    assert not torch.equal(rec.bn_means[0], rec.bn_means[3])
    assert all(torch.equal(rec.bn_means[3], m) for m in rec.bn_means[4:])
    assert cb.state_dict()["observers_frozen"] and cb.state_dict()["bn_frozen"]


def test_calibration_batches(tmp_path):
    model = Tiny()
    cb = QuantizationAwareTraining(PLAN, calibration_batches=2)
    _trainer(tmp_path, [cb], max_steps=1).fit(model, _loader())
    assert cb.calibrated and cb.state_dict()["calibrated"]
    assert all(bool(q.initialized) for _, q in quantizers(model))


def test_preset_name_and_module_attr(tmp_path):
    model = Tiny()
    _trainer(tmp_path, [QuantizationAwareTraining("w4a8", module_attr="net")], max_steps=2).fit(model, _loader())
    assert isinstance(model.net[0], QuantLinear)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(plan="w9a9"), r"unknown quantization preset 'w9a9'; valid presets"),
        (dict(freeze_observers_step=1, freeze_observers_epoch=1), r"give freeze_observers_step or freeze_observers_epoch, not both"),
        (dict(freeze_bn_epoch=-1), r"freeze_bn_epoch must be a non-negative integer or None, got -1"),
        (dict(calibration_batches=1.5), r"calibration_batches must be a non-negative integer"),
        (dict(smooth=0.5), r"smooth needs calibration_batches > 0"),
        (dict(smooth=1.5, calibration_batches=2), r"QuantizationAwareTraining.smooth.alpha must be a number in \[0, 1\], got 1.5"),
        (dict(smooth={"alpha": 0.5, "learn": True}, calibration_batches=2), r"smooth: unknown field\(s\) \['learn'\]"),
        (dict(smooth="yes", calibration_batches=2), r"smooth must be null, true, a number \(alpha\) or a mapping"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(QATConfigError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_smoothing_is_calibrated_trained_and_survives_checkpoints(tmp_path):
    """smooth: factors exist from setup (in the optimizer), are set from the calibration
    batches (outlier channel -> large factor), train with the model, and a checkpoint of the
    smoothed model validates to the same loss in a fresh run and loads into a fresh prepared net."""
    from qat import prepare

    class Seen(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0 and trainer.current_epoch == 0:
                self.start = pl_module.net[0].input_smooth.detach().clone()

    seen = Seen()
    model = Tiny()
    smooth = {"alpha": 0.5, "match": "net.0", "learnable": True}
    cb = QuantizationAwareTraining(PLAN, calibration_batches=2, smooth=smooth)
    t = _trainer(tmp_path, [cb, seen], max_epochs=2)
    t.fit(model, _loader(scale=torch.tensor([1, 1, 30, 1, 1, 1, 1, 1.0])))
    s = model.net[0].input_smooth
    assert model.net[3].input_smooth is None and s.requires_grad
    assert seen.start[2] > 3 * seen.start[[0, 1, 3]].max()  # the outlier channel
    assert not torch.equal(s.detach(), seen.start)  # trained after calibration
    ckpt = os.path.join(tmp_path, "s.ckpt")
    t.save_checkpoint(ckpt)
    expected = t.validate(model, _loader(seed=1), verbose=False)[0]["val_loss"]
    cb2 = QuantizationAwareTraining(PLAN, calibration_batches=2, smooth=SmoothingSpec(0.5, "net.0", learnable=True))
    got = _trainer(tmp_path, [cb2]).validate(Tiny(), _loader(seed=1), ckpt_path=ckpt, verbose=False)[0]["val_loss"]
    assert got == pytest.approx(expected, abs=0)
    net = prepare(Tiny().net, PLAN)  # no smoothing set up: the state dict brings it
    sd = {k[len("net."):]: v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(sd)
    torch.testing.assert_close(net[0].input_smooth.detach(), s.detach())


class _CountSteps(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *a):
        _CountSteps.steps += 1


@pytest.mark.parametrize(
    "cb_kwargs,match",
    [
        (dict(plan="w4a8", module_attr="student"), r"module_attr='student': the LightningModule has no such attribute; its submodules are \['net'\]"),
        (dict(plan={"rules": [{"match": "decoder.*", "weight": {"bits": 4}}]}), r"matches no quantizable layer"),
    ],
)
def test_plan_errors_raise_before_any_training_step(tmp_path, cb_kwargs, match):
    _CountSteps.steps = 0
    with pytest.raises(QATConfigError, match=match):
        _trainer(tmp_path, [QuantizationAwareTraining(**cb_kwargs), _CountSteps()]).fit(Tiny(), _loader())
    assert _CountSteps.steps == 0


def test_resume_with_other_plan_is_an_error(tmp_path):
    t = _trainer(tmp_path, [QuantizationAwareTraining("w4a8")], max_steps=1)
    model = Tiny()
    t.fit(model, _loader())
    ckpt = os.path.join(tmp_path, "a.ckpt")
    t.save_checkpoint(ckpt)
    with pytest.raises(Exception, match=r"trained with plan 'w4a8' but this callback has plan 'w8a8'"):
        _trainer(tmp_path, [QuantizationAwareTraining("w8a8")], max_steps=2).fit(Tiny(), _loader(), ckpt_path=ckpt)


def test_fold_bn_option(tmp_path):
    from qat.bn_fold import QuantConvBn2d

    class ConvNet(Tiny):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 2, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=8)
    model = ConvNet()
    _trainer(tmp_path, [QuantizationAwareTraining("w8a8", fold_bn=True, freeze_bn_step=2)], max_steps=4).fit(model, loader)
    assert isinstance(model.net[0], QuantConvBn2d)
    with pytest.raises(QATConfigError, match="fold_bn must be true or false"):
        QuantizationAwareTraining("w8a8", fold_bn="yes")


def test_smooth_on_a_model_prepared_without_it_is_an_error(tmp_path):
    from qat import prepare

    model = Tiny()
    prepare(model.net, PLAN)
    with pytest.raises(QATConfigError, match=r"smooth: the model was prepared before, without smoothing"):
        _trainer(tmp_path, [QuantizationAwareTraining(PLAN, module_attr="net", calibration_batches=2, smooth=0.5)]).fit(
            model, _loader())


class CompiledTiny(pl.LightningModule):
    """The model compiled in ``configure_model`` (after the callback's ``setup`` prepared it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def configure_model(self):
        if not isinstance(self.net, torch._dynamo.eval_frame.OptimizedModule):
            self.net = torch.compile(self.net, backend="aot_eager")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("estimator", ["lsq", "lsq_plus"])
def test_compiled_model_traces_once_with_learned_weight_scales(estimator):
    """The weight quantizers are initialized at the start of fit, so the first compiled step does not
    branch on the learned scales' initialization: one graph, no recompile at the second step."""
    from torch._dynamo.utils import counters, guard_failures

    plan = {"rules": [{"match": "*", "weight": {"bits": 4, "granularity": "per_channel", "estimator": estimator},
                       "input": {"bits": 8, "symmetric": False, "dynamic": True, "granularity": "per_token"}}]}  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    qat_cb = QuantizationAwareTraining(plan)
    model = CompiledTiny()
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[qat_cb])  # fmt: skip
    trainer.fit(model, _loader())
    assert trainer.global_step == 4
    assert all(q.is_initialized for _, q in quantizers(model.net) if q.spec.estimator.value == estimator)
    reasons = [str(r) for v in guard_failures.values() for r in v]
    assert reasons == [], reasons
    assert int(counters["stats"]["unique_graphs"]) == 1
