"""The qat callbacks in both Lightning namespaces (pytorch_lightning, lightning.pytorch) and in LightningCLI."""

import importlib.util
import pathlib

import pytest
import pytorch_lightning
import torch
from torch.utils.data import DataLoader, TensorDataset

from qat.callbacks import OscillationControl, QuantizationAwareTraining, QuantizationTelemetry, QuantizedExport
from qat.callbacks.base import CALLBACK_BASES, Callback
from qat.modules import QuantLinear

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
needs_lightning = pytest.mark.skipif(not HAS_LIGHTNING, reason="the unified `lightning` package is not installed")
needs_cli = pytest.mark.skipif(
    not HAS_LIGHTNING or importlib.util.find_spec("jsonargparse") is None,
    reason="LightningCLI needs `lightning` and `jsonargparse[signatures]`",
)

REPO = pathlib.Path(__file__).resolve().parents[2]
NAMESPACES = ["pytorch_lightning", pytest.param("lightning.pytorch", marks=needs_lightning)]


def _loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)), batch_size=8)


def _classes(ns):
    """A tiny LightningModule / LightningDataModule of namespace ``ns``."""
    L = importlib.import_module(ns)

    class TinyModel(L.LightningModule):
        def __init__(self, hidden: int = 8):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class TinyData(L.LightningDataModule):
        def train_dataloader(self):
            return _loader()

    return L, TinyModel, TinyData


_, PLTinyModel, PLTinyData = _classes("pytorch_lightning")
if HAS_LIGHTNING:
    _, TinyModel, TinyData = _classes("lightning.pytorch")  # what LightningCLI (lightning.pytorch.cli) takes


class _CountHooks(QuantizationAwareTraining):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"setup": 0, "on_train_start": 0, "on_train_batch_start": 0}

    def setup(self, trainer, pl_module, stage):
        self.calls["setup"] += 1
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module):
        self.calls["on_train_start"] += 1
        super().on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls["on_train_batch_start"] += 1
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


def test_callback_base_covers_every_installed_namespace():
    assert pytorch_lightning.Callback in CALLBACK_BASES
    if HAS_LIGHTNING:
        import lightning.pytorch

        assert lightning.pytorch.Callback in CALLBACK_BASES
    for cls in (QuantizationAwareTraining, OscillationControl, QuantizationTelemetry, QuantizedExport):
        assert issubclass(cls, Callback)
        assert all(issubclass(cls, base) for base in CALLBACK_BASES)
        assert cls.__mro__[-1] is object  # a consistent MRO


@pytest.mark.parametrize("ns", NAMESPACES)
def test_trainer_of_either_namespace_trains_two_steps(ns):
    L, Model, Data = _classes(ns)
    model = Model()
    qat = _CountHooks("w4a8", calibration_batches=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[qat, QuantizationTelemetry(every_n_steps=1)])
    trainer.fit(model, Data())
    assert isinstance(model.net[0], QuantLinear) and qat.calibrated
    assert trainer.global_step == 2
    assert qat.calls == {"setup": 1, "on_train_start": 1, "on_train_batch_start": 2}  # each hook exactly once


# ---------------------------------------------------------------------------------- LightningCLI
COMMON = ["fit", "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


def _cli(args, tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(tmp_path)
    return LightningCLI(TinyModel, TinyData, args=args, save_config_callback=None)


def _qat_of(cli):
    (qat,) = [c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining)]
    return qat


@needs_cli
def test_cli_command_line_preset(tmp_path, monkeypatch):
    cli = _cli(COMMON + ["--trainer.callbacks+=qat.callbacks.QuantizationAwareTraining", "--trainer.callbacks.plan=w4a8"],
               tmp_path, monkeypatch)
    assert _qat_of(cli).plan.name == "w4a8"
    assert isinstance(cli.model.net[0], QuantLinear) and cli.trainer.global_step == 2


@needs_cli
def test_cli_yaml_inline_mapping_plan(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: qat.callbacks.QuantizationAwareTraining\n"
        "      init_args:\n"
        "        plan:\n"
        "          name: inline_w4\n"
        "          rules:\n"
        "            - match: '*'\n"
        "              weight: {bits: 4}\n"
        "        calibration_batches: 1\n"
    )
    cli = _cli(COMMON + ["--config=config.yaml"], tmp_path, monkeypatch)
    qat = _qat_of(cli)
    assert qat.plan.name == "inline_w4" and qat.calibrated
    assert isinstance(cli.model.net[0], QuantLinear) and cli.trainer.global_step == 2


@needs_cli
def test_cli_plan_path(tmp_path, monkeypatch):
    path = REPO / "configs" / "quant" / "w4a4.yaml"
    cli = _cli(COMMON + ["--trainer.callbacks+=qat.callbacks.QuantizationAwareTraining", f"--trainer.callbacks.plan={path}"],
               tmp_path, monkeypatch)
    assert _qat_of(cli).plan.name == "w4a4"
    assert isinstance(cli.model.net[0], QuantLinear)


@needs_cli
def test_cli_bad_preset_fails_at_parse_time_naming_presets(tmp_path, monkeypatch, capsys):
    with pytest.raises((ValueError, SystemExit)) as info:
        _cli(COMMON + ["--trainer.callbacks+=qat.callbacks.QuantizationAwareTraining", "--trainer.callbacks.plan=w5a5"],
             tmp_path, monkeypatch)
    message = str(info.value) + capsys.readouterr().err
    assert "unknown quantization preset 'w5a5'" in message and "valid presets" in message and "'w4a8'" in message
