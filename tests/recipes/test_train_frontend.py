"""qat-train as a general Hydra front end (issue 18, deliverable 2): a user's own LightningModule /
LightningDataModule by ``_target_`` from the working directory, the Trainer from its config node,
the metric named in the config. Each is run as a user runs it: the console script in a directory
that holds the user's module file."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import qat.recipes.train as train_mod
from qat import QATConfigError
from qat.recipes.config import build_trainer, instantiate_node, register_configs, trainer_class

try:  # a Trainer subclass of the other namespace than the digits model's
    import lightning.pytorch as _L

    class LightningSubTrainer(_L.Trainer):
        pass
except ImportError:
    LightningSubTrainer = None

CONFIG_DIR = str(pathlib.Path(train_mod.__file__).resolve().parent.parent / "configs")
TINY = ["logger=none", "fp.epochs=2", "qat.epochs=1", "ptq.calibration_batches=2", "callbacks.qat.calibration_batches=2"]
OWN = ["model._target_=mymodel.MyModule", "data._target_=mymodel.MyData", "metric=test_acc"]


def user_module(namespace: str = "pytorch_lightning") -> str:
    """A user's model file: the network under ``self.model`` (no ``.net``), no ``lr`` argument, a
    metric named ``test_acc`` (not ``test/acc``), a ``setup(stage)`` without a default."""
    imp = "import pytorch_lightning as pl" if namespace == "pytorch_lightning" else "import lightning.pytorch as pl"
    return textwrap.dedent(f"""
        {imp}
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset


        class MyModule(pl.LightningModule):
            def __init__(self, hidden: int = 16):
                super().__init__()
                self.model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))

            def forward(self, x):
                return self.model(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self(x), y)

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.log("val_loss", nn.functional.cross_entropy(self(x), y))

            def test_step(self, batch, batch_idx):
                x, y = batch
                self.log("test_acc", (self(x).argmax(1) == y).float().mean())

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=1e-2)


        class MyData(pl.LightningDataModule):
            def __init__(self, batch_size: int = 32):
                super().__init__()
                self.batch_size = batch_size

            def setup(self, stage):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(512, 8, generator=g)
                y = (x.sum(1) > 0).long()
                self.train_set, self.test_set = TensorDataset(x[:384], y[:384]), TensorDataset(x[384:], y[384:])

            def train_dataloader(self):
                return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

            def val_dataloader(self):
                return DataLoader(self.test_set, batch_size=64)

            def test_dataloader(self):
                return DataLoader(self.test_set, batch_size=64)
        """)


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """tmp_path holding mymodel.py, as the working directory, with sys.path / sys.modules restored after."""
    (tmp_path / "mymodel.py").write_text(user_module())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    yield tmp_path
    sys.modules.pop("mymodel", None)


def _console_script() -> list:
    script = pathlib.Path(sys.executable).with_name("qat-train")
    assert script.exists(), f"the qat-train console script is not installed beside {sys.executable}"
    return [str(script)]


def _check_results(run_dir: pathlib.Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    assert res["metric"] == "test_acc" and res["mode"] == "max"
    assert res["fp"]["test_acc"] > 0.6, res  # the toy task is learned (chance: 0.5)
    assert 0.0 <= res["ptq"]["test_acc"] <= 1.0 and 0.0 <= res["qat"]["test_acc"] <= 1.0
    assert res["qat"]["bytes"] < res["fp"]["bytes"]
    # no `net`: module_attr=auto quantized the whole LightningModule (its `model` Sequential)
    sd = torch.load(run_dir / "qat_model.pt", weights_only=True)["state_dict"]
    assert any(k.startswith("model.0.") for k in sd) and any("quant" in k for k in sd), list(sd)[:6]
    return res


def test_console_script_trains_a_model_from_the_working_directory(user_dir):
    """`qat-train model._target_=mymodel.MyModule data._target_=mymodel.MyData` from the directory that
    holds mymodel.py: it failed in four ways (not importable, lr= injected, .net expected, test/acc
    read); now it trains, with the digits defaults' leftover keys (model.net, data.seed) dropped."""
    proc = subprocess.run([*_console_script(), *OWN, *TINY, "hydra.run.dir=run"], cwd=user_dir, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "full precision vs PTQ vs QAT" in proc.stdout and "test acc (%)" in proc.stdout
    _check_results(user_dir / "run")
    log = proc.stdout + proc.stderr
    assert "model.net, model.num_classes (left by the default model config) dropped" in log
    assert "fp.lr / qat.lr are not passed to MyModule" in log


def test_main_puts_the_working_directory_on_the_import_path(user_dir, monkeypatch):
    """In-process: before main() mymodel is not importable (pytest does not add the cwd), main() makes
    it so; a lightning.pytorch module gets a lightning.pytorch Trainer from the default trainer node."""
    pytest.importorskip("lightning")
    (user_dir / "mymodel.py").write_text(user_module("lightning.pytorch"))
    assert importlib.util.find_spec("mymodel") is None
    monkeypatch.setattr(sys, "argv", ["qat-train", *OWN, *TINY, "hydra.run.dir=run"])
    GlobalHydra.instance().clear()
    train_mod.main()
    import lightning.pytorch as L

    assert isinstance(sys.modules["mymodel"].MyModule(), L.LightningModule)
    assert str(user_dir) not in sys.path  # taken back when the app returned (the test process goes on)
    _check_results(user_dir / "run")
    assert (user_dir / "run" / "checkpoints" / "qat" / "last.ckpt").exists()  # the stage checkpoint of its namespace


def _compose(overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    "override,match",
    [
        ("metric=test/acc", r"metric='test/acc': MyModule does not log it in trainer.test or trainer.validate \(it logs "
                            r"\{'test': \['test_acc'\], 'validate': \['val_loss'\]\}\); set metric=<one of them>"),
        ("mode=maximum", r"mode must be one of \['max', 'min'\], got 'maximum'"),
        ("+model.hiden=8", r"model.hiden: mymodel.MyModule takes no argument 'hiden'; its arguments: \['hidden'\]"),
        ("+data.batch=8", r"data.batch: mymodel.MyData takes no argument 'batch'; its arguments: \['batch_size'\]"),
        ("model._target_=mymodel.Nope", r"model._target_='mymodel.Nope' is not importable .*working directory"),
        ("module_attr=net", r"module_attr='net': MyModule has no such submodule; its submodules are \['model'\]"),
        ("callbacks.qat.module_attr=model", r"callbacks.qat.module_attr='model' differs from module_attr=None"),
        ("trainer._target_=torch.nn.Linear", r"trainer._target_='torch.nn.Linear' is not a Lightning Trainer; valid: "
                                             r"\['pytorch_lightning.Trainer'"),
        ("+trainer.max_epochs=1", r"trainer.max_epochs is set by the recipe per stage; set fp.epochs / qat.epochs"),
    ],
)
def test_bad_front_end_values_fail_before_training(user_dir, override, match):
    sys.path.insert(0, str(user_dir))
    cfg = _compose([*OWN, *TINY, override])
    with pytest.raises(QATConfigError, match=match):
        train_mod.run(cfg, str(user_dir / "run"))
    assert not (user_dir / "run" / "fp_model.pt").exists() and not (user_dir / "run" / "checkpoints").exists()


def test_validation_metric_with_mode_min(user_dir):
    """A metric the model logs only in validation_step is read from trainer.validate; mode=min shows
    it as it is (not in percent)."""
    sys.path.insert(0, str(user_dir))
    cfg = _compose(["model._target_=mymodel.MyModule", "data._target_=mymodel.MyData", "metric=val_loss", "mode=min",
                    *TINY])
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out:
        res = train_mod.run(cfg, str(user_dir / "run"))
    assert res["metric"] == "val_loss" and res["fp"]["val_loss"] < 0.69  # below chance's log(2)
    assert train_mod.objective(res) == res["qat"]["val_loss"]
    assert "val loss" in out.getvalue() and "(%)" not in out.getvalue()


def test_lr_goes_only_to_a_model_that_takes_it():
    node = {"_target_": "qat.recipes.digits.ClassifierModule", "net": {"_target_": "torch.nn.Linear", "in_features": 2,
                                                                          "out_features": 2}}
    model, used = instantiate_node(node, "model", ("LightningModule",), lr=0.5)
    assert used == ["lr"] and model.lr == 0.5
    model, used = instantiate_node({**node, "lr": 0.1}, "model", lr=0.5)  # the node's own lr wins
    assert used == [] and model.lr == 0.1
    obj, used = instantiate_node({"_target_": "torch.nn.Identity"}, "model", lr=0.5)  # Identity(*args, **kwargs)
    assert used == ["lr"]
    with pytest.raises(QATConfigError, match=r"model._target_='torch.nn.Identity' built a Identity, not a LightningModule"):
        instantiate_node({"_target_": "torch.nn.Identity"}, "model", ("LightningModule",))


def test_trainer_comes_from_its_config_node():
    import pytorch_lightning as pl

    from qat.recipes.digits import ClassifierModule, DigitsCNN

    cfg = _compose(["logger=none", "+trainer.limit_train_batches=3"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    trainer = build_trainer(cfg, 4, False, [], "/tmp", model=ClassifierModule(DigitsCNN(channels=4)))
    assert type(trainer) is pl.Trainer and trainer.max_epochs == 4 and trainer.limit_train_batches == 3
    L = pytest.importorskip("lightning.pytorch")
    cfg = _compose(["logger=none", "trainer=lightning"])
    assert type(build_trainer(cfg, 1, False, [], "/tmp")) is L.Trainer
    assert trainer_class({"_target_": "pytorch_lightning.Trainer"}, ClassifierModule(DigitsCNN(channels=4))) is pl.Trainer
    with pytest.raises(QATConfigError, match=r"is a lightning.pytorch Trainer but the model \(ClassifierModule\) is a "
                                             r"pytorch_lightning.LightningModule"):
        trainer_class({"_target_": f"{__name__}.LightningSubTrainer"}, ClassifierModule(DigitsCNN(channels=4)))


def test_digits_default_is_unchanged(tmp_path):
    """No arguments: the digits recipe, reporting test/acc, quantizing ClassifierModule.net (the
    state dict qat-export loads), table as before."""
    cfg = _compose(["logger=none", "fp.epochs=2", "qat.epochs=1", "model.net.channels=8", "ptq.calibration_batches=1",
                    "callbacks.qat.calibration_batches=1"])
    assert (cfg.model._target_, cfg.metric, cfg.mode, cfg.module_attr) == (
        "qat.recipes.digits.ClassifierModule", "test/acc", "max", "auto")
    res = train_mod.run(cfg, str(tmp_path))
    assert res["metric"] == "test/acc" and res["fp"]["source"] == "trained" and res["fp"]["test_acc"] > 0.5
    sd = torch.load(tmp_path / "qat_model.pt", weights_only=True)["state_dict"]
    assert "0.weight" in sd and not any(k.startswith("net.") for k in sd)
    assert not os.path.exists(tmp_path / "fp_cache")  # a single run keeps no float cache
