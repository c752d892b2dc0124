"""QuantizationTelemetry logs per-layer bits, scales, clip rate, SQNR and model size."""

import csv

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from qat import FakeQuantizer, QATConfigError, QuantSpec
from qat.callbacks import QuantizationAwareTraining, QuantizationTelemetry
from qat.telemetry import quantizer_stats, sqnr_db


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _rows(tmp_path, plan):
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)), batch_size=8)
    logger = CSVLogger(tmp_path, name="t")
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[QuantizationAwareTraining(plan), QuantizationTelemetry(every_n_steps=3)],
    )
    trainer.fit(Net(), loader)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return [r for r in csv.DictReader(f)]


def test_logs_per_layer_metrics_on_schedule(tmp_path):
    rows = _rows(tmp_path, "w8a8")
    logged = [r for r in rows if r.get("qat/net.0/weight/sqnr_db")]
    assert [int(r["step"]) for r in logged] == [0, 3]
    r = logged[-1]
    assert float(r["qat/net.0/weight/bits"]) == 8 and float(r["qat/net.2/input/bits"]) == 8
    assert float(r["qat/net.0/weight/sqnr_db"]) > 30  # 8 bits: ~6 dB a bit, less the crest factor
    assert 0.0 <= float(r["qat/net.2/input/clip_rate"]) <= 1.0
    assert 2.0 < float(r["qat/compression"]) < 4.0  # tiny layers: per-channel scales and float biases weigh in


def test_fewer_bits_lower_sqnr(tmp_path):
    hi = _rows(tmp_path / "a", "w8a8")
    lo = _rows(tmp_path / "b", "w2a2")
    key = "qat/net.0/weight/sqnr_db"
    last = lambda rows: float([r for r in rows if r.get(key)][-1][key])
    assert last(lo) < last(hi) - 20


def test_quantizer_stats_clip_rate_is_exact():
    fq = FakeQuantizer(QuantSpec(bits=4, observer="minmax"), (4,))
    fq(torch.tensor([[-1.0, 0.0, 0.5, 1.0]]))  # range [-1, 1]: scale 1/7.5
    fq.enable_observer(False)
    stats = quantizer_stats(fq, torch.tensor([[-4.0, 0.0, 0.5, 4.0]]))
    assert stats["clip_rate"] == 0.5
    assert stats["sqnr_db"] == pytest.approx(sqnr_db(torch.tensor([-4.0, 0, 0.5, 4.0]), fq(torch.tensor([-4.0, 0, 0.5, 4.0]))))


def test_bad_interval():
    with pytest.raises(QATConfigError, match="every_n_steps must be a positive integer, got 0"):
        QuantizationTelemetry(every_n_steps=0)
