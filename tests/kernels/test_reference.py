"""The reference fake-quant op (the CPU implementation, the kernels' oracle) against PyTorch's
own fake-quant ops: equal values and gradients, atol=0, on fresh random inputs."""

import pytest
import torch

from qat.kernels import backend_name, fake_quantize
from qat.kernels.reference import mask_words, pack_mask, round_with_mode, unpack_mask


def _qrange(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_tensor_equals_pytorch(bits, signed, seed):
    qmin, qmax = _qrange(bits, signed)
    x = _inputs((7, 33, 5), seed).requires_grad_()
    g = torch.Generator().manual_seed(seed + 100)
    scale = float(torch.rand((), generator=g) * 0.5 + 0.05)
    zp = int(torch.randint(qmin, qmax + 1, (), generator=g))
    ours = fake_quantize(x, torch.tensor([scale]), torch.tensor([float(zp)]), qmin, qmax)
    grad = torch.randn(x.shape, generator=g)
    (dx_ours,) = torch.autograd.grad(ours, x, grad)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    (dx_theirs,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    torch.testing.assert_close(dx_ours, dx_theirs, atol=0, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("bits,signed", [(4, True), (8, False), (2, True)])
def test_per_channel_equals_pytorch(axis, bits, signed):
    qmin, qmax = _qrange(bits, signed)
    x = _inputs((6, 10, 9), axis + bits).requires_grad_()
    c = x.shape[axis]
    g = torch.Generator().manual_seed(7 * axis + bits)
    scale = torch.rand(c, generator=g) * 0.5 + 0.02
    zp = torch.randint(qmin, qmax + 1, (c,), generator=g, dtype=torch.int32)
    ours = fake_quantize(x, scale, zp.float(), qmin, qmax, axis=axis)
    grad = torch.randn(x.shape, generator=g)
    (dx_ours,) = torch.autograd.grad(ours, x, grad)
    theirs = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    (dx_theirs,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    torch.testing.assert_close(dx_ours, dx_theirs, atol=0, rtol=0)


@pytest.mark.parametrize("group_size", [1, 4, 16, 48])
def test_per_group_equals_pytorch_per_channel_on_group_view(group_size):
    qmin, qmax = _qrange(4, True)
    x = _inputs((5, 3, 48), group_size).requires_grad_()
    n_groups = x.numel() // group_size
    g = torch.Generator().manual_seed(group_size)
    scale = torch.rand(5, 3, 48 // group_size, generator=g) * 0.3 + 0.01
    zp = torch.randint(qmin, qmax + 1, scale.shape, generator=g, dtype=torch.int32)
    ours = fake_quantize(x, scale, zp.float(), qmin, qmax, group_size=group_size)
    grad = torch.randn(x.shape, generator=g)
    (dx_ours,) = torch.autograd.grad(ours, x, grad)
    xv = x.reshape(n_groups, group_size)  # (5, 3, 48) -> (groups, g): a group is a channel
    theirs = torch.fake_quantize_per_channel_affine(xv, scale.reshape(-1), zp.reshape(-1), 0, qmin, qmax).reshape(x.shape)
    (dx_theirs,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    torch.testing.assert_close(dx_ours, dx_theirs, atol=0, rtol=0)


def test_negative_axis_and_noncontiguous_input():
    x = _inputs((8, 6), 3).t()  # non-contiguous (6, 8)
    scale = torch.rand(8) * 0.2 + 0.05
    zp = torch.zeros(8)
    ours = fake_quantize(x, scale, zp, -8, 7, axis=-1)
    theirs = torch.fake_quantize_per_channel_affine(x.contiguous(), scale, zp.int(), 1, -8, 7)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype_and_match_float32_math(dtype):
    x = _inputs((4, 64), 5).to(dtype)
    scale, zp = torch.tensor([0.1]), torch.tensor([0.0])
    y = fake_quantize(x, scale, zp, -8, 7)
    assert y.dtype == dtype
    ref = fake_quantize(x.float(), scale, zp, -8, 7).to(dtype)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)


@pytest.mark.parametrize("numel", [1, 31, 32, 33, 1000])
def test_mask_pack_roundtrip(numel):
    m = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    words = pack_mask(m)
    assert words.dtype == torch.int32 and words.shape == (mask_words(numel),)
    torch.testing.assert_close(unpack_mask(words, numel), m)


def test_mask_bit_layout_is_warp_ballot_order():
    m = torch.zeros(64, dtype=torch.bool)
    m[0] = m[31] = m[33] = True
    words = pack_mask(m)
    assert words.tolist() == [1 - 2**31, 2]  # bits 0 and 31 of word 0 (two's complement), bit 1 of word 1


def test_round_modes():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49])
    assert round_with_mode(v, "half_even").tolist() == [-2, -2, -0, 0, 2, 2, 0]
    assert round_with_mode(v, "half_away").tolist() == [-3, -2, -1, 1, 2, 3, 0]
    assert round_with_mode(v, "half_up").tolist() == [-2, -1, 0, 1, 2, 3, 0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale=torch.tensor([0.1], dtype=torch.float64)), "scale must be float32"),
        (dict(qmin=7, qmax=-8), "qmin < qmax"),
        (dict(axis=5), "axis=5 out of range"),
        (dict(group_size=5), "group_size=5 must divide"),
        (dict(axis=0, group_size=4), "not both"),
        (dict(round_mode="up"), "round_mode must be one of"),
        (dict(scale=torch.ones(3)), "per-tensor scale must have one element"),
    ],
)
def test_op_argument_errors(kwargs, match):
    args = dict(x=torch.randn(4, 8), scale=torch.tensor([0.1]), zero_point=torch.tensor([0.0]), qmin=-8, qmax=7)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        fake_quantize(**args)


def test_cpu_uses_reference_backend():
    assert backend_name("cpu") == "reference"


def test_torch_compile_fullgraph_on_cpu():
    lin = torch.nn.Linear(16, 8)
    scale, zp = torch.full((8,), 0.05), torch.zeros(8)

    def f(x):
        return torch.nn.functional.linear(x, fake_quantize(lin.weight, scale, zp, -8, 7, axis=0))

    x = torch.randn(4, 16)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), atol=0, rtol=0)
