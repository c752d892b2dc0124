"""The digits example: a small CNN on scikit-learn's bundled 8x8 digits (1797 images, offline)."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "DigitsCNN", "ClassifierModule", "evaluate_accuracy"]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, split by a fixed seed into train / val / test (70 / 10 / 20 %).

    Pixels are scaled to [0, 1]; images are ``(1, 8, 8)`` tensors. The training loader's shuffling
    generator is part of the module's ``state_dict`` (so of a Lightning checkpoint): a run resumed
    from a checkpoint sees the batches an uninterrupted run would have seen.

    Example::

        >>> dm = DigitsDataModule(batch_size=64)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape, len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (torch.Size([64, 1, 8, 8]), torch.Size([64]), 1259, 179, 359)
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2):
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_set = self.val_set = self.test_set = None
        self._train_generator: Optional[torch.Generator] = None
        self._restored_generator_state: Optional[torch.Tensor] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 8, 8) -> (N, 1, 8, 8)
        y = torch.tensor(data.target, dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(x), generator=g)
        n_test = int(len(x) * self.test_fraction)
        n_val = int(len(x) * self.val_fraction)
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        if self._restored_generator_state is not None:  # resuming: continue the shuffling where it stopped
            g.set_state(self._restored_generator_state)
            self._restored_generator_state = None
        self._train_generator = g
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)

    def state_dict(self) -> dict:
        """The shuffling generator's state of the latest training loader (saved in checkpoints)."""
        return {} if self._train_generator is None else {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the shuffling state: the next :meth:`train_dataloader` continues from it."""
        if "train_generator" in state_dict:
            self._restored_generator_state = state_dict["train_generator"]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)


def DigitsCNN(channels: int = 32, num_classes: int = 10) -> nn.Sequential:
    """Conv-BN-ReLU x3 with a pooling step and a linear classifier; ~57k parameters at 32 channels.

    Example::

        >>> net = DigitsCNN(channels=8)
        >>> net(torch.rand(2, 1, 8, 8)).shape, sum(p.numel() for p in DigitsCNN().parameters())
        (torch.Size([2, 10]), 56554)
    """
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * c, num_classes),
    )


class ClassifierModule(pl.LightningModule):
    """A LightningModule around any classifier network: cross-entropy, Adam, accuracy metrics.

    Args:
        net: the network (``nn.Module``) mapping inputs to logits.
        lr: Adam learning rate.
        num_classes: for the accuracy metrics.
        weight_decay: Adam weight decay.

    Example::

        >>> module = ClassifierModule(DigitsCNN(channels=4), lr=3e-3)
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(module, DigitsDataModule())
        >>> 0.0 <= evaluate_accuracy(trainer, module, DigitsDataModule()) <= 1.0
        True
    """

    def __init__(self, net: nn.Module, lr: float = 3e-3, num_classes: int = 10, weight_decay: float = 0.0):
        super().__init__()
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.trainer is None or not self.trainer.max_epochs or self.trainer.max_epochs < 1:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


def evaluate_accuracy(trainer: pl.Trainer, module: ClassifierModule, datamodule: pl.LightningDataModule) -> float:
    """``trainer.test`` of a :class:`ClassifierModule` on ``datamodule``'s test split: its ``test/acc``.

    Example::

        >>> trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> acc = evaluate_accuracy(trainer, ClassifierModule(DigitsCNN(channels=4)), DigitsDataModule())
        >>> 0.0 <= acc <= 1.0
        True
    """
    return float(trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"])

