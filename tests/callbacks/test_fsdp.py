"""Under FSDP (2 GPUs, NCCL), observer statistics are identical on every rank."""

import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).with_name("fsdp_script.py")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (Lightning's FSDP does not run on the CPU)")
def test_fsdp_observer_statistics_identical_across_ranks(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert any("input_quantizer.observer.max_val" in k for k in r0)
    for k in r0:
        torch.testing.assert_close(r1[k], r0[k], atol=0, rtol=0, msg=f"{k} differs across ranks")
