"""Issue 15: the fake-quant ops check their parameters as PyTorch's own ops do, and a few more:
types always, values where reading them costs no device sync (CPU tensors) or when asked for
(``QAT_CHECK_PARAMS=1`` / ``set_param_checks(True)``)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from qat.kernels import fake_quantize, fake_quantize_lsq, fake_quantize_pact
from qat.kernels.ops import param_checks, set_param_checks

NAN, INF = float("nan"), float("inf")
X = torch.tensor([0.0, 0.3, -1.0, 2.5])


def _fq(scale=0.25, zp=0.0, qmin=-8, qmax=7, **kw):
    return fake_quantize(X, torch.tensor([scale]), torch.tensor([zp]), qmin, qmax, **kw)


def test_scale_zero_gives_no_silent_nan():
    """The reproduction: scale 0 gave NaN where PyTorch gives 0. Refused, naming the argument."""
    assert torch.equal(torch.fake_quantize_per_tensor_affine(X, 0.0, 0, -8, 7).abs(), torch.zeros(4))  # PyTorch: 0
    with pytest.raises(ValueError, match=r"fake_quantize: scale must be finite and nonzero, with 1 / scale and scale \* \(qmax - qmin\) finite, got 0.0 at index 0 of 1"):
        _fq(scale=0.0)


@pytest.mark.parametrize("scale", [NAN, INF, -INF, 0.0, -0.0, 1e-40, 1e38])
def test_bad_scales_are_refused(scale):
    with pytest.raises(ValueError, match=r"scale must be finite and nonzero"):
        _fq(scale=scale)
    with pytest.raises(ValueError, match=r"fake_quantize_lsq: scale must be finite and nonzero"):
        fake_quantize_lsq(X, torch.tensor([scale]), torch.tensor([0.0]), -8, 7)


def test_negative_scale_is_allowed_as_in_pytorch_and_gguf():
    """GGUF Q4_0's block scale d = m / qmin is negative where the block's extreme is positive."""
    ours = _fq(scale=-0.25)
    torch.testing.assert_close(ours, torch.fake_quantize_per_tensor_affine(X, -0.25, 0, -8, 7), atol=0, rtol=0)


@pytest.mark.parametrize("zp,match", [(200.0, r"got 200.0"),
                                      (-129.0, r"got -129.0"), (0.5, r"got 0.5"), (NAN, r"got nan"), (INF, r"got inf")])
def test_zero_point_outside_range_is_refused(zp, match):
    """The reproduction: a zero point outside [qmin, qmax] made every output -23.25 (PyTorch raises)."""
    with pytest.raises(RuntimeError):
        torch.fake_quantize_per_tensor_affine(X, 0.25, 200, -128, 127)
    with pytest.raises(ValueError, match=r"fake_quantize: zero_point must be an integer in \[qmin, qmax\] = \[-128, 127\], " + match):
        _fq(zp=zp, qmin=-128, qmax=127)


def test_per_channel_bad_value_is_located():
    s = torch.tensor([0.1, 0.2, 0.0])
    with pytest.raises(ValueError, match=r"scale must be finite and nonzero.*, got 0.0 at index 2 of 3"):
        fake_quantize(torch.randn(4, 3), s, torch.zeros(3), -8, 7, axis=1)


def test_lsq_zero_point_is_rounded_and_clamped_but_finite():
    s = torch.tensor([0.25])
    fake_quantize_lsq(X, s, torch.tensor([100.3]), -8, 7)  # used as clamp(round(z)): allowed
    with pytest.raises(ValueError, match=r"fake_quantize_lsq: zero_point must be finite"):
        fake_quantize_lsq(X, s, torch.tensor([NAN]), -8, 7)
    with pytest.raises(TypeError, match=r"grad_factor must be a finite number"):
        fake_quantize_lsq(X, s, torch.tensor([0.0]), -8, 7, grad_factor=INF)


@pytest.mark.parametrize("alpha", [0.0, -1.0, NAN, INF, 1e-44])
def test_pact_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=r"fake_quantize_pact: alpha must be finite and positive"):
        fake_quantize_pact(X, torch.tensor([alpha]), 0, 15)


@pytest.mark.parametrize("qmin,qmax,err,match", [
    (0.5, 7, TypeError, r"qmin must be a Python int, got 0.5 \(float\)"),
    (-8, 7.0, TypeError, r"qmax must be a Python int, got 7.0 \(float\)"),
    (False, 7, TypeError, r"qmin must be a Python int, got False \(bool\)"),
    ("-8", 7, TypeError, r"qmin must be a Python int"),
    (7, 7, ValueError, r"need qmin < qmax, got qmin=7, qmax=7"),
    (7, -8, ValueError, r"need qmin < qmax"),
])
def test_qmin_qmax_must_be_ints_in_order(qmin, qmax, err, match):
    with pytest.raises(err, match=match):
        _fq(qmin=qmin, qmax=qmax)
    with pytest.raises(err, match=match):
        fake_quantize_lsq(X, torch.tensor([0.25]), torch.tensor([0.0]), qmin, qmax)
    with pytest.raises(err, match=match):
        fake_quantize_pact(X, torch.tensor([2.0]), qmin, qmax)


def test_axis_and_group_size_types():
    with pytest.raises(TypeError, match=r"group_size must be an int or None, got 2.0"):
        fake_quantize(torch.randn(2, 4), torch.ones(2, 2), torch.zeros(2, 2), -8, 7, group_size=2.0)
    with pytest.raises(TypeError, match=r"axis must be an int or None, got True"):
        fake_quantize(torch.randn(2, 4), torch.ones(4), torch.zeros(4), -8, 7, axis=True)


def test_set_param_checks_turns_value_checks_off_and_on():
    assert param_checks() is None  # the default: CPU tensors only
    previous = set_param_checks(False)
    try:
        assert _fq(scale=0.0)[0].isnan()  # unchecked: the math of docs/math.md, 0 * inf
        assert param_checks() is False
    finally:
        set_param_checks(previous)
    with pytest.raises(TypeError):
        set_param_checks("yes")


def test_env_var_turns_checks_on_everywhere():
    code = "from qat.kernels.ops import param_checks; print(param_checks())"
    for value, expected in (("1", "True"), ("0", "False"), ("", "None")):
        env = {**os.environ, "QAT_CHECK_PARAMS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected


def test_unchecked_training_step_reads_no_tensor(monkeypatch):
    """With the value checks off (the GPU default), forward + backward read no tensor value at all:
    no bool(), item() or tolist() (each a device sync on a GPU)."""
    from qat import prepare

    for plan in ("w4a8", "w2a2", "w4a8_g32"):
        torch.manual_seed(0)
        model = prepare(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)), plan)
        x = torch.randn(8, 32)
        model(x).sum().backward()  # first step: initialization may inspect values
        previous = set_param_checks(False)

        def no_read(self, *a, **k):
            raise AssertionError("a tensor value was read in the training step")

        try:
            with monkeypatch.context() as m:
                for name in ("__bool__", "item", "tolist"):
                    m.setattr(torch.Tensor, name, no_read)
                model(x).sum().backward()
        finally:
            set_param_checks(previous)


def test_checks_are_skipped_while_compiling():
    from qat.kernels import ops

    assert ops._checks_values(X)
    assert not ops._checks_values(torch.empty(4, device="meta"))
