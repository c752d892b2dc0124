"""qat.reconstruct: block-wise reconstruction of a prepared model towards its float twin."""

import copy

import pytest
import torch
import torch.nn as nn

from qat import QATConfigError, QuantPlan, calibrate, prepare, reconstruct


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, scale=1.0):
        return x + scale * self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x, scale=0.5)  # a keyword argument that reconstruct must pass along
        return x


def _setup(bits=3):
    torch.manual_seed(0)
    teacher = Net().eval()
    plan = QuantPlan.from_dict({"name": "w3", "rules": [{"match": "blocks.*", "types": ["Linear"], "weight": {
        "bits": bits, "granularity": "per_channel", "estimator": "lsq"}}]})
    student = prepare(copy.deepcopy(teacher), plan)
    batches = [torch.randn(32, 8) for _ in range(4)]
    calibrate(student, batches)
    return teacher, student, batches


def _err(a, b, xs):
    with torch.no_grad():
        return float(sum((a(x) - b(x)).pow(2).mean() for x in xs) / len(xs))


def test_reconstruction_cuts_the_output_error_and_leaves_the_teacher_alone():
    teacher, student, batches = _setup()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    held = [torch.randn(32, 8) for _ in range(4)]
    before = _err(student, teacher, held)
    errs = reconstruct(student, teacher, ["blocks.0", "blocks.1", "blocks.2"], batches, iters=150, lr=1e-3, scale_lr=1e-3)
    after = _err(student, teacher, held)
    assert len(errs) == 3 and all(e == e for e in errs)
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    assert not student.training


def test_weights_of_the_error_count():
    teacher, student, batches = _setup()
    zero = reconstruct(copy.deepcopy(student), teacher, ["blocks.0"], batches, iters=1, weight_fn=lambda b: torch.zeros(1, 1))
    assert zero == [0.0]


def test_bad_arguments_are_named():
    teacher, student, batches = _setup()
    with pytest.raises(QATConfigError, match="no block named 'blocks.9'"):
        reconstruct(student, teacher, ["blocks.9"], batches)
    with pytest.raises(QATConfigError, match="blocks` is empty"):
        reconstruct(student, teacher, [], batches)
    with pytest.raises(QATConfigError, match="no calibration batches"):
        reconstruct(student, teacher, ["blocks.0"], [])
    with pytest.raises(QATConfigError, match="iters must be >= 1"):
        reconstruct(student, teacher, ["blocks.0"], batches, iters=0)
