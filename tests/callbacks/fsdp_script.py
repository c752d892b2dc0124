"""Run by tests/callbacks/test_fsdp.py as its own process: Lightning's FSDP launcher re-runs this
script once per rank (it cannot re-run a pytest command line). Writes each rank's quantizer state.

Usage: python fsdp_script.py OUT_DIR   (needs 2 CUDA GPUs: Lightning's FSDP refuses the CPU)"""

import os
import sys

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from qat import quantizers
from qat.callbacks import QuantizationAwareTraining


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Dump(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        state = {n + "." + k: v.detach().clone().cpu() for n, q in quantizers(pl_module) for k, v in q.state_dict().items()}
        torch.save(state, os.path.join(sys.argv[1], f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g) * torch.linspace(0.1, 10, 64).unsqueeze(1)
    y = torch.randint(0, 3, (64,), generator=g)
    trainer = pl.Trainer(
        accelerator="cuda", devices=2, strategy=FSDPStrategy(), max_steps=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[QuantizationAwareTraining("w4a8"), Dump()],
    )
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))
