"""Under DDP, observer statistics are identical on every rank (one all-reduce per update)."""

import os

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from qat import quantizers
from qat.callbacks import QuantizationAwareTraining


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class DumpObservers(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        state = {n + "." + k: v.clone() for n, q in quantizers(pl_module) for k, v in q.state_dict().items()}
        state.update({n: p.detach().clone() for n, p in pl_module.named_parameters() if n.endswith("input_smooth")})
        torch.save(state, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("smooth", [False, True])
def test_observer_statistics_identical_across_ranks(tmp_path, smooth, monkeypatch):
    """With ``smooth`` the smoothing factors come from all ranks' calibration batches too."""
    # ddp_spawn's workers unpickle Net / DumpObservers by this module's name (tests.callbacks.test_ddp)
    # with the parent's sys.path; under --import-mode=importlib the checkout is not on it. Put only
    # `tests` there (a link in a fresh folder): the checkout root would also expose its top-level
    # kernels/ folder as `kernels`, which hides the PyPI package of that name transformers imports
    root = tmp_path / "importroot"
    root.mkdir()
    (root / "tests").symlink_to(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), target_is_directory=True)
    monkeypatch.syspath_prepend(str(root))
    g = torch.Generator().manual_seed(0)
    # the samples differ wildly in range, so each rank's shard sees a different range
    x = torch.randn(64, 8, generator=g) * torch.linspace(0.1, 10, 64).unsqueeze(1)
    y = torch.randint(0, 3, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[QuantizationAwareTraining("w4a8", **(dict(calibration_batches=2, smooth=0.5) if smooth else {})),
                   DumpObservers(str(tmp_path))],
    )
    trainer.fit(Net(), loader)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert any("input_quantizer.observer.max_val" in k for k in r0)
    assert any(k.endswith("input_smooth") for k in r0) == smooth
    for k in r0:
        torch.testing.assert_close(r1[k], r0[k], atol=0, rtol=0, msg=f"{k} differs across ranks")
